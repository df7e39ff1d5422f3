"""`rdfast run` with its defaults: digits, mlp, four strategies, t up to 64, seeds 0-4.

Timed in-process from an empty output folder (the interpreter and imports not included; they
add about 3 s, measured separately with `time rdfast run`).
"""

import tempfile
from pathlib import Path

import pytest

from rdfast.commands import run_command

DEFAULTS = dict(
    dataset="digits",
    model="mlp",
    width=1.0,
    strategies=("mp", "gp", "up", "rp"),
    saliency="taylor",
    ratios=(2, 4, 8, 16, 32, 64),
    seeds=(0, 1, 2, 3, 4),
    epochs=None,
    finetune_epochs=None,
    finetune_lr=None,
    lr=None,
    schedule="cosine",
    weight_decay=None,
    batch_size=None,
    grad_batches=16,
    up_eps=None,
    retrain="finetune",
    rewind_epoch=1,
    exclude=(),
    device="cpu",
    data_root=None,
    progress=False,
)


@pytest.mark.benchmark(group="default-run")
def test_default_run(benchmark):
    def once():
        with tempfile.TemporaryDirectory() as d:
            assert run_command(out=Path(d), echo=lambda *_: None, **DEFAULTS) == 0

    benchmark.pedantic(once, rounds=2, warmup_rounds=0)
