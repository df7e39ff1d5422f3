"""Global selection at 50 % over 1e6 and 1e8 weights in 100 tensors (CPU).

Time: pytest-benchmark, side by side in one run. Extra peak memory: each case once more
in a fresh process (benchmarks/selection_cases.py), recorded as `extra_peak_mb`.

    pytest benchmarks/test_selection.py --benchmark-columns=median,min,rounds
"""

import subprocess
import sys

import pytest

from benchmarks.conftest import ROOT, bandwidth_info
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
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.selection_cases", case, str(total), str(TENSORS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
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


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", ["rdfast_fused_up", "torch_kthvalue_of_saliency"])
def test_gpu_selection_1e9(benchmark, case):
    """Saliency + selection over 1e9 fp32 weights and gradients in 100 tensors (UP, taylor).

    Bytes per pass: 8 per weight (w and g) + 1 (mask); 5 full passes (3 histograms, the
    equal-count pass, the mask pass) + 1 byte written per weight."""
    import torch

    from rdfast.kernels import prune_lowest_fused, saliency

    benchmark.group = "gpu-select-50%-1e9-in-100"
    gen = torch.Generator(device="cuda").manual_seed(0)
    per = 10**7
    ws = [torch.randn(per, device="cuda", generator=gen) for _ in range(100)]
    gs = [torch.randn(per, device="cuda", generator=gen) * 1e-3 for _ in range(100)]
    masks = [torch.ones(per, dtype=torch.bool, device="cuda") for _ in range(100)]
    n = 5 * 10**8

    def fused():
        out = prune_lowest_fused(ws, gs, masks, n, strategy="up", eps=5e-4)
        torch.cuda.synchronize()
        return out

    def kth():
        s = torch.cat([saliency(w, g, strategy="up", eps=5e-4) for w, g in zip(ws, gs)])
        v = torch.kthvalue(s, n).values
        torch.cuda.synchronize()
        return v

    benchmark.pedantic(fused if case == "rdfast_fused_up" else kth, rounds=5, warmup_rounds=1)
    bandwidth_info(benchmark, 10**9 * (5 * 9 + 1))
