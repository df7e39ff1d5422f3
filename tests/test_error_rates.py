"""CEV and SDE (Simon Says) against the published definitions written out on predictions, the
zero-rate rule by hand, and their group intervals against scipy."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import confusion_matrix

from rdfast.stats.error_rates import (
    class_error_rates,
    group_error_changes,
    relative_change,
    run_error_changes,
)


def long_confusion(run_id, steps: dict, c: int) -> pd.DataFrame:
    """The long confusion table of one run from {step: (t, y_true, y_pred)}, via sklearn."""
    frames = []
    for step, (t, y, p) in steps.items():
        cm = confusion_matrix(y, p, labels=range(c))
        frames.append(pd.DataFrame({"run_id": run_id, "step": step, "t_target": t,
                                    "true": np.repeat(np.arange(c), c),
                                    "pred": np.tile(np.arange(c), c),
                                    "count": cm.reshape(-1)}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def published(y, pruned, dense, c):
    """CEV and SDE as the public code writes them: loops over classes, no zero rule."""

    def fpr(p, i):
        return ((p == i) & (y != i)).sum() / (y != i).sum()

    def fnr(p, i):
        return ((p != i) & (y == i)).sum() / (y == i).sum()

    dpos = [(fpr(pruned, i) - fpr(dense, i)) / fpr(dense, i) for i in range(c)]
    dneg = [(fnr(pruned, i) - fnr(dense, i)) / fnr(dense, i) for i in range(c)]
    centre = (np.mean(dpos), np.mean(dneg))
    cev = np.mean([(centre[0] - dpos[i]) ** 2 + (centre[1] - dneg[i]) ** 2 for i in range(c)])
    sde = np.mean(np.abs(np.array(dneg) - np.array(dpos)))
    return cev, sde


def noisy(y, rate, rng, c):
    p = y.copy()
    flip = rng.random(len(y)) < rate
    p[flip] = rng.integers(0, c, flip.sum())
    return p


def test_cev_and_sde_equal_the_published_definitions_where_no_rate_is_zero():
    rng = np.random.default_rng(0)
    c = 4
    y = rng.integers(0, c, 600)
    dense = noisy(y, 0.4, rng, c)
    steps = {0: (1.0, y, dense)}
    for i, t in enumerate([2.0, 8.0], start=1):
        steps[i] = (t, y, noisy(y, 0.4 + 0.2 * i, rng, c))
    got = run_error_changes(long_confusion("r", steps, c)).set_index("t")
    for i, t in enumerate([2.0, 8.0], start=1):
        cev, sde = published(y, steps[i][2], dense, c)
        assert got.loc[t, "cev"] == pytest.approx(cev, rel=1e-12)
        assert got.loc[t, "sde"] == pytest.approx(sde, rel=1e-12)


def test_rates_match_sklearn_counts():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = noisy(y, 0.5, rng, 3)
    r = class_error_rates(long_confusion("r", {0: (1.0, y, p)}, 3)).set_index("class")
    cm = confusion_matrix(y, p)
    fn = cm.sum(axis=1) - cm.diagonal()
    fp = cm.sum(axis=0) - cm.diagonal()
    np.testing.assert_allclose(r["FNR"], fn / cm.sum(axis=1))
    np.testing.assert_allclose(r["FPR"], fp / (len(y) - cm.sum(axis=1)))


def test_zero_rate_rule_by_hand():
    """Two classes, five examples each. Dense: no error at all (every rate 0). Pruned: one
    example of class 0 predicted 1 -- FNR_0 = 1/5, FPR_1 = 1/5, the others stay 0. With the
    rule, each change that rises from 0 divides by 1/5: dFNR_0 = 1, dFPR_1 = 1, the rest 0."""
    y = np.array([0] * 5 + [1] * 5)
    dense = y.copy()
    pruned = y.copy()
    pruned[0] = 1
    got = run_error_changes(long_confusion("r", {0: (1.0, y, dense), 1: (2.0, y, pruned)}, 2))
    # (dFPR, dFNR): class 0 (0, 1), class 1 (1, 0); centre (0.5, 0.5).
    assert got["cev"].iloc[0] == pytest.approx(0.5)  # mean of 0.25 + 0.25, twice
    assert got["sde"].iloc[0] == pytest.approx(1.0)
    # Unchanged predictions: every change 0, also where the dense rate is 0.
    same = run_error_changes(long_confusion("r", {0: (1.0, y, dense), 1: (2.0, y, dense)}, 2))
    assert same["cev"].iloc[0] == 0 and same["sde"].iloc[0] == 0
    rel = relative_change(pd.Series([0.3, 0.0]), pd.Series([0.2, 0.0]), pd.Series([10, 10]))
    np.testing.assert_allclose(rel, [0.5, 0.0])


def test_group_intervals_match_scipy():
    rng = np.random.default_rng(2)
    runs = pd.DataFrame({"strategy": ["mp"] * 5, "t": 2.0, "step": 1,
                         "cev": rng.random(5), "sde": rng.random(5)})  # fmt: skip
    g = group_error_changes(runs, ["strategy"], 0.99, "t", 0, 0).iloc[0]
    v = runs["sde"].to_numpy()
    low, high = stats.t.interval(0.99, 4, loc=v.mean(), scale=stats.sem(v))
    assert g["mean_sde"] == pytest.approx(v.mean())
    assert g["sde_ci_low"] == pytest.approx(max(low, 0.0))
    assert g["sde_ci_high"] == pytest.approx(high)
