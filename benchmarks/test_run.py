"""`rdfast run` with its defaults: digits, mlp, four strategies, t up to 64, seeds 0-4.

Timed in-process from an empty output folder (the interpreter and imports not included; they
add about 3 s, measured separately with `time rdfast run`).
"""

import tempfile
from pathlib import Path

import pytest

from rdfast.commands import run_experiment

# `rdfast run --device cpu`: every other setting at its declared default or preset.
DEFAULTS = dict(device="cpu", progress=False)


@pytest.mark.benchmark(group="default-run")
def test_default_run(benchmark):
    def once():
        with tempfile.TemporaryDirectory() as d:
            result = run_experiment(out=Path(d), **DEFAULTS)
            assert result.complete == len(result.outcomes)

    benchmark.pedantic(once, rounds=2, warmup_rounds=0)
