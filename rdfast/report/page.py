"""Figures and a self-contained report (HTML + Markdown) from an `Analysis`."""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from rdfast import outdir  # noqa: E402
from rdfast.config import STRATEGY_ORDER  # noqa: E402
from rdfast.errors import BadInput  # noqa: E402
from rdfast.report import examples  # noqa: E402
from rdfast.report.tables import (  # noqa: E402
    COMPARED,
    COST_LEGEND,
    across_legend,
    across_tables,
    at_largest_t,
    cost_table,
    disparity_legend,
    disparity_table,
    error_change_legend,
    floor_legend,
    group_label,
    has_cost,
    has_error_changes,
    interval_table,
    legend,
    markdown,
    paired_legend,
    paired_tables,
    paper_tables,
    paying_classes,
    paying_legend,
    setting_text,
    sorted_groups,
    summary,
)
from rdfast.runs.manifests import settings_table  # noqa: E402
from rdfast.stats import Analysis, accuracy_floor  # noqa: E402

COLORS = {
    "mp": "tab:blue",
    "gp": "tab:orange",
    "up": "tab:green",
    "rp": "tab:red",
    "rp-layer": "tab:purple",
    "cs": "tab:brown",
}


def _color(i: int, name: str):
    return COLORS.get(name, plt.get_cmap("tab10")(i % 10))


def _in_group(frame: pd.DataFrame, key: pd.Series, by) -> np.ndarray:
    """Rows of `frame` that belong to the group `key` (a row of `sorted_groups`)."""
    sel = np.ones(len(frame), dtype=bool)
    for b in by:
        sel &= (frame[b] == key[b]).to_numpy()
    return sel


