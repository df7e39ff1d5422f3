"""GP/UP on a model of 3e8 parameters (timm ViT-L/16, random initialisation, CPU): the memory
pruning takes beyond the weights and their gradients, rdfast against
`torch.nn.utils.prune.global_unstructured` with an importance_scores dict, side by side.

Each case runs once in a fresh process (`benchmarks/gradient_cases.py`), whose figures go
into extra_info; pytest-benchmark's own time is the whole process (model built, gradient).

    pytest benchmarks/test_gradient_pruning.py --benchmark-columns=median,rounds
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.conftest import ROOT
from benchmarks.gradient_cases import CASES

pytest.importorskip("timm")


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_pruning_memory(benchmark, case):
    benchmark.group = "up-t2-vit-large"
    result = {}

    def once():
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.gradient_cases", case],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(once, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(result)
