"""Global selection at 50 % over 1e6 and 1e8 weights in 100 tensors (CPU).

Time: pytest-benchmark, side by side in one session. Extra peak memory: each case once more
in a fresh process (benchmarks/selection_cases.py), recorded as `extra_peak_mb`.

    pytest benchmarks/test_selection.py --benchmark-columns=median,min,rounds
"""

import subprocess
import sys

import pytest

from benchmarks.conftest import ROOT
from benchmarks.selection_cases import CASES, make_scores, state_for

SIZES = {"1e6": 10**6, "1e8": 10**8}
TENSORS = 100
# global_unstructured takes ~25 s and 4.5 GB at 1e8: one round is enough to place it.
ROUNDS = {"torch_global_unstructured": 1, "numpy_sort": 2, "torch_kthvalue": 2}


@pytest.fixture(scope="module", params=list(SIZES))
def problem(request):
    scores = make_scores(SIZES[request.param], TENSORS)
    return request.param, scores


def peak_mb(case, total):
    out = subprocess.run([sys.executable, "-m", "benchmarks.selection_cases", case, str(total),
                          str(TENSORS)], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.strip())


@pytest.mark.parametrize("case", list(CASES))
def test_global_selection(benchmark, problem, case):
    size, scores = problem
    benchmark.group = f"select-50%-{size}-in-{TENSORS}"
    state = state_for(case, scores)
    fn = CASES[case]
    benchmark.pedantic(lambda: fn(scores, state), rounds=ROUNDS.get(case, 3), warmup_rounds=0)
    benchmark.extra_info["weights"] = SIZES[size]
    benchmark.extra_info["extra_peak_mb"] = peak_mb(case, SIZES[size])
