"""Text from an `Analysis`: the paper's group x t tables with their marks, the classes that
pay, the paired comparison, legends and Markdown. Formatting only; the statistics live in
`rdfast.stats`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rdfast.config import STRATEGY_ORDER
from rdfast.stats import Analysis
from rdfast.stats.records import MITIGATION_SETTINGS, STRATEGY_SETTINGS


def group_label(row, by) -> str:
    parts = []
    for b in by:
        v = row[b]
        if (b == "saliency" and v == "none") or v == "":  # "": a setting this run lacks
            continue
        # Numbers name their setting ("width 0.5"); names speak for themselves.
        parts.append(f"{b} {v:g}" if isinstance(v, (float, int)) else str(v))
    return " ".join(parts)


def sorted_groups(groups, by):
    order = groups[list(by)].drop_duplicates()
    if "strategy" in by:
        order = order.assign(_s=order["strategy"].map(STRATEGY_ORDER).fillna(9))
        order = order.sort_values(["_s", *[b for b in by if b != "strategy"]], kind="stable")
        order = order.drop(columns="_s")
    return order


def _cell(value, mark_, n, fmt) -> str:
    """`1.12>`: a mean and its mark, `(n=1)` where there is no interval, `-` where no mean."""
    if np.isnan(value):
        return "-"
    return f"{value:{fmt}}{mark_}" + (" (n=1)" if n < 2 else "")


def _by_t(frame: pd.DataFrame, a: Analysis, cells) -> pd.DataFrame:
    """Rows: the groups of `frame` in table order; columns: t; values: `cells` (one per row)."""
    order = [group_label(r, a.by) for _, r in sorted_groups(frame, a.by).iterrows()]
    tab = pd.DataFrame(
        {
            "group": frame.apply(lambda r: group_label(r, a.by), axis=1),
            "t": frame["t"],
            "cell": list(cells),
        }
    ).pivot(index="group", columns="t", values="cell")
    tab.columns = [f"t={c:g}" for c in tab.columns]
    tab.index.name = None
    return tab.reindex([o for o in order if o in tab.index]).fillna("")


def flips_tables(a: Analysis) -> dict[str, pd.DataFrame]:
    """{title: group x t table} of the mean flip rate and the PIE share (%, two decimals)."""
    f = a.flips
    if f is None or f.empty or f.groups.empty:
        return {}
    g = f.groups
    return {
        "flip rate: % of test predictions that differ from the run's own dense model (mean "
        "over seeds)": _by_t(g, a, [f"{100 * v:.2f}" for v in g["mean_flip_rate"]]),
        "PIE share: % of test examples whose modal prediction over the seeds' pruned models "
        "differs from their dense models' (Hooker et al. 2019)": _by_t(
            g, a, [f"{100 * v:.2f}" for v in g["pie_share"]]
        ),
    }


BELOW_FLOOR = "--"  # a cell whose mean accuracy is at most the floor: alpha not shown


def _alpha_cells(frame, mean, mark_, fmt):
    return [
        BELOW_FLOOR if low else _cell(v, m, n, fmt)
        for v, m, n, low in zip(frame[mean], frame[mark_], frame["n"], frame["below_floor"])
    ]


def paper_tables(a: Analysis) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows: groups; columns: t. Cells `1.12>` (E[alpha_t] and its mark; `--` at or below the
    accuracy floor), then accuracy."""
    g = a.groups
    pruned = g[g["t"] > 1]
    alpha = _alpha_cells(pruned, "mean_alpha", "mark", ".2f")
    acc = [f"{v:.3f}" for v in g["mean_accuracy"]]
    return _by_t(pruned, a, alpha), _by_t(g, a, acc)


def disparity_table(a: Analysis) -> pd.DataFrame:
    """Rows: groups; columns: t > 1; cells E[Psi_t] over seeds with its interval."""
    return interval_table(a, "disparity")


