"""Tables over replicate models: per group E[alpha_t], accuracy and E[Psi_t] with intervals
and marks; per group and class the recall change; per pair of strategies (or mitigations)
the differences between runs of one dense model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rdfast.config import DEFAULT_FLOOR, MITIGATIONS, STRATEGY_ORDER
from rdfast.errors import BadInput
from rdfast.stats.intervals import (
    adjusted_marks,
    note_family,
    note_undercover,
    summarize,
    undercovering,
)
from rdfast.stats.measures import accuracy_floor
from rdfast.stats.records import MITIGATION_SETTINGS, STRATEGY_SETTINGS


def compared_column(baseline: str | None) -> str:
    return "mitigation" if baseline in MITIGATIONS else "strategy"


def class_group_table(
    classes: pd.DataFrame, by, ci: float, method="t", n_resamples=9999, seed=0
) -> pd.DataFrame:
    """Per (group, t, class): mean recall, its change since t = 1 with an interval over the
    replicates, the model's accuracy change, and the class's mean Bn_1, Bn_t and I.

    `mean_excess_change` = recall change - accuracy change: negative where a class loses more
    than the model does. Ranking classes by it within a group is ranking them by recall change.
    """
    keys = [*by, "t", "class"]
    c = classes.assign(
        change=classes["recall"] - classes["R1"], acc_change=classes["accuracy"] - classes["A1"]
    )
    g = c.groupby(keys, sort=True, dropna=False)  # grouped once, summarized twice
    change = summarize(g["change"], ci, method, n_resamples, seed)
    agg = g.agg(
        class_name=("class_name", "first"),
        support=("support", "mean"),
        mean_dense_recall=("R1", "mean"),
        mean_recall=("recall", "mean"),
        mean_accuracy_change=("acc_change", "mean"),
        mean_Bn1=("Bn1", "mean"),
        mean_Bn=("Bn", "mean"),
        mean_I=("I", "mean"),
    )
    agg.insert(0, "n", change["n"])
    agg.insert(5, "mean_recall_change", change["mean"])
    # A recall change lies in [-1, 1]; a t-interval of a few seeds can reach past it (-1.32
    # to -0.37 for a class that lost almost everything): it is cut there.
    agg.insert(6, "change_ci_low", change["low"].clip(lower=-1.0))
    agg.insert(7, "change_ci_high", change["high"].clip(upper=1.0))
    agg.insert(9, "mean_excess_change", change["mean"] - agg["mean_accuracy_change"])
    return agg.reset_index()


def paired_table(
    runs: pd.DataFrame,
    by,
    baseline: str,
    ci: float,
    method="t",
    n_resamples=9999,
    seed=0,
    notes: list[str] | None = None,
    floor: float = DEFAULT_FLOOR,
    adjust: str = "holm",
) -> pd.DataFrame:
    """Per (group, t): E[alpha_t(s) - alpha_t(baseline)] over the seeds, each difference taken
    between two runs that pruned the same dense model, with its interval, the paired t-test of
    no difference (scipy.stats.ttest_rel), and the same for accuracy and the disparity Psi_t
    (alpha's mark left out where either side's mean accuracy is at most `floor` x chance).
    `baseline` is a strategy (the others against it, under the same retraining) or a
    mitigation (`plain`: each mitigation against plain retraining, under the same strategy).

    Pairing removes the seed-to-seed spread of the dense models that the unpaired intervals
    of two groups carry, so a difference between strategies shows with fewer seeds.
    """
    by = list(by)
    pairs = pair_runs(runs, by, baseline, floor, notes)
    g = pairs.groupby([*by, "t"], sort=True, dropna=False)
    diff = summarize(g["diff"], ci, method, n_resamples, seed)
    acc = summarize(g["acc_diff"], ci, method, n_resamples, seed)
    psi = summarize(g["psi_diff"], ci, method, n_resamples, seed)
    # Either side's mean accuracy at the floor: no mark for the slopes' difference.
    means = g[["accuracy", "base_accuracy", "floor_accuracy"]].mean()
    below = np.minimum(means["accuracy"], means["base_accuracy"]) <= means["floor_accuracy"]
    below &= diff.index.get_level_values("t") > 1
    note_undercover(method, ci, diff["n"], notes)
    constant = (diff["constant"] | acc["constant"]) & (diff.index.get_level_values("t") > 1)
    if notes is not None and constant.any():
        notes.append(
            f"{int(constant.sum())} (group, t) of the comparison with {baseline} have the same "
            "difference in every pair: no interval and no mark there"
        )

    def columns(summary, prefix, what, hide=False):
        return _difference_columns(summary, prefix, what, hide, baseline, ci, method, adjust,
                                   notes)  # fmt: skip

    agg = pd.DataFrame(
        {
            "baseline": baseline,
            "n": diff["n"],
            **columns(diff, "", "alpha", hide=below),
            "below_floor": below,
            **columns(acc, "acc_", "accuracy"),
            **columns(psi, "disparity_", "Psi"),
        }
    )
    return agg.reset_index()


def pair_runs(runs: pd.DataFrame, by: list, baseline: str, floor: float, notes) -> pd.DataFrame:
    """Every run of `runs` beside its baseline partner (base_alpha, base_accuracy, base_psi),
    with the differences (diff, acc_diff, psi_diff) and the accuracy floor of the pair."""
    col = compared_column(baseline)
    what = "strategies" if col == "strategy" else "mitigations"
    if col not in by:
        raise BadInput(f"--vs {baseline} compares {what}: --by must include {col}")
    order = STRATEGY_ORDER if col == "strategy" else {m: i for i, m in enumerate(MITIGATIONS)}
    have = sorted(runs[col].unique(), key=lambda s: order.get(s, 9))
    if baseline not in have:
        raise BadInput(f"--vs {baseline}: no {baseline} runs in these records ({', '.join(have)})")
    # A pair is two runs that pruned the same dense model (dense_id: same seed and training)
    # under the same protocol (ratios, retraining), differing in `col` and its parameters
    # alone: eps belongs to the strategy (NaN for mp, the UP coefficient for up), the
    # temperature to kd. Runs without a partner are counted, not paired.
    # Settings grouped by (--by ceag_tolerance) belong to the side that has them: ceag at
    # tolerance 0.1 and at 0.01 are both paired with the same plain run.
    own = ("strategy", *STRATEGY_SETTINGS) if col == "strategy" else MITIGATION_SETTINGS
    same = ["dense_id", "protocol", "mitigation_settings" if col == "strategy" else
            "strategy_settings"]  # fmt: skip
    same = [c for c in same if c in runs.columns]
    keys = [b for b in by if b not in own] + ["seed", *same, "t"]
    is_base = runs[col] == baseline
    if col == "strategy" and "saliency" in by and runs.loc[is_base, "saliency"].nunique() > 1:
        # A baseline run in both score forms (gp taylor and gp sum): each form is compared
        # with its own (up sum against gp sum), and strategies without a form are left out.
        keys.append("saliency")
    base = runs.loc[is_base, [*keys, "alpha", "accuracy", "disparity"]].rename(
        columns={"alpha": "base_alpha", "accuracy": "base_accuracy", "disparity": "base_psi"}
    )
    pairs = runs[~is_base].merge(base, on=keys, how="inner")
    if notes is not None:
        _note_unpaired(runs[~is_base], base, pairs, keys, baseline, notes)
    return pairs.assign(
        diff=pairs["alpha"] - pairs["base_alpha"],
        acc_diff=pairs["accuracy"] - pairs["base_accuracy"],
        psi_diff=pairs["disparity"] - pairs["base_psi"],
        floor_accuracy=accuracy_floor(floor, pairs["n_classes_used"], pairs["dense_accuracy"]),
    )


def _difference_columns(summary, prefix, what, hide, baseline, ci, method, adjust, notes):
    """mean_{prefix}diff, its interval, raw and adjusted p-values and mark against 0 (none
    where `hide`); each column's marks are one family."""
    shown = ~undercovering(method, ci, summary["n"]) & ~hide
    marks, p_adj = adjusted_marks(summary["low"], summary["high"], summary["n"],
                                  summary["p"], shown, ci, adjust, ref=0.0)  # fmt: skip
    note_family(notes, adjust, ci, f"the {what} difference against {baseline}", p_adj)
    return {
        f"mean_{prefix}diff": summary["mean"],
        f"{prefix}ci_low": summary["low"],
        f"{prefix}ci_high": summary["high"],
        f"{prefix}p_value": summary["p"],  # = scipy.stats.ttest_rel of the pairs
        f"{prefix}p_adjusted": p_adj,
        f"{prefix}mark": marks,
    }


