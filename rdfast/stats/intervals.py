"""Confidence intervals (Student-t, bootstrap), their measured coverage, the marks, and the
multiplicity control of one table column (Holm, Benjamini-Hochberg)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

CI_METHODS = ("t", "bootstrap")


# Coverage (%) of the intervals as `rdfast analyze` computes them, on normal data, by
# replicate count: `python -m benchmarks.ci_coverage` (4,000 samples per cell, 2026-11-26;
# benchmarks/README.md). Marks need an interval within COVERAGE_SLACK points of its nominal
# level; the percentile bootstrap undercovers badly with few replicates.
COVERAGE = {
    ("t", 0.95): {3: 95.2, 5: 94.5, 10: 95.4, 20: 95.0},
    ("t", 0.99): {3: 99.2, 5: 99.1, 10: 99.0, 20: 99.0},
    ("bootstrap", 0.95): {3: 74.8, 5: 83.0, 10: 91.0, 20: 92.1},
    ("bootstrap", 0.99): {3: 75.9, 5: 89.3, 10: 96.2, 20: 97.9},
}


COVERAGE_SLACK = 1.5


def measured_coverage(method: str, ci: float, n: int) -> float | None:
    """Simulated coverage (%) at the largest tabulated n <= `n`, for the tabulated level
    nearest `ci`; None where the table holds nothing for it (n < 3, or t at any n: the
    Student-t interval is exact for normal data)."""
    if method == "t" or n < 3:
        return None
    level = min((0.95, 0.99), key=lambda lv: abs(lv - ci))
    table = COVERAGE[(method, level)]
    return table[max(k for k in table if k <= n)]


def undercovering(method: str, ci: float, n: pd.Series) -> pd.Series:
    """Per group: True where the interval of `method` is known to undercover at its n."""
    nominal = 100 * min((0.95, 0.99), key=lambda lv: abs(lv - ci))

    def low(k):
        cov = measured_coverage(method, ci, int(k))
        return cov is not None and cov < nominal - COVERAGE_SLACK

    return n.map(low).astype(bool)


def note_undercover(method, ci, n: pd.Series, notes) -> None:
    bad = n[undercovering(method, ci, n)]
    if notes is None or bad.empty:
        return
    counts = sorted({int(k) for k in bad})
    covs = ", ".join(f"{measured_coverage(method, ci, k):.1f} % at n = {k}" for k in counts)
    note = (
        f"no marks where the {ci:.0%} {method} intervals are known to undercover ({covs}, "
        f"simulated on normal data; Student-t covers {ci:.0%}): use --ci-method t, or at "
        "least 20 replicates for a 99 % bootstrap"
    )
    if note not in notes:
        notes.append(note)


def t_interval(mean, sd, n, ci):
    """Student-t interval mean +- t_{(1+ci)/2, n-1} * sd / sqrt(n); NaN where n < 2."""
    n = n.astype(float)
    half = stats.t.ppf((1 + ci) / 2, (n - 1).where(n > 1)) * sd / np.sqrt(n)
    return mean - half, mean + half


def summarize(g, ci, method, n_resamples, seed, ref=0.0) -> pd.DataFrame:
    """Per group of the grouped column `g`: n, mean and sd, the interval of the mean
    (Student-t or a percentile bootstrap) and the p-value of the one-sample t-test of
    mean = ref (scipy.stats.ttest_1samp, vectorized)."""
    s = g.agg(["count", "mean", "std", "min", "max"]).rename(columns={"count": "n", "std": "sd"})
    if method == "t":
        s["low"], s["high"] = t_interval(s["mean"], s["sd"], s["n"], ci)
    else:
        arrays = g.apply(lambda v: v.dropna().to_numpy())
        s["low"], s["high"] = bootstrap_interval(arrays, ci, n_resamples, seed)
    # Identical replicates: a zero-width "interval" says nothing about the spread of the
    # mean (and the t-test is undefined), so there is none, and no mark from it.
    s["constant"] = (s["n"] >= 2) & (s["min"] == s["max"])
    s.loc[s["constant"], ["low", "high"]] = np.nan
    se = s["sd"] / np.sqrt(s["n"])
    dof = (s["n"] - 1).where(s["n"] > 1)
    s["p"] = 2 * stats.t.sf(np.abs((s["mean"] - ref) / se.where(se > 0)), dof)
    return s


def bootstrap_interval(arrays: pd.Series, ci, n_resamples, seed):
    """Percentile bootstrap of the mean of each array (NaN for fewer than two values).

    Groups with the same number of replicates go to scipy.stats.bootstrap together as the rows
    of one batch (axis=-1), which draws one set of resampling indices for all rows, exactly as
    a separate call per group with the same seed would: the same intervals, one call per
    replicate count and chunk instead of one per group (2,800 for 100 classes x 7 t x 4
    strategies). A chunk holds at most 2^23 resampled values (64 MB).
    """
    lo = pd.Series(np.nan, index=arrays.index)
    hi = lo.copy()
    lens = arrays.map(len).to_numpy()
    for n in np.unique(lens[lens >= 2]):
        where = np.flatnonzero(lens == n)
        values = np.stack(arrays.iloc[where].to_list())
        low, high = values[:, 0].copy(), values[:, 0].copy()  # constant rows: the value
        varying = np.flatnonzero((values != values[:, :1]).any(axis=1))
        chunk = max(1, 2**23 // (n_resamples * int(n)))
        for start in range(0, len(varying), chunk):
            rows = varying[start : start + chunk]
            res = stats.bootstrap(
                (values[rows],),
                np.mean,
                axis=-1,
                vectorized=True,
                confidence_level=ci,
                n_resamples=n_resamples,
                method="percentile",
                rng=np.random.default_rng(seed),
            )
            low[rows], high[rows] = res.confidence_interval.low, res.confidence_interval.high
        lo.iloc[where], hi.iloc[where] = low, high
    return lo, hi


def mark(low, high, n, ref: float = 1.0) -> pd.Series:
    """`<` CI below ref, `>` above, `?` overlapping it; empty without an interval (n = 1)."""
    out = np.where(high < ref, "<", np.where(low > ref, ">", "?"))
    out = np.where((n < 2) | low.isna() | high.isna(), "", out)
    return pd.Series(out, index=low.index)


ADJUSTMENTS = ("holm", "bh", "none")
ADJUSTMENT_NAMES = {"holm": "Holm (family-wise)", "bh": "Benjamini-Hochberg (false discovery)"}


def adjust_p(p: pd.Series, method: str) -> pd.Series:
    """p-values adjusted for the multiplicity of their family (the non-NaN entries of `p`):
    Holm's step-down, which bounds the chance of any false mark by the level, or
    Benjamini-Hochberg's step-up, which bounds the expected share of false marks; `none`
    leaves them as they are. Each adjusted p is >= its raw p, so adjusting only removes
    marks."""
    if method == "none":
        return p.copy()
    out = pd.Series(np.nan, index=p.index)
    values = p.dropna()
    m = len(values)
    if not m:
        return out
    order = np.argsort(values.to_numpy(), kind="stable")
    ranked = values.to_numpy()[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate((m - rank + 1) * ranked)
    else:  # bh
        adj = np.minimum.accumulate((m / rank * ranked)[::-1])[::-1]
    adj = np.minimum(adj, 1.0)
    result = np.empty(m)
    result[order] = adj
    out[values.index] = result
    return out


def adjusted_marks(low, high, n, p, shown, ci, adjust, ref):
    """(marks, adjusted p-values) of one table column, whose marks are one family: the cells
    that can carry a mark (an interval, shown). A cell keeps its `<` or `>` only where its
    adjusted p-value is below 1 - ci as well; the others of the family read `?`."""
    raw = mark(low, high, n, ref=ref).where(shown, "")
    family = raw != ""
    p_adj = adjust_p(p.where(family), adjust)
    keep = (p_adj < 1 - ci) | (adjust == "none")
    return raw.where(~raw.isin(["<", ">"]) | keep, "?"), p_adj


def note_family(notes, adjust, ci, what: str, p_adj: pd.Series) -> None:
    if notes is None or adjust == "none":
        return
    m = int(p_adj.notna().sum())
    if m:
        notes.append(
            f"marks of {what}: {ADJUSTMENT_NAMES[adjust]} adjusted p < {1 - ci:.2g} over its "
            f"family of {m} cells (every cell of the column that has an interval); p_value is "
            "the raw t-test, p_adjusted the adjusted one"
        )
