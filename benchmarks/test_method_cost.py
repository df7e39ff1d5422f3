"""What a pruning step costs with each method that tries to distort less, against plain
magnitude and undecayed pruning, side by side in one run on the same dense model.

ResNet-20 at width 0.5 on real CIFAR-10 (the `fairness` spec's CIFAR-10 setting, smaller):
a dense model trained once (one epoch on a stratified 2,560 training images, CPU preset),
then, for each case, one `rdfast run` step to t = 4 from it: the selection (its gradients
and scores), one epoch of fine-tuning over the 2,560 images, and the evaluation of 2,000
test images. The run folder of the case is removed before each round, the dense model kept.
The class-aware selections run twice: measuring every class from one forward pass a
calibration batch (their per-class sums held at once, the default within
`calibration.CLASS_SUMS_MEMORY`), and one class at a time (a budget of 0, as a model too
large for the budget runs), which is what they cost before the budget existed.

    RDFAST_DATA=../shared/data pytest benchmarks/test_method_cost.py \
        --benchmark-columns=median,min,rounds
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.conftest import SHARED_DATA
from rdfast.commands import run_experiment
from rdfast.pruning import calibration
from rdfast.runs import store

DATA_ROOT = Path(os.environ.get("RDFAST_DATA", SHARED_DATA))
SETTING = dict(dataset="cifar10:train=2560,test=2000", model="resnet20", width=0.5,
               preset="cpu", epochs=1, seeds="0", ratios="4", device="cpu")  # fmt: skip

# The peers first: plain fine-tuning after mp and up; then each method alone.
CASES = {
    "mp plain": dict(strategies="mp"),
    "up plain": dict(strategies="up"),
    "cs plain": dict(strategies="cs"),
    "cs plain, one class at a time": dict(strategies="cs"),
    "up taylor-max plain": dict(strategies="up", saliency="taylor-max"),
    "up taylor-max plain, one class at a time": dict(strategies="up", saliency="taylor-max"),
    "mp kd": dict(strategies="mp", mitigation="kd"),
    "mp ceag": dict(strategies="mp", mitigation="ceag"),
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    if not (DATA_ROOT / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found under {DATA_ROOT} (set RDFAST_DATA)")
    folder = tmp_path_factory.mktemp("cost")
    # The dense model, trained once: every case's run finds it under dense/.
    first = run_experiment(out=folder, data_root=DATA_ROOT, progress=False, **SETTING,
                           strategies="mp")  # fmt: skip
    assert first.complete == 1
    shutil.rmtree(store.run_dir(folder, first.outcomes[0].run_id))
    return folder


@pytest.mark.benchmark(group="method-cost-resnet20-cifar10")
@pytest.mark.parametrize("case", list(CASES))
def test_step_cost(benchmark, out, case, monkeypatch):
    if case.endswith("one class at a time"):
        monkeypatch.setattr(calibration, "CLASS_SUMS_MEMORY", 0)
    made = []

    def clear():
        for run_id in made:
            shutil.rmtree(store.run_dir(out, run_id), ignore_errors=True)

    def step():
        result = run_experiment(out=out, data_root=DATA_ROOT, progress=False, **SETTING,
                                **CASES[case])  # fmt: skip
        assert result.complete == 1, [o.error for o in result.outcomes]
        made.append(result.outcomes[0].run_id)

    benchmark.pedantic(step, setup=clear, rounds=3, warmup_rounds=0)
    clear()