def interval_table(a: Analysis, name: str) -> pd.DataFrame:
    """Rows: groups; columns: t > 1; cells the mean of the run measure `name` over seeds with
    its interval (group columns mean_<name>, <name>_ci_low, <name>_ci_high)."""
    g = a.groups[a.groups["t"] > 1]
    cells = [
        "-" if np.isnan(v) else f"{v:.3f}" + ("" if np.isnan(lo) else f" ({lo:.3f} to {hi:.3f})")
        for v, lo, hi in zip(g[f"mean_{name}"], g[f"{name}_ci_low"], g[f"{name}_ci_high"])
    ]
    return _by_t(g, a, cells)


def has_cost(a: Analysis) -> bool:
    """Whether the groups carry the median wall seconds of a pruning step (records that hold
    them; tables written before they were kept do not)."""
    g = a.groups
    return "median_seconds" in g.columns and bool(g.loc[g["t"] > 1, "median_seconds"].notna().any())


COST_LEGEND = (
    "seconds a pruning step takes (prune, retrain, evaluate), median over seeds: wall time "
    "on the machine that ran the study, so compare only groups that ran alike (at the same "
    "time, with the same load)"
)


def cost_table(a: Analysis) -> pd.DataFrame:
    """Rows: groups; columns: t > 1; cells the median wall seconds of the step reaching t."""
    g = a.groups[a.groups["t"] > 1]
    return _by_t(g, a, ["-" if np.isnan(v) else f"{v:.1f}" for v in g["median_seconds"]])


def has_error_changes(a: Analysis) -> bool:
    return "mean_cev" in a.groups.columns and bool(a.groups["mean_cev"].notna().any())


def error_change_legend(a: Analysis, name: str) -> str:
    what = {
        "cev": "CEV_t, the combined error variance: the spread over classes of the relative "
        "changes of their false positive and false negative rates",
        "sde": "SDE_t, the symmetric distance error: the mean over classes of |dFNR_c - "
        "dFPR_c|, their relative changes",
    }[name]
    return (
        f"E[{name.upper()}_t] over seeds with its {a.ci * 100:g} % {_method_name(a)} interval: "
        f"{what} (Blakeney et al. 2021; 0: every class's rates changed in the same proportion; "
        "a dense rate of 0 divides as the rate of one error)"
    )


def disparity_legend(a: Analysis) -> str:
    return (
        "E[Psi_t] over seeds with its " f"{a.ci * 100:g} % {_method_name(a)} interval: Psi_t = "
        "max_c psi_c - min_c psi_c, psi_c = (R_1^c - R_t^c) - (A_1 - A_t), the spread of the "
        "classes' excess recall drops (0: every class lost what the model lost; at most 2)"
    )  # fmt: skip


def floor_legend(a: Analysis) -> str:
    return (
        f"{BELOW_FLOOR}: mean accuracy at most {a.floor:g} x chance (--floor) or at most halfway "
        "from chance to the dense accuracy, where alpha (which divides by the accuracy) means "
        "nothing; see E[Psi_t]"
    )


def at_largest_t(a: Analysis) -> pd.DataFrame:
    """The rows of `class_groups` at each group's largest t (t > 1)."""
    cg = a.class_groups[a.class_groups["t"] > 1]
    return cg[cg["t"] == cg.groupby(list(a.by), dropna=False)["t"].transform("max")]


def paying_classes(a: Analysis, top: int) -> pd.DataFrame:
    """The `top` classes of each group that lose the most recall at the group's largest t."""
    cg = at_largest_t(a)
    if cg.empty or top <= 0:
        return pd.DataFrame()
    keys = list(a.by)
    cg = cg.sort_values([*keys, "mean_recall_change", "class"], kind="stable")
    cg = cg.groupby(keys, dropna=False, sort=False).head(top)
    order = {group_label(r, a.by): i for i, (_, r) in enumerate(sorted_groups(cg, a.by).iterrows())}
    pct = f"{a.ci * 100:g} %"
    out = pd.DataFrame(
        {
            "group": cg.apply(lambda r: group_label(r, a.by), axis=1),
            "t": cg["t"].map(lambda v: f"{v:g}"),
            "class": cg["class_name"].astype(str),
            "dense recall": cg["mean_dense_recall"].map(lambda v: f"{v:.3f}"),
            "recall": cg["mean_recall"].map(lambda v: f"{v:.3f}"),
            "change": cg["mean_recall_change"].map(lambda v: f"{v:+.3f}"),
            f"{pct} CI": [
                "" if np.isnan(lo) else f"{lo:+.3f} to {hi:+.3f}"
                for lo, hi in zip(cg["change_ci_low"], cg["change_ci_high"])
            ],
            "accuracy change": cg["mean_accuracy_change"].map(lambda v: f"{v:+.3f}"),
        }
    )
    out = out.iloc[np.argsort(out["group"].map(order).to_numpy(), kind="stable")]
    return out.set_index("group")


