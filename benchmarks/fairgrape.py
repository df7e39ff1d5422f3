"""FairGRAPE's greedy selection (Lin, Kim, Sukthankar, ECCV 2022; `fairness_grad` in the
authors' prune.py), written directly for one layer: the peer of rdfast's class-share
selection in benchmarks and tests.

Given the importance h[i, c] of weight i for class c, keep K weights: the targets are each
class's share of the layer's importance, T_c = sum_i h[i, c] / sum h; the kept shares start
at 1 / C; each step takes the class furthest below its target, argmin_c (P_c - T_c), and
keeps its most important weight not yet kept (a weight another class already took is passed
over), adding that weight's importance for every class to the kept totals. The authors'
loop re-evaluates the class every other step by default (`para_batch` 1); this one every
step, the rule the paper states.
"""

from __future__ import annotations

import numpy as np


def fairgrape_greedy(h: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask of the `keep` weights the greedy keeps (h: weights x classes, >= 0)."""
    n, classes = h.shape
    # float64 sums: numpy adds float32 columns one row at a time, which at 1e7 rows is off
    # by tens of percent.
    sums = h.sum(axis=0, dtype=np.float64)
    target = sums / sums.sum()
    # Each class's ranking, most important first, ties by position (a stable sort).
    order = np.argsort(-h, axis=0, kind="stable").T
    kept = np.zeros(n, dtype=bool)
    totals = np.zeros(classes)
    share = np.full(classes, 1.0 / classes)
    pointer = np.zeros(classes, dtype=np.int64)
    count = 0
    while count < keep:
        c = int(np.argmin(share - target))
        i = order[c, pointer[c]]
        pointer[c] += 1
        if not kept[i]:
            kept[i] = True
            count += 1
            totals += h[i]
            share = totals / totals.sum()
    return kept
