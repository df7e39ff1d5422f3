"""Class-share selection against FairGRAPE's greedy loop, side by side: one layer of 1e6 and
1e7 weights, 10 classes, keep a quarter (t = 4), synthetic importances (|w| |g_c|)^2 with
w ~ N(0, 1) and each class's gradient N(0, s_c), s_c from 0.5 to 2 (CPU).

Both run once per size (the greedy takes minutes at 1e7). extra_info: the share of its own
importance the worst-served class keeps (`min_class_share`), the masks' overlap with the
greedy's (`jaccard_vs_greedy`), and, with one class, whether the masks are equal
(`equal_with_one_class`, on a tenth of the weights).

    pytest benchmarks/test_class_share.py --benchmark-columns=median,rounds
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.fairgrape import fairgrape_greedy
from rdfast.pruning.class_share import class_share_masks

SIZES = {"1e6": 10**6, "1e7": 10**7}
CLASSES = 10


def importances(n: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n).astype(np.float32)
    scale = np.linspace(0.5, 2.0, classes, dtype=np.float32)
    g = rng.normal(size=(classes, n)).astype(np.float32) * scale[:, None]
    return ((np.abs(w) * np.abs(g)) ** 2).T.copy()  # weights x classes


def class_share(h: np.ndarray, keep: int) -> np.ndarray:
    n = h.shape[0]
    layers = {"w": nn.Parameter(torch.zeros(n))}
    per_class = ([torch.from_numpy(h[:, c])] for c in range(h.shape[1]))
    return class_share_masks(layers, [torch.ones(n, dtype=torch.bool)], n - keep, per_class,
                             ["w"])[0].numpy()  # fmt: skip


CASES = {"rdfast_class_share": class_share, "fairgrape_greedy": fairgrape_greedy}


@pytest.fixture(scope="module", params=list(SIZES))
def problem(request):
    n = SIZES[request.param]
    return request.param, importances(n, CLASSES)


@pytest.mark.parametrize("case", list(CASES))
def test_class_share_selection(benchmark, problem, case):
    size, h = problem
    benchmark.group = f"keep-25%-{size}-{CLASSES}-classes"
    keep = h.shape[0] // 4
    out = {}
    benchmark.pedantic(lambda: out.update(mask=CASES[case](h, keep)), rounds=1, warmup_rounds=0)
    mask = out["mask"]
    assert int(mask.sum()) == keep
    shares = h[mask].sum(axis=0, dtype=np.float64) / h.sum(axis=0, dtype=np.float64)
    benchmark.extra_info["weights"] = h.shape[0]
    benchmark.extra_info["min_class_share"] = round(float(shares.min()), 4)
    benchmark.extra_info["max_class_share"] = round(float(shares.max()), 4)
    if case == "rdfast_class_share":
        greedy = fairgrape_greedy(h, keep) if h.shape[0] <= 10**6 else None
        if greedy is not None:
            jac = (mask & greedy).sum() / (mask | greedy).sum()
            benchmark.extra_info["jaccard_vs_greedy"] = round(float(jac), 4)
        one = h[: h.shape[0] // 10, :1]
        same = np.array_equal(class_share(one, len(one) // 4), fairgrape_greedy(one, len(one) // 4))
        benchmark.extra_info["equal_with_one_class"] = bool(same)