def _robust_ylim(values: np.ndarray):
    """Whole range unless a few extreme values (random pruning at high t) would flatten the rest."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [2, 98])
    pad = 0.15 * max(hi - lo, 0.5)
    lo, hi = min(lo - pad, 0.5), max(hi + pad, 1.5)
    return (lo, hi) if (v.min() < lo or v.max() > hi) else None


NO_ALPHA = "no pruned model above its accuracy floor: no alpha_t to show\n(see E[Psi_t])"


def alpha_boxplot(
    runs: pd.DataFrame, path: Path, panel: str | None = None, title: str = "", floor=None,
    by=("strategy",),
):  # fmt: skip
    """Boxes of alpha_t(m) against t, one colour per strategy (per strategy, score form and
    mitigation where `by` tells them apart: gp and gp taylor-max, mp and mp kd get boxes of
    their own); a panel per value of `panel`.
    Models at or below their accuracy floor (`stats.accuracy_floor`; `floor` None: every
    model) are left out: a collapsed model's alpha means nothing and, at -7 to 20 for random
    pruning, would set the axis that shows 0.8-1.3 for the others."""
    runs = runs[runs["t"] > 1]
    if floor is not None and "dense_accuracy" in runs:
        low = accuracy_floor(floor, runs["n_classes_used"], runs["dense_accuracy"])
        runs = runs[runs["accuracy"] > low]
    if runs.empty or runs["alpha"].notna().sum() == 0:  # every model at or below its floor
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, NO_ALPHA, ha="center", va="center", fontsize=10)
        _save(fig, path, dpi=110)
        return
    compared = [b for b in by if b in COMPARED and b in runs.columns] or ["strategy"]
    # One label per group, not per row: a study's runs table has thousands of rows.
    codes = runs.groupby(compared, dropna=False, sort=False).ngroup().to_numpy()
    _, first = np.unique(codes, return_index=True)
    labels = np.array([group_label(runs.iloc[i], compared) for i in first], dtype=object)
    runs = runs.assign(strategy=labels[codes])
    panels = sorted(runs[panel].unique()) if panel else [None]
    strategies = sorted(set(runs["strategy"]),
                        key=lambda s: (STRATEGY_ORDER.get(s.split()[0], 9), s))  # fmt: skip
    ts = sorted(runs["t"].unique())
    # At most three panels a row, so that many datasets or widths wrap instead of making
    # a figure too wide to read on a page.
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(6, 1.1 * len(ts) * ncols + 2), 4.2 * nrows),
        sharey=True,
        squeeze=False,
    )
    flat = axes.ravel()
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    clipped = False
    for ax, pv in zip(flat, panels):
        sub = runs if pv is None else runs[runs[panel] == pv]
        _alpha_panel(ax, sub, strategies, ts)
        ax.set_title(f"{panel} = {pv}" if panel else "all runs")
        lim = _robust_ylim(sub["alpha"].to_numpy())
        if lim:
            ax.set_ylim(*lim)
            clipped = True
    for row in axes:
        row[0].set_ylabel("alpha_t(m): slope of Bn_t on Bn_1")
    handles = [Patch(color=_color(j, s), alpha=0.6, label=s) for j, s in enumerate(strategies)]
    handles.append(plt.Line2D([], [], ls="", marker="o", color="grey", label="one model (seed)"))
    handles.append(plt.Line2D([], [], ls="--", color="black", label="alpha = 1 (no change)"))
    flat[len(panels) - 1].legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8
    )  # beside the panels, not on them
    note = " (y axis clipped; extreme values off-scale)" if clipped else ""
    fig.suptitle(
        (title or "Model-level intensification alpha_t per strategy")
        + note
        + "\nt = total / remaining weights; above 1: intensification, below 1: "
        "de-intensification",
        fontsize=10,
    )
    _save(fig, path, dpi=110)


def _alpha_panel(ax, sub: pd.DataFrame, strategies: list, ts: list) -> None:
    """One panel of `alpha_boxplot`: per t, a box per strategy with every model on top."""
    width = 0.8 / len(strategies)
    for j, s in enumerate(strategies):
        data = [
            sub.loc[(sub["strategy"] == s) & (sub["t"] == t), "alpha"].dropna().to_numpy()
            for t in ts
        ]
        pos = np.arange(len(ts)) + (j - (len(strategies) - 1) / 2) * width
        # Boxes where there are enough models to summarize (5 or more), and every
        # model as a point on top: identical replicates show as one point, not as a
        # collapsed box whose median line reads like another strategy.
        boxed = [k for k, d in enumerate(data) if len(d) >= 5]
        if boxed:
            bp = ax.boxplot(
                [data[k] for k in boxed],
                positions=pos[boxed],
                widths=width * 0.9,
                patch_artist=True,
                showfliers=False,
            )
            for box in bp["boxes"]:
                box.set_facecolor(_color(j, s))
                box.set_alpha(0.35)
        for k, d in enumerate(data):
            if len(d):
                spread = np.linspace(-0.2, 0.2, len(d)) * width if len(d) > 1 else [0.0]
                ax.scatter(pos[k] + np.asarray(spread), d, s=12, color=_color(j, s),
                           edgecolors="black", linewidths=0.3, zorder=3)  # fmt: skip
    ax.axhline(1.0, ls="--", color="black", lw=1)
    ax.set_xticks(np.arange(len(ts)), [f"{t:g}" for t in ts])
    ax.set_xlabel("pruning ratio t")


def _save(fig, path: Path, dpi: int) -> None:
    """Lay out a figure under its suptitle and write it (a legend placed outside the panels
    included). Constrained layout gives the title the height its lines take: tight_layout
    with a rectangle kept free for it counted the title twice, leaving a blank band of half
    an inch above the panels."""
    fig.set_layout_engine("constrained")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _group_legend(axes) -> None:
    """The groups' legend: inside the first panel for a few short lines, beside the last one
    for more or longer ones (24 groups of the mitigation study, or six labels of 60
    characters naming a dataset option and a setting, would cover the panel)."""
    handles, labels = axes[0].get_legend_handles_labels()
    n = len(labels)
    if n <= 8 and max(map(len, labels), default=0) <= 40:
        axes[0].legend(fontsize=7)
    elif n <= 8:  # long labels: under the panels, which keep their width
        axes[0].figure.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=2)
    else:
        axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1),
                        borderaxespad=0, ncol=1 if n <= 30 else 2)  # fmt: skip


def scatter_grid(a: Analysis, path: Path, ts: list[float]):
    """Bn_t against Bn_1 over all classes and replicates of each group, with the pooled slope."""
    c = a.classes
    groups = sorted_groups(a.groups, a.by)
    fig, axes = plt.subplots(
        len(groups), len(ts), figsize=(3.3 * len(ts), 3.0 * len(groups)), squeeze=False
    )
    for i, (_, g) in enumerate(groups.iterrows()):
        sel = _in_group(c, g, a.by)
        label = group_label(g, a.by)
        color = _color(i, g.get("strategy", ""))
        for j, t in enumerate(ts):
            ax = axes[i][j]
            pts = c[sel & (c["t"] == t).to_numpy()]
            x, y = pts["Bn1"].to_numpy(), pts["Bn"].to_numpy()
            ax.set_title(f"{label}\nt = {t:g}", fontsize=8)  # two lines: long labels overlap
            if not len(x):  # this group has not (yet) reached this t
                ax.text(
                    0.5,
                    0.5,
                    f"no records at t={t:g}",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="grey",
                )
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.scatter(x, y, s=8, alpha=0.5, color=color, label="classes x seeds")
            lim = np.nanmax(np.abs(np.r_[x, 0.01])) * 1.15  # y scales on its own
            xs = np.array([-lim, lim])
            if np.sum(x * x) > 0:
                slope = np.sum(x * y) / np.sum(x * x)
                ax.plot(xs, slope * xs, color="black", lw=1.2, label=f"fit: slope {slope:.2f}")
            ax.plot(xs, xs, ls="--", color="grey", lw=1, label="y = x")
            ax.set_xlim(-lim, lim)
            ax.set_xlabel("Bn_1 (dense)", fontsize=8)
            ax.set_ylabel(f"Bn_t (t={t:g})", fontsize=8)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "Normalized recall balance after pruning against before, per class\n"
        "slope above 1: the gap between classes widens",
        fontsize=10,
    )
    _save(fig, path, dpi=100)


def against_t_plot(a: Analysis, path: Path):
    """E[alpha_t], E[Psi_t] and the mean accuracy against t, side by side on one t axis, each
    with its interval; alpha only where the group's accuracy is above its floor (a collapsed
    model's slope means nothing), its y axis set by those means so that strategies near 1
    stay apart. Psi and accuracy intervals are clipped to their ranges by the analysis."""
    g = a.groups
    keys = sorted_groups(g, a.by)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), sharex=True)
    shown = []
    for i, (_, k) in enumerate(keys.iterrows()):
        rows = g[_in_group(g, k, a.by)].sort_values("t")
        color = _color(i, k.get("strategy", ""))
        label = group_label(k, a.by)
        alpha = rows[(rows["t"] > 1) & ~rows["below_floor"].astype(bool)]
        if len(alpha):
            axes[0].plot(alpha["t"], alpha["mean_alpha"], marker="o", color=color, label=label)
            axes[0].fill_between(alpha["t"], alpha["ci_low"], alpha["ci_high"], color=color,
                                 alpha=0.15)  # fmt: skip
            shown.append(alpha["mean_alpha"].to_numpy())
        pruned = rows[rows["t"] > 1]
        axes[1].plot(pruned["t"], pruned["mean_disparity"], marker="o", color=color)
        axes[1].fill_between(pruned["t"], pruned["disparity_ci_low"], pruned["disparity_ci_high"],
                             color=color, alpha=0.15)  # fmt: skip
        axes[2].plot(rows["t"], rows["mean_accuracy"], marker="o", color=color, label=label)
        axes[2].fill_between(rows["t"], rows["acc_ci_low"], rows["acc_ci_high"], color=color,
                             alpha=0.15)  # fmt: skip
    axes[0].axhline(1.0, ls="--", color="black", lw=1)
    if not shown:
        axes[0].text(0.5, 0.5, NO_ALPHA, ha="center", va="center", fontsize=8,
                     transform=axes[0].transAxes)  # fmt: skip
    if shown:
        # The axis from the bulk of the means (5th to 95th percentile), so one strategy far
        # off (random pruning at 8 where the rest lie within 0.8-2.5) does not flatten the
        # others; a mean beyond the axis is drawn as a triangle on its edge with its value.
        means = np.concatenate(shown)
        lo, hi = (float(v) for v in np.nanpercentile(means, [5, 95]))
        pad = 0.25 * max(hi - lo, 0.2)
        ylo, yhi = min(lo, 1.0) - pad, max(hi, 1.0) + pad
        axes[0].set_ylim(ylo, yhi)
        for line in axes[0].get_lines()[:-1]:
            for x, y in zip(*line.get_data()):
                if y > yhi or y < ylo:
                    edge = yhi if y > yhi else ylo
                    axes[0].plot(x, edge, marker="^" if y > yhi else "v", ms=9,
                                 color=line.get_color(), clip_on=False)  # fmt: skip
                    axes[0].annotate(f"{y:.1f}", (x, edge), textcoords="offset points",
                                     xytext=(6, -10 if y > yhi else 4), fontsize=7)  # fmt: skip
    axes[0].set_title("E[alpha_t] (above 1: intensification)", fontsize=10)
    axes[1].set_title("E[Psi_t]: disparity (0 to 2)", fontsize=10)
    axes[2].set_title("mean test accuracy", fontsize=10)
    axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pruning ratio t (log scale; 1 = dense)")
    handles, labels = axes[2].get_legend_handles_labels()
    axes[2].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1),
                   borderaxespad=0)  # fmt: skip
    fig.suptitle(f"Against t: means over seeds with {a.ci * 100:g} % intervals", fontsize=10)
    _save(fig, path, dpi=100)


def _group_lines(frame: pd.DataFrame, by):
    """(rows of a group sorted by t, its line style) per group of `frame` in table order.
    Colour: the strategy; marker and line style: the rest of the group (dataset, width,
    mitigation, ...)."""
    rest = [b for b in by if b not in ("strategy", "saliency")]
    styles = {}
    for i, (_, k) in enumerate(sorted_groups(frame, by).iterrows()):
        j = styles.setdefault(tuple(k[b] for b in rest), len(styles))
        style = dict(
            color=_color(i, k.get("strategy", "")),
            marker="osD^vP*X"[j % 8],
            ls=("-", "--", ":", "-.")[(j // 8) % 4],
            label=group_label(k, by),
        )
        yield frame[_in_group(frame, k, by)].sort_values("t"), style


def paired_plot(a: Analysis, path: Path):
    """E[alpha_t(s) - alpha_t(base)] and E[A_t(s) - A_t(base)] against t with interval bands."""
    p = a.paired[a.paired["t"] > 1]
    base, varied = a.baseline, a.paired_by
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for rows, style in _group_lines(p, a.by):
        for k, (ax, (m, lo, hi)) in enumerate(zip(
            axes,
            (("mean_diff", "ci_low", "ci_high"), ("mean_acc_diff", "acc_ci_low", "acc_ci_high")),
        )):  # fmt: skip
            # No alpha difference where either side is at its accuracy floor.
            shown = rows[~rows["below_floor"].astype(bool)] if k == 0 else rows
            ax.plot(shown["t"], shown[m], **style)
            ax.fill_between(shown["t"], shown[lo], shown[hi], color=style["color"], alpha=0.15)
    # Random pruning moves alpha by 1-10 and accuracy by 0.5 where the other strategies differ
    # from the baseline by 0.01-0.1: symmetric-log axes keep both readable.
    ts = p["t"].to_numpy()
    for ax, what, lin in ((axes[0], "alpha_t", 0.1), (axes[1], "accuracy", 0.01)):
        ax.axhline(0, color="k", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(ts.min() / 1.15, ts.max() * 1.15)  # also where a panel drew nothing
        ax.set_yscale("symlog", linthresh=lin)
        ax.set_xlabel("pruning ratio t (log scale)")
        ax.set_ylabel(f"{what}({varied}) - {what}({base}) (symlog)")
        ax.set_title(f"{what}: {varied} minus {base}, same dense model")
    _group_legend(axes)
    what = "Strategies" if varied == "strategy" else "Mitigations"
    fig.suptitle(
        f"{what} against {base}, seed by seed: mean difference over seeds with "
        f"{a.ci * 100:g} % CI bands\nleft below 0: intensifies less than {base}; right below 0: "
        f"less accurate than {base}",
        fontsize=10,
    )
    _save(fig, path, dpi=100)


def flips_plot(a: Analysis, path: Path):
    """Mean flip rate (left) and PIE share (right) against t, one line per group."""
    g = a.flips.groups
    g = g[g["t"] > 1]
    keys = [b for b in a.by if b in g.columns]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for rows, style in _group_lines(g, keys):
        axes[0].plot(rows["t"], 100 * rows["mean_flip_rate"], **style)
        axes[1].plot(rows["t"], 100 * rows["pie_share"], **style)
    titles = ("predictions that differ from the dense model (mean over seeds)",
              "PIE: modal pruned prediction differs from the modal dense one")  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pruning ratio t (log scale)")
        ax.set_ylabel("% of test examples")
        ax.set_title(title, fontsize=10)
    _group_legend(axes)
    fig.suptitle("Prediction flips against the dense model, and pruning-identified exemplars "
                 "(Hooker et al. 2019)\nover the seeds of each group", fontsize=10)  # fmt: skip
    _save(fig, path, dpi=100)


def recall_heatmap(classes: pd.DataFrame, run_id: str, path: Path):
    sub = classes[classes["run_id"] == run_id]
    tab = sub.pivot_table(index="class", columns="t", values="recall")
    names = sub.drop_duplicates("class").set_index("class")["class_name"].reindex(tab.index)
    fig, ax = plt.subplots(figsize=(1.0 * len(tab.columns) + 3, 0.28 * len(tab) + 2))
    values = tab.to_numpy()
    # The colour range starts at the lowest recall seen, so small losses remain visible.
    vmin = float(np.floor(np.nanmin(values) * 10) / 10) if np.isfinite(values).any() else 0.0
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=min(vmin, 0.9), vmax=1)
    if values.size <= 600:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < (vmin + 1) / 2 else "black",
                )
    ax.set_xticks(range(len(tab.columns)), [f"{t:g}" for t in tab.columns])
    ax.set_yticks(range(len(tab)), names.astype(str).tolist(), fontsize=7)
    ax.set_xlabel("pruning ratio t")
    ax.set_ylabel("class")
    r = sub.iloc[0]
    ax.set_title(
        f"Per-class recall, run {run_id}\n{r['dataset']} {r['model']} "
        f"width {r['width']:g} seed {r['seed']} {r['strategy']}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def class_change_heatmap(a: Analysis, path: Path):
    """Recall change beyond the accuracy change, (R_t - R_1) - (A_t - A_1), at each group's
    largest t: one row per group, classes ordered by dense recall, a panel per dataset.

    Under intensification the classes on the left (lowest dense recall) turn red: they lose
    more than the model as a whole.
    """
    cg = at_largest_t(a)
    cg = cg.assign(group=cg.apply(lambda r: group_label(r, a.by), axis=1))
    datasets = sorted(cg["dataset"].unique()) if "dataset" in cg else [None]
    panels = []
    for ds in datasets:
        sub = cg if ds is None else cg[cg["dataset"] == ds]
        order = [group_label(r, a.by) for _, r in sorted_groups(sub, a.by).iterrows()]
        cls = sub.groupby("class")["mean_dense_recall"].mean().sort_values(kind="stable")
        tab = sub.pivot_table(index="group", columns="class", values="mean_excess_change")
        tab = tab.reindex(index=order, columns=cls.index)
        names = sub.drop_duplicates("class").set_index("class")["class_name"].reindex(cls.index)
        ts = sub.drop_duplicates("group").set_index("group")["t"].reindex(order)
        panels.append((ds, tab, names, ts))
    # 0.45 inch a class up to 40 classes; CIFAR-100's 100 share 18 inches (5-point labels).
    width = max(6.0, min(0.45 * max(p[1].shape[1] for p in panels), 18.0) + 4)
    heights = [0.35 * p[1].shape[0] + 1.6 for p in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(width, sum(heights) + 0.8),
        height_ratios=heights,
        squeeze=False,
        layout="constrained",
    )
    finite = np.concatenate([p[1].to_numpy().ravel() for p in panels])
    finite = finite[np.isfinite(finite)]
    vmax = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-3)
    # Logarithmic beyond +-0.01: random pruning at high t moves classes by 0.3, the other
    # strategies by 0.01-0.07, and both must stay readable on one scale.
    norm = SymLogNorm(linthresh=min(0.01, vmax / 2), vmin=-vmax, vmax=vmax, base=10)
    for ax, (ds, tab, names, ts) in zip(axes[:, 0], panels):
        values = tab.to_numpy()
        im = ax.imshow(values, aspect="auto", cmap="RdBu", norm=norm)
        if values.shape[1] <= 20 and values.size <= 400:  # numbers only where they fit
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v):
                    color = "white" if abs(norm(v) - 0.5) > 0.3 else "black"
                    ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_xticks(
            range(len(names)),
            names.astype(str).tolist(),
            rotation=90 if len(names) > 6 else 0,
            fontsize=7 if len(names) <= 30 else 5,
        )
        ax.set_yticks(range(len(tab)), [f"{g} (t={t:g})" for g, t in ts.items()], fontsize=8)
        ax.set_xlabel("class, in order of dense recall (lowest left)")
        ax.set_title(ds or "", fontsize=9)
        fig.colorbar(im, ax=ax, label="recall change - accuracy change", shrink=0.9)
    fig.suptitle(
        "Which classes pay: (R_t - R_1) - (A_t - A_1) at each group's largest t, mean over "
        "seeds\nbelow 0 (red): the class loses more recall than the model loses accuracy",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_scatter_ts(ts) -> list[float]:
    ts = sorted(t for t in ts if t > 1)
    if len(ts) <= 3:
        return ts
    return [ts[0], ts[len(ts) // 2], ts[-1]]


@dataclass
class Table:
    """A table of a section; `key` names a column that is the row label (no index shown)."""

    frame: pd.DataFrame
    key: str | None = None
    empty: str = ""


@dataclass
class Figure:
    file: str
    caption: str


@dataclass
class Section:
    """One `##` section: paragraphs (str), tables, bullet lists (list[str]) and figures, in
    order. Built once; `render_markdown` and `render_html` write it. A section not `open` is
    folded in the HTML page (the long tables)."""

    title: str
    parts: list = field(default_factory=list)
    open: bool = True


def plan_figures(a: Analysis, scatter_ts, run_id: str) -> list[tuple[Figure, Callable]]:
    """Which figures the report holds, each with the call that draws it into a path."""
    plan = [
        (
            Figure(
                "alpha_by_strategy.png",
                "alpha_t(m) of every model above its accuracy floor against t, per strategy",
            ),
            lambda p: alpha_boxplot(a.runs, p, floor=a.floor, by=a.by),
        )
    ]
    for col in ("dataset", "width", "model"):
        if a.runs[col].nunique() > 1:
            plan.append(
                (
                    Figure(f"alpha_by_{col}.png", f"alpha_t(m) split by {col}"),
                    lambda p, c=col: alpha_boxplot(
                        a.runs,
                        p,
                        panel=c,
                        title=f"alpha_t per strategy, split by {c}",
                        floor=a.floor,
                        by=a.by,
                    ),
                )
            )
    if scatter_ts:
        plan.append(
            (
                Figure("scatter.png", "Bn_t against Bn_1 with the pooled slope and y = x"),
                lambda p: scatter_grid(a, p, scatter_ts),
            )
        )
    plan.insert(
        0,
        (
            Figure("against_t.png", "E[alpha_t], E[Psi_t] and mean accuracy against t"),
            lambda p: against_t_plot(a, p),
        ),
    )
    vs = a.baseline
    if vs is not None and (a.paired["t"] > 1).any():
        plan.append(
            (
                Figure(f"vs_{vs}.png", f"alpha and accuracy of each {a.paired_by} minus {vs}"),
                lambda p: paired_plot(a, p),
            )
        )
    if a.flips is not None and not a.flips.empty and (a.flips.groups["t"] > 1).any():
        plan.append(
            (
                Figure("flips.png", "flip rate and PIE share against t"),
                lambda p: flips_plot(a, p),
            )
        )
    if (a.class_groups["t"] > 1).any():
        plan.append(
            (
                Figure(
                    "class_change.png", "recall change of every class beyond the accuracy change"
                ),
                lambda p: class_change_heatmap(a, p),
            )
        )
    plan.append(
        (
            Figure("recall_heatmap.png", f"per-class recall of run {run_id}"),
            lambda p: recall_heatmap(a.classes, run_id, p),
        )
    )
    return plan


def plan_example_figures(a: Analysis, data_root) -> tuple[list[tuple[Figure, Callable]], list]:
    """Grids of the most-flipped test images, one per group (image datasets whose files are
    on this machine), and notes saying where none could be drawn."""
    f = a.flips
    if f is None or f.empty or f.most_flipped.empty:
        return [], []
    m = f.most_flipped
    keys = [b for b in a.by if b in m.columns]
    datasets = a.runs["dataset"].unique()
    if "dataset" not in keys and len(datasets) > 1:
        return [], ["most-flipped images: group by dataset to see them as pictures"]
    loaded, plan, notes = {}, [], []
    groups = m.groupby(keys, sort=False, dropna=False) if keys else [((), m)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        dataset = row.get("dataset", datasets[0])
        if dataset not in loaded:
            loaded[dataset] = examples.load_test_images(dataset, data_root)
            if isinstance(loaded[dataset], str) and "not an image dataset" not in loaded[dataset]:
                notes.append(f"most-flipped images not drawn: {loaded[dataset]}")
        images = loaded[dataset]
        if isinstance(images, str) or len(plan) >= examples.MAX_GROUPS:
            continue
        label = group_label(pd.Series(row), keys) if keys else "all runs"
        t_max = part["t"].iloc[0]
        title = f"{label}, t = {t_max:g}: the most-flipped test images per class"
        plan.append(
            (
                Figure(
                    f"flipped_{len(plan) + 1}.png",
                    f"{label}: the most-flipped test images at t = {t_max:g}",
                ),
                lambda p, part=part, images=images, title=title: examples.flipped_grid(
                    part, images, title, p
                ),
            )
        )
    return plan, notes


def report_sections(
    a: Analysis, runs_dir: Path, figures, top_classes: int, examples=(), example_notes=()
) -> list[Section]:
    """The answer first (summary), then the figures and the pictures of the most-flipped
    examples, then the tables; the long ones folded."""
    alpha_tab, acc_tab = paper_tables(a)
    alpha_parts = [legend(a) + ".", Table(alpha_tab)]
    if a.groups["below_floor"].any():
        alpha_parts.append(floor_legend(a) + ".")
    sections = [Section("Summary", [summary(a, top=2)]), Section("Figures", list(figures))]
    if examples:
        sections.append(
            Section(
                "What pruning forgets",
                [
                    "At each group's largest t, per class, the test images whose prediction "
                    "differs from the dense model's in the most runs: test index, runs "
                    "flipped of the group's runs, the dense -> pruned prediction (the mode "
                    "over the runs).",
                    *examples,
                ],
            )
        )
    sections += [Section("E[alpha_t]", alpha_parts), Section("Mean accuracy", [Table(acc_tab)])]
    if (a.groups["t"] > 1).any():
        sections.append(
            Section("E[Psi_t]: disparity", [disparity_legend(a) + ".", Table(disparity_table(a))])
        )
    if has_error_changes(a):
        parts = []
        for n in ("cev", "sde"):
            parts += [error_change_legend(a, n) + ".", Table(interval_table(a, n))]
        sections.append(Section("E[CEV_t] and E[SDE_t]: error rates", parts))
    paying = paying_classes(a, top_classes)
    if not paying.empty:
        sections.append(
            Section("Which classes pay", [paying_legend(a, top_classes) + ".", Table(paying)])
        )
    vs = a.baseline
    if vs is not None:
        alpha_diff, acc_diff, psi_diff = paired_tables(a)
        what = "Strategies" if a.paired_by == "strategy" else "Mitigations"
        parts = [paired_legend(a) + ".", Table(alpha_diff), f"Accuracy minus {vs}:",
                 Table(acc_diff), f"Psi minus {vs}:", Table(psi_diff)]  # fmt: skip
        sections.append(Section(f"{what} against {vs}, seed by seed", parts, open=False))
    if a.across_setting is not None:
        ref = setting_text(*a.across_setting)
        alpha_diff, acc_diff, psi_diff = across_tables(a)
        parts = [across_legend(a) + ".", Table(alpha_diff), f"Accuracy minus {ref}:",
                 Table(acc_diff), f"Psi minus {ref}:", Table(psi_diff)]  # fmt: skip
        sections.append(Section(f"Across {a.across_setting[0]}, against {ref}", parts,
                                open=False))  # fmt: skip
    if has_cost(a):
        sections.append(
            Section("What each step costs", [COST_LEGEND + ".", Table(cost_table(a))], open=False)
        )
    most = most_flipped_table(a)
    if not most.empty:
        text = (
            "At each group's largest t, per class: the test examples (indices in the "
            "dataset's test order) whose prediction differs from the dense model's in the "
            "most runs (of the group's seeds)."
        )
        sections.append(Section("Most-flipped test examples", [text, Table(most)], open=False))
    settings = settings_table(runs_dir, a.runs["run_id"].unique())
    return sections + [
        Section("Notes", [[*a.notes, *example_notes] or ["none"]], open=False),
        Section(
            "Settings of the runs",
            [Table(settings, key="run_id", empty="(no manifests)")],
            open=False,
        ),
    ]


def most_flipped_table(a: Analysis) -> pd.DataFrame:
    """Rows: (group, class); the most-flipped examples as `index (runs)` lists."""
    f = a.flips
    if f is None or f.empty or f.most_flipped.empty:
        return pd.DataFrame()
    m = f.most_flipped
    keys = [b for b in a.by if b in m.columns]
    rows = []
    for (key, c), part in m.groupby([m.apply(lambda r: group_label(r, keys), axis=1), "class"],
                                    sort=False):  # fmt: skip
        rows.append(
            {
                "group": key,
                "t": f"{part['t'].iloc[0]:g}",
                "class": int(c),
                "examples (runs flipped)": ", ".join(
                    f"{e} ({n})" for e, n in zip(part["example"], part["runs_flipped"])
                ),
            }
        )
    return pd.DataFrame(rows).set_index("group")  # fmt: skip


def _header(a: Analysis) -> str:
    return f"{a.runs['run_id'].nunique()} runs; grouped by {', '.join(a.by)}."


def render_markdown(sections: list[Section], a: Analysis, runs_dir: Path) -> str:
    lines = ["# Recall distortion report", "", f"Records: `{runs_dir}`; {_header(a)}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for part in section.parts:
            if isinstance(part, str):
                lines += [part, ""]
            elif isinstance(part, list):
                lines += [*(f"- {item}" for item in part), ""]
            elif isinstance(part, Figure):
                lines.append(f"### {part.caption}\n\n![{part.caption}]({part.file})\n")
            elif part.frame.empty and part.empty:
                lines += [part.empty, ""]
            elif part.key is not None:
                lines += [markdown(part.frame.set_index(part.key), part.key), ""]
            else:
                lines += [markdown(part.frame), ""]
    return "\n".join(lines)


TEMPLATES = Path(__file__).parent / "templates"


def render_html(sections: list[Section], a: Analysis, runs_dir: Path, folder: Path) -> str:
    """One self-contained page (templates/report.html.j2): the figures inlined as base64 PNG,
    no reference outside the file."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def part_of(part) -> dict:
        if isinstance(part, str):
            return {"kind": "text", "text": part}
        if isinstance(part, list):
            return {"kind": "list", "entries": part}
        if isinstance(part, Figure):
            data = base64.b64encode((folder / part.file).read_bytes()).decode()
            return {"kind": "figure", "data": data, "caption": part.caption}
        if part.frame.empty and part.empty:
            return {"kind": "text", "text": part.empty}
        return {"kind": "table", "html": part.frame.to_html(index=part.key is None)}

    return env.get_template("report.html.j2").render(
        title=", ".join(sorted(map(str, a.runs["dataset"].unique()))),
        records=str(runs_dir),
        header=_header(a),
        sections=[
            {"title": s.title, "open": s.open, "parts": [part_of(p) for p in s.parts]}
            for s in sections
        ],
    )