def paying_legend(a: Analysis, top: int) -> str:
    return (
        f"The {top} classes of each group that lose the most recall at its largest t: "
        f"mean recall at t = 1 and at t over seeds, the change with its {a.ci * 100:g} % "
        f"{_method_name(a)} interval, and the model's accuracy change for comparison. The "
        "classes are picked by their drop, after looking at the data: each interval holds for "
        "its class alone and overstates how surely the picked classes are the ones that pay"
    )


def paired_tables(a: Analysis) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rows: strategies (or mitigations) other than the baseline; columns: t; cells `-0.05<`
    (E[difference] and its mark against 0), for alpha, accuracy and Psi."""
    return _difference_tables(a, a.paired)


def across_tables(a: Analysis) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rows: the groups whose --across setting is not the reference; columns: t; cells
    `+0.31>` (the difference of means from the reference group, and its mark against 0), for
    alpha, accuracy and Psi."""
    return _difference_tables(a, a.across)


def _difference_tables(a: Analysis, frame: pd.DataFrame):
    p = frame[frame["t"] > 1]
    alpha = _alpha_cells(p, "mean_diff", "mark", "+.2f")
    acc = [_cell(*r, "+.3f") for r in zip(p["mean_acc_diff"], p["acc_mark"], p["n"])]
    psi = [_cell(*r, "+.3f") for r in zip(p["mean_disparity_diff"], p["disparity_mark"], p["n"])]
    return _by_t(p, a, alpha), _by_t(p, a, acc), _by_t(p, a, psi)


def paired_legend(a: Analysis) -> str:
    baseline = a.baseline
    return (
        f"E[alpha_t(s) - alpha_t({baseline})], E[A_t(s) - A_t({baseline})] and E[Psi_t(s) - "
        f"Psi_t({baseline})] over seeds, each "
        f"difference between two runs that pruned the same dense model; mark: < "
        f"{a.ci * 100:g} % CI below 0, > above 0, ? overlaps 0 ({_method_name(a)})"
        f"{_adjust_words(a)}"
    )


def across_legend(a: Analysis) -> str:
    column, ref = a.across_setting
    ref = setting_text(column, ref)
    return (
        f"E[alpha_t | {column} v] - E[alpha_t | {ref}], the same for accuracy and Psi_t: "
        f"differences of the means over seeds between each group and the group of {ref} "
        "with the same other settings, unpaired (Welch's interval and t-test: groups that "
        f"differ in a setting need not share dense models); mark: < {a.ci * 100:g} % CI below "
        f"0, > above 0, ? overlaps 0{_adjust_words(a)}"
    )


def setting_text(column: str, v) -> str:
    """A setting's value in words: `width 1`, `dataset mnist`, or a manifest setting's own
    `finetune_epochs=3`."""
    if isinstance(v, str) and v.startswith(f"{column}="):
        return v
    return f"{column} {v:g}" if isinstance(v, (float, int)) else f"{column} {v}"


def _adjust_words(a: Analysis) -> str:
    """How the marks of a table column survive its multiplicity, in a legend's words."""
    if a.adjust == "none":
        return "; each cell alone (--adjust none: no multiplicity control)"
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg"}[a.adjust]
    return (
        f"; < and > also need a {name}-adjusted p < {1 - a.ci:.2g} over the column's cells "
        "(--adjust)"
    )