def _note_unpaired(others, base, pairs, keys, baseline, notes) -> None:
    """How many runs found no baseline partner, and why (another dense model, or the same
    dense model under other settings)."""
    lone = set(others["run_id"]) - set(pairs["run_id"])
    if not lone:
        return
    lone_runs = others[others["run_id"].isin(lone)].drop_duplicates("run_id")
    dense_keys = [k for k in keys if k not in ("protocol", "t", "strategy_settings",
                                               "mitigation_settings")]  # fmt: skip
    same_dense = lone_runs.merge(base[dense_keys].drop_duplicates(), on=dense_keys, how="inner")
    n_other_settings = same_dense["run_id"].nunique()
    n_no_dense = len(lone) - n_other_settings
    why = []
    if n_no_dense:
        why.append(f"{n_no_dense} have no {baseline} run on the same dense model")
    if n_other_settings:
        why.append(
            f"{n_other_settings} share the dense model with a {baseline} run but not its "
            "ratios, retraining or own settings"
        )
    notes.append(
        f"{len(lone)} runs are left out of the comparison with {baseline}: {'; '.join(why)}"
    )


def group_table(
    runs, classes, by, ci, method, n_resamples=9999, seed=0, notes=None, floor=DEFAULT_FLOOR,
    adjust="holm",
) -> pd.DataFrame:  # fmt: skip
    keys = [*by, "t"]
    g = runs.groupby(keys, sort=True, dropna=False)
    alpha = summarize(g["alpha"], ci, method, n_resamples, seed, ref=1.0)
    acc = summarize(g["accuracy"], ci, method, n_resamples, seed)
    # The floor of each run's classes (those the slope was fitted on), averaged per group.
    floors = pd.Series(
        accuracy_floor(floor, runs["n_classes_used"], runs["dense_accuracy"]), index=runs.index
    )
    group_floor = floors.groupby([runs[k] for k in keys], sort=True, dropna=False).mean()
    below = (acc["mean"] <= group_floor) & (alpha.index.get_level_values("t") > 1)
    if notes is not None and below.any():
        notes.append(
            f"{int(below.sum())} (group, t) cells have a mean accuracy at most {floor:g} x "
            "chance or halfway from chance to the dense accuracy: their E[alpha_t] is not "
            "shown and has no mark (alpha divides by the accuracy; E[Psi_t] is shown; "
            "--floor 0 shows alpha too)"
        )
    note_undercover(method, ci, alpha["n"], notes)
    if notes is not None:
        undefined = runs.loc[runs["alpha"].isna() & (runs["step"] > 0), "run_id"].nunique()
        if undefined:
            notes.append(
                f"alpha undefined for {undefined} runs (Bn_1 = 0 for every class: each class's "
                "dense recall equals the accuracy): left out of their groups' n"
            )
        constant = alpha["constant"] & (alpha.index.get_level_values("t") > 1)
        if constant.any():
            notes.append(
                f"{int(constant.sum())} (group, t) have the same alpha in every replicate: "
                "no interval and no mark there"
            )
    psi = summarize(g["disparity"], ci, method, n_resamples, seed)
    shown = ~undercovering(method, ci, alpha["n"]) & ~below
    marks, p_adj = adjusted_marks(alpha["low"], alpha["high"], alpha["n"], alpha["p"], shown, ci,
                                  adjust, ref=1.0)  # fmt: skip
    note_family(notes, adjust, ci, "E[alpha_t] against 1", p_adj)
    agg = pd.DataFrame(
        {
            "n": alpha["n"],
            "mean_alpha": alpha["mean"],
            "ci_low": alpha["low"],
            "ci_high": alpha["high"],
            "p_value": alpha["p"],  # the one-sample t-test of E[alpha] = 1
            "p_adjusted": p_adj,
            "mark": marks,
            "mean_accuracy": acc["mean"],
            # Accuracy lies in [0, 1] and Psi in [0, 2]: so do their intervals.
            "acc_ci_low": acc["low"].clip(lower=0.0),
            "acc_ci_high": acc["high"].clip(upper=1.0),
            "accuracy_floor": group_floor,
            "below_floor": below,
            "mean_disparity": psi["mean"],
            "disparity_ci_low": psi["low"].clip(lower=0.0),
            "disparity_ci_high": psi["high"].clip(upper=2.0),
        }
    )
    if "seconds" in runs.columns:  # analyze(cost=True)
        # The median: a step that waited on a stopped or crowded machine is one seed's outlier.
        agg["median_seconds"] = g["seconds"].median()
    # Pooled slope: every class of every replicate in one fit (what a scatter plot shows).
    c = classes.assign(xy=classes["Bn1"] * classes["Bn"], xx=classes["Bn1"] ** 2)
    pooled = c.groupby(keys, sort=True, dropna=False)[["xy", "xx"]].sum()
    agg["pooled_alpha"] = pooled["xy"] / pooled["xx"].where(pooled["xx"] > 0)
    return agg.reset_index()