def _default_run(a: Analysis, run_id: str | None) -> str:
    """The run of the recall heatmap: the one asked for, else the first mp (lowest seed)."""
    if run_id is None:
        first = a.runs.sort_values(
            ["strategy", "seed", "run_id"],
            key=lambda s: s.map(STRATEGY_ORDER) if s.name == "strategy" else s,
        )
        return first["run_id"].iloc[0]
    if run_id not in set(a.runs["run_id"]):
        raise BadInput(f"--run {run_id} is not among the analyzed runs")
    return run_id


def _swap_into_place(tmp: Path, out: Path) -> None:
    """The finished folder replaces `out`; an older report (checked: empty, or marked as a
    report) is removed only afterwards, from a name no one else uses."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        old.rmdir()
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_report(
    a: Analysis,
    runs_dir: Path,
    out: Path,
    run_id: str | None = None,
    scatter_ts: list[float] | None = None,
    top_classes: int = 5,
    data_root=None,
) -> Path:
    """Write OUT/index.html, OUT/report.md and the PNG figures; the folder appears whole.
    `data_root`: where the datasets' files are, for the pictures of the most-flipped test
    images (None: rdfast's default data folder)."""
    all_ts = sorted(a.runs["t"].unique())
    scatter_ts = scatter_ts or pick_scatter_ts(all_ts)
    missing = [t for t in scatter_ts if t not in all_ts]
    if missing:
        raise BadInput(f"--scatter-t {missing} not among the recorded t: {all_ts}")
    run_id = _default_run(a, run_id)
    out = outdir.check(Path(out), "report", records=runs_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        outdir.mark(tmp, "report")
        plan = plan_figures(a, scatter_ts, run_id)
        pictures, picture_notes = plan_example_figures(a, data_root)
        for figure, draw in plan + pictures:
            draw(tmp / figure.file)
        sections = report_sections(a, runs_dir, [f for f, _ in plan], top_classes,
                                   [f for f, _ in pictures], picture_notes)  # fmt: skip
        (tmp / "report.md").write_text(render_markdown(sections, a, runs_dir))
        (tmp / "index.html").write_text(render_html(sections, a, runs_dir, tmp))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
