"""Groups that differ in one setting alone (the dataset, the width) compared with the group of
a reference value: E[alpha_t], accuracy and E[Psi_t] differences of means with Welch's
interval and t-test, unpaired, since groups that differ in the dataset or the width share no
dense model (`comparisons.paired_table` pairs strategies and mitigations on one dense model;
for settings whose groups do share them, such as finetune_epochs, unpaired is conservative).

Claim 4 ("harder datasets intensify more") and claim 5 ("smaller models intensify more") are
such comparisons: `analyze --across dataset=mnist` or `--across width=1`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from rdfast.errors import BadInput
from rdfast.stats.intervals import adjusted_marks, note_family

# (column prefix in the table, run measure)
MEASURES = (("", "alpha"), ("acc_", "accuracy"), ("disparity_", "disparity"))
WHAT = {"": "alpha", "acc_": "accuracy", "disparity_": "Psi"}


def parse_across(text) -> tuple[str, str] | None:
    """`dataset=mnist` as ("dataset", "mnist"); None or "" as None."""
    if text is None or text == "":
        return None
    if isinstance(text, tuple):
        return text
    column, sep, value = str(text).partition("=")
    if not sep or not column.strip() or not value.strip():
        raise BadInput(f"--across takes COLUMN=VALUE (e.g. dataset=mnist), got {text!r}")
    return column.strip(), value.strip()


def reference_value(values: pd.Series, column: str, text: str):
    """The value of `column` that `text` names: equal as text, or as a number (width=1 is
    width 1.0); a manifest setting's column holds "name=value" (finetune_epochs=3 is named by
    3 as well)."""
    have = list(pd.unique(values))
    for v in have:
        shown = str(v).removeprefix(f"{column}=")
        if text in (str(v), shown):
            return v
        try:
            if float(shown) == float(text):
                return v
        except (TypeError, ValueError):
            pass
    named = ", ".join(sorted(str(v) for v in have))
    raise BadInput(f"--across {column}={text}: no such {column} in these runs ({named})")


def welch(m1, v1, n1, m2, v2, n2, ci):
    """(difference m1 - m2, its interval low and high, p-value) of Welch's unequal-variance
    t-test and interval (Welch-Satterthwaite degrees of freedom), elementwise; NaN where a
    side has fewer than two values or both have no spread."""
    a, b = v1 / n1, v2 / n2
    se = np.sqrt(a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1))
        ok = (n1 >= 2) & (n2 >= 2) & (se > 0)
        se, dof = np.where(ok, se, np.nan), np.where(ok, dof, np.nan)
        d = m1 - m2
        half = stats.t.ppf((1 + ci) / 2, dof) * se
        p = 2 * stats.t.sf(np.abs(d) / se, dof)
    return d, d - half, d + half, p


def across_table(runs, groups, by, across, ci, adjust="holm", notes=None) -> pd.DataFrame:
    """Per (group, t) whose `column` differs from the reference: the differences of the mean
    alpha, accuracy and Psi from the group with the reference value and every other group
    setting equal, Welch's interval and p-value, raw and adjusted, and marks (alpha's none
    where either group sits at the accuracy floor, `groups.below_floor`). Each column's
    marks are one family, as in the paired table."""
    column, text = across
    by = list(by)
    if column not in by:
        raise BadInput(f"--across {column}=... compares values of {column}: --by must include it")
    ref = reference_value(runs[column], column, text)
    keys = [*by, "t"]
    g = runs.groupby(keys, sort=True, dropna=False)
    s = g.agg(**{f"{prefix}{k}": (m, k) for prefix, m in MEASURES
                 for k in ("count", "mean", "var")})  # fmt: skip
    floor = groups.set_index(keys)["below_floor"].astype(bool)
    s = s.assign(below_floor=floor.reindex(s.index).fillna(False).astype(bool)).reset_index()
    rest = [k for k in keys if k != column]
    is_ref = s[column] == ref
    base = s.loc[is_ref].drop(columns=column)
    pairs = s.loc[~is_ref].merge(base, on=rest, how="inner", suffixes=("", "_ref"))
    if notes is not None:
        lone = s.loc[~is_ref, by].drop_duplicates().merge(
            pairs[by].drop_duplicates(), how="left", indicator=True)  # fmt: skip
        n_lone = int((lone["_merge"] == "left_only").sum())
        if n_lone:
            shown = str(ref).removeprefix(f"{column}=")
            notes.append(f"{n_lone} groups have no {column}={shown} group with their other "
                         f"settings: not compared across {column}")  # fmt: skip
    if pairs.empty:
        return pd.DataFrame()
    out = pairs[keys].assign(across=column, reference=ref)
    out["n"], out["n_reference"] = pairs["count"], pairs["count_ref"]
    for prefix, _ in MEASURES:
        side = pairs[[f"{prefix}{k}" for k in ("mean", "var", "count")]].to_numpy().T
        ref_side = pairs[[f"{prefix}{k}_ref" for k in ("mean", "var", "count")]].to_numpy().T
        d, lo, hi, p = welch(*side, *ref_side, ci)
        n1, n2 = side[2], ref_side[2]
        shown = pd.Series(np.isfinite(lo), index=pairs.index) & (pairs["t"] > 1)
        if prefix == "":
            below = (pairs["below_floor"] | pairs["below_floor_ref"]) & (pairs["t"] > 1)
            shown &= ~below
            out["below_floor"] = below
        low, high = pd.Series(lo, index=pairs.index), pd.Series(hi, index=pairs.index)
        p = pd.Series(p, index=pairs.index)
        marks, p_adj = adjusted_marks(low, high, np.minimum(n1, n2), p, shown, ci, adjust, 0.0)
        note_family(notes, adjust, ci, f"the {WHAT[prefix]} difference across {column} "
                    f"against {ref}", p_adj)  # fmt: skip
        out[f"mean_{prefix}diff"] = d
        out[f"{prefix}ci_low"], out[f"{prefix}ci_high"] = low, high
        out[f"{prefix}p_value"] = p  # = scipy.stats.ttest_ind(equal_var=False)
        out[f"{prefix}p_adjusted"], out[f"{prefix}mark"] = p_adj, marks
    return out.reset_index(drop=True)
