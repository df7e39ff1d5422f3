"""Marks that survive the many comparisons of one table: Holm and Benjamini-Hochberg
adjusted p-values against statsmodels and a hand-computed case, and the marks of a table
column demoted exactly where the adjusted p-value is not below 1 - ci."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from rdfast import stats
from tests.test_analysis import NO_FLOOR, fake_records, run_with


@pytest.mark.parametrize("method, sm", [("holm", "holm"), ("bh", "fdr_bh")])
@pytest.mark.parametrize("seed", range(5))
def test_adjusted_p_values_equal_statsmodels(method, sm, seed):
    rng = np.random.default_rng(seed)
    p = pd.Series(rng.uniform(0, 0.05, 40) ** rng.uniform(0.5, 3, 40), index=range(100, 140))
    p.iloc[rng.choice(40, 7, replace=False)] = np.nan  # cells outside the family
    p.iloc[3] = p.iloc[5] = p.dropna().iloc[0]  # ties
    got = stats.adjust_p(p, method)
    family = p.dropna()
    want = multipletests(family.to_numpy(), method=sm)[1]
    np.testing.assert_allclose(got[family.index].to_numpy(), want, rtol=1e-12)
    assert got[p.isna()].isna().all()


def test_hand_computed_holm_and_bh():
    p = pd.Series([0.01, 0.04, 0.03, 0.005])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running
    # max 0.02, 0.03, 0.06, 0.06.
    assert stats.adjust_p(p, "holm").tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: x4/1, x4/2, x4/3, x4/4 = 0.02, 0.02, 0.04, 0.04 -> running min from the top.
    assert stats.adjust_p(p, "bh").tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.adjust_p(p, "none").tolist() == p.tolist()


def many_groups(k: int, shift: float, names=None):
    """k strategies (named s0..), 5 seeds each, alpha = 1 + shift + noise: every group's
    one-sample t-test against 1 is one cell of the alpha column's family."""
    x = [0.2, -0.1, -0.1]
    rng = np.random.default_rng(7)
    runs = []
    for j in range(k):
        for s in range(5):
            al = 1 + shift * (j % 3) + rng.normal(0, 0.08)
            name = names[j] if names else f"s{j}"
            runs.append(run_with(s, x, [al * v for v in x], strategy=name))
    return fake_records(runs)


@pytest.mark.parametrize("adjust", ["holm", "bh"])
def test_marks_keep_only_what_the_family_supports(adjust):
    records = many_groups(12, 0.12)
    raw = stats.analyze(records, by=("strategy",), adjust="none", **NO_FLOOR).groups
    adj = stats.analyze(records, by=("strategy",), adjust=adjust, **NO_FLOOR).groups
    raw, adj = raw[raw["t"] > 1].set_index("strategy"), adj[adj["t"] > 1].set_index("strategy")
    # The raw marks are the intervals' (t method: the CI excludes 1 <=> p < 0.01).
    assert ((raw["mark"] != "?") == (raw["p_value"] < 0.01)).all()
    m = int(raw["p_value"].notna().sum())
    want = multipletests(
        raw["p_value"].to_numpy(), method={"holm": "holm", "bh": "fdr_bh"}[adjust]
    )[1]
    np.testing.assert_allclose(adj["p_adjusted"].to_numpy(), want, rtol=1e-12)
    assert m == 12
    kept = adj["p_adjusted"] < 0.01
    assert (adj["mark"][kept] == raw["mark"][kept]).all()
    assert (adj["mark"][~kept] == "?").all()
    assert (~kept & (raw["mark"] != "?")).any(), "no mark was demoted: the case tests nothing"
    assert (kept & (raw["mark"] != "?")).any(), "no mark survived: the case tests nothing"
    assert adj["p_value"].equals(raw["p_value"])


def test_the_family_is_named_and_the_paired_columns_adjusted():
    records = many_groups(5, 0.3, names=["mp", "gp", "up", "rp", "rp-layer"])
    a = stats.analyze(records, by=("strategy",), vs="mp", **NO_FLOOR)
    assert any("Holm (family-wise) adjusted p < 0.01 over its family of 5 cells" in n
               for n in a.notes), a.notes  # fmt: skip
    p = a.paired[a.paired["t"] > 1]
    assert p["p_value"].notna().sum() == 4  # gp, up, rp, rp-layer against mp
    for prefix in ("", "acc_", "disparity_"):
        family = p[f"{prefix}p_value"].notna()
        if family.any():
            want = multipletests(p.loc[family, f"{prefix}p_value"], method="holm")[1]
            np.testing.assert_allclose(p.loc[family, f"{prefix}p_adjusted"], want, rtol=1e-12)