def markdown(df: pd.DataFrame, index_name: str = "group") -> str:
    head = [index_name, *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def _method_name(a: Analysis) -> str:
    return "Student-t" if a.ci_method == "t" else "bootstrap (percentile)"


def legend(a: Analysis) -> str:
    pct = f"{a.ci * 100:g} %"
    method = _method_name(a)
    return (
        f"E[alpha_t] over seeds; mark: < {pct} CI below 1 (de-intensification), "
        f"> above 1 (intensification), ? overlaps 1; {method} interval{_adjust_words(a)}"
    )


# What a summary line compares: the strategies and mitigations, with their own settings
# when grouped by them (--by ceag_tolerance).
COMPARED = ("strategy", "saliency", "mitigation", *STRATEGY_SETTINGS, *MITIGATION_SETTINGS)


def summary(a: Analysis, top: int = 2) -> list[str]:
    """The answer first, in sentences: per setting (the groups' keys other than strategy,
    saliency and mitigation), at its largest t, the strategy with the least and the most
    disparity E[Psi_t] with its accuracy, and the `top` classes that lose the most recall
    under each of the two; then how many marks survive the multiplicity control."""
    keys = [b for b in a.by if b not in COMPARED]
    pruned = a.groups[a.groups["t"] > 1]
    if pruned.empty:
        return []
    cg = at_largest_t(a)
    lines = []
    for setting, sub in pruned.groupby(keys, dropna=False, sort=True) if keys else [((), pruned)]:
        last = sub[sub["t"] == sub["t"].max()].sort_values(["mean_disparity", "mean_accuracy"])
        values = setting if isinstance(setting, tuple) else (setting,)
        where = group_label(dict(zip(keys, values)), keys)
        ends = [last.iloc[0]] if len(last) == 1 else [last.iloc[0], last.iloc[-1]]
        said = []
        for row, what in zip(ends, ("least", "most")):
            psi, acc = row["mean_disparity"], row["mean_accuracy"]
            paying = _paying(cg, row, a.by, top)
            label = _compared_label(row, a.by)
            said.append(f"{what} {label} (E[Psi] {psi:.3f}, accuracy {acc:.3f}{paying})")
        lines.append(f"{where or 'All groups'}, t = {last['t'].iloc[0]:g}: disparity "
                     + "; ".join(said) + ".")  # fmt: skip
    lines.append(_surviving_marks(a))
    return lines


def _compared_label(row, by) -> str:
    return group_label(row, [b for b in by if b in COMPARED]) or "all"


def _paying(cg: pd.DataFrame, row, by, top: int) -> str:
    mine = cg[np.logical_and.reduce([cg[b] == row[b] for b in by])] if len(cg) else cg
    mine = mine.sort_values(["mean_recall_change", "class"]).head(top)
    if mine.empty or top <= 0:
        return ""
    named = ", ".join(
        f"{r['class_name']} ({r['mean_recall_change']:+.3f})" for _, r in mine.iterrows()
    )
    return f"; its classes that pay most: {named}"


def _surviving_marks(a: Analysis) -> str:
    how = "each interval alone" if a.adjust == "none" else {
        "holm": "Holm", "bh": "Benjamini-Hochberg"}[a.adjust] + "-adjusted"  # fmt: skip
    g = a.groups[(a.groups["t"] > 1) & (a.groups["mark"] != "")]
    parts = [f"{int(g['mark'].isin(['<', '>']).sum())} of {len(g)} E[alpha_t] cells"]
    compared = []
    if a.paired is not None:
        compared.append((a.paired, a.baseline))
    if a.across_setting is not None:
        compared.append((a.across, setting_text(*a.across_setting)))
    for table, against in compared:
        p = table[table["t"] > 1]
        for prefix, what in (("", "alpha"), ("acc_", "accuracy"), ("disparity_", "Psi")):
            m = p[f"{prefix}mark"]
            parts.append(f"{int(m.isin(['<', '>']).sum())} of {int((m != '').sum())} {what} "
                         f"differences against {against}")  # fmt: skip
    return (f"Marked at {a.ci * 100:g} % ({how}): " + ", ".join(parts) + ". What is "
            "unmarked is not told apart from the seeds' spread at this level.")  # fmt: skip
