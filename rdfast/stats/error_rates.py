"""How pruning moves each class's error rates: CEV and SDE (Blakeney et al., "Simon Says:
Evaluating and Mitigating Bias in Pruned Neural Networks with Knowledge Distillation", 2021),
from the confusion matrices every step records, as their public code computes them.

Per class c, against the dense model (step 0) of the same run:
    FPR_c = FP_c / N_c  (N_c: test examples of the other classes),  FNR_c = FN_c / P_c,
    dFPR_c = (FPR_c,t - FPR_c,1) / FPR_c,1,   dFNR_c likewise;
    CEV_t = mean_c ||(dFPR_c, dFNR_c) - (mean dFPR, mean dFNR)||^2   (combined error variance)
    SDE_t = mean_c |dFNR_c - dFPR_c|                                  (symmetric distance error)
Both are 0 when every class's error rates change in the same proportion; they grow as the
classes pay unequally.

Zero rule: a dense rate of 0 (no false positive, or no false negative, of a class: common for
the MNIST models) makes the published relative change a division by zero. rdfast divides by
max(rate_1, 1 / n) instead, n = N_c for the FPR and P_c for the FNR: the rate of a single
error, the smallest non-zero rate the test set can show. A rate that stays 0 changes by 0; a
rate that rises from 0 to k errors changes by k. Where the dense rate is above 0 the result
is the published one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def class_error_rates(confusion: pd.DataFrame) -> pd.DataFrame:
    """Per (run_id, step, t, class): P, N, FN, FP and the rates FNR = FN / P, FPR = FP / N
    (NaN where P or N is 0), from the long confusion table (run_id, step, t_target, true,
    pred, count)."""
    keys = ["run_id", "step", "t_target"]
    cm = confusion.assign(wrong=np.where(confusion["true"] != confusion["pred"],
                                         confusion["count"], 0))  # fmt: skip
    by_true = cm.groupby([*keys, "true"], sort=True)[["count", "wrong"]].sum()
    by_pred = cm.groupby([*keys, "pred"], sort=True)["wrong"].sum()
    by_true.index.names = by_pred.index.names = [*keys, "class"]
    out = by_true.rename(columns={"count": "P", "wrong": "FN"}).join(by_pred.rename("FP"))
    out["FP"] = out["FP"].fillna(0)
    total = out.groupby(level=keys)["P"].transform("sum")
    out["N"] = total - out["P"]
    out["FNR"] = out["FN"] / out["P"].where(out["P"] > 0)
    out["FPR"] = out["FP"] / out["N"].where(out["N"] > 0)
    return out.reset_index().rename(columns={"t_target": "t"})


def relative_change(rate: pd.Series, dense_rate: pd.Series, n: pd.Series) -> pd.Series:
    """(rate - dense) / max(dense, 1 / n): the module's zero rule."""
    return (rate - dense_rate) / np.maximum(dense_rate, 1.0 / n)


def run_error_changes(confusion: pd.DataFrame) -> pd.DataFrame:
    """Per (run_id, t) of the pruned steps: cev and sde against the run's dense step."""
    cols = ["run_id", "t", "cev", "sde"]
    if confusion is None or confusion.empty:
        return pd.DataFrame(columns=cols)
    rates = class_error_rates(confusion)
    rates = rates[(rates["P"] > 0) & (rates["N"] > 0)]
    dense = rates.loc[rates["step"] == 0, ["run_id", "class", "FPR", "FNR"]]
    dense = dense.rename(columns={"FPR": "FPR1", "FNR": "FNR1"})
    pruned = rates[rates["step"] > 0].merge(dense, on=["run_id", "class"], how="inner")
    d_fpr = relative_change(pruned["FPR"], pruned["FPR1"], pruned["N"])
    d_fnr = relative_change(pruned["FNR"], pruned["FNR1"], pruned["P"])
    keys = [pruned["run_id"], pruned["t"]]
    centred_fpr = d_fpr - d_fpr.groupby(keys).transform("mean")
    centred_fnr = d_fnr - d_fnr.groupby(keys).transform("mean")
    per = pd.DataFrame({"sq": centred_fpr**2 + centred_fnr**2, "gap": (d_fnr - d_fpr).abs()})
    out = per.groupby(keys, sort=True).mean().rename(columns={"sq": "cev", "gap": "sde"})
    return out.reset_index()[cols]


def group_error_changes(runs: pd.DataFrame, by, ci, method, n_resamples, seed) -> pd.DataFrame:
    """Per (group, t): mean CEV and SDE of the runs with their intervals (both >= 0, and so
    are their intervals), indexed like `group_table`."""
    from rdfast.stats.intervals import summarize

    keys = [*by, "t"]
    pruned = runs[runs["step"] > 0]
    g = pruned.groupby(keys, sort=True, dropna=False)
    out = {}
    for name in ("cev", "sde"):
        s = summarize(g[name], ci, method, n_resamples, seed)
        out[f"mean_{name}"] = s["mean"]
        out[f"{name}_ci_low"] = s["low"].clip(lower=0.0)
        out[f"{name}_ci_high"] = s["high"]
    return pd.DataFrame(out)
