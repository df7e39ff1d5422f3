"""Recall-distortion statistics from the records table alone (definitions: the science notes).

Per class:  B = R - A,  Bn = (R - A) / A,  I = Bn_t / Bn_1 (undefined where Bn_1 = 0).
Per model:  alpha_t = sum_c x_c y_c / sum_c x_c^2 with x = Bn_1, y = Bn_t (slope through the
            origin), and its standard error sqrt(RSS / (n - 1) / sum x^2); the disparity
            Psi_t = max_c psi_c - min_c psi_c of the excess recall drops
            psi_c = (R_1^c - R_t^c) - (A_1 - A_t) (bounded in [0, 2]; no division by A).
Per group:  E[alpha_t] over replicate models (seeds) with a confidence interval (Student-t or
            bootstrap), a one-sample t-test of alpha = 1, the mark `<` / `>` / `?` (none where
            the mean accuracy is at most `floor` x chance), the mean accuracy and E[Psi_t]
            with their intervals, and the pooled slope over all classes of all models.
Per group and class: the mean recall change R_t - R_1 over the replicates with its interval,
            beside the accuracy change A_t - A_1: which classes pay for the sparsity.
Per pair of strategies, or of mitigations: alpha, accuracy and Psi differences between runs
            of one dense model.

Everything is vectorized with groupby sums; the bootstrap batches the groups that have the
same number of replicates into one scipy call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from rdfast.config import DEFAULT_FLOOR, MITIGATIONS, STRATEGY_ORDER
from rdfast.errors import BadInput, DamagedFile
from rdfast.runs import store

DEFAULT_BY = ("strategy", "saliency", "dataset", "model", "width")
RUN_COLUMNS = (
    "run_id",
    "dataset",
    "model",
    "width",
    "seed",
    "strategy",
    "saliency",
    "retrain",
    "mitigation",
    "eps",
    "weight_decay",
    "dense_id",
    "protocol",
    "strategy_settings",
    "mitigation_settings",
)
# Settings that, when they differ between runs of one group and seed, mean the group mixes
# experiments rather than replicates.
SETTING_COLUMNS = (
    "strategy",
    "saliency",
    "dataset",
    "model",
    "width",
    "retrain",
    "mitigation",
    "eps",
    "weight_decay",
    "dense_id",
)
CI_METHODS = ("t", "bootstrap")


def accuracy_floor(floor: float, n_classes, dense_accuracy=None):
    """The accuracy at or below which alpha is not shown: floor x chance (at most halfway
    from chance to 1), and, given the dense model's accuracy A_1, at least halfway from
    chance to A_1 -- a model that lost more than half of its accuracy above chance has
    collapsed onto a few classes, and its alpha (which divides by A_t) means nothing:
    random pruning of the digits model to t = 8 keeps 0.48 of 0.98, alpha -0.70 in a seed
    spread of -16 to 12. `floor` 0 shows alpha everywhere."""
    chance = 1.0 / np.asarray(n_classes, dtype=float)
    out = np.minimum(floor * chance, (1 + chance) / 2)
    if dense_accuracy is not None and floor > 0:
        out = np.maximum(out, (chance + np.asarray(dense_accuracy, dtype=float)) / 2)
    return out


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


def _note_undercover(method, ci, n: pd.Series, notes) -> None:
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


# What a run's manifest settings hold besides its protocol: the dense model it pruned and the
# strategy with its own parameters. Everything else (training, ratios, retraining) is the
# protocol, which replicates and paired runs must share.
STRATEGY_SETTINGS = ("strategy", "saliency", "grad_batches", "eps")
# Likewise the retraining objective and its parameters: runs that differ only in these are
# paired by `--vs plain`.
MITIGATION_SETTINGS = ("mitigation", "kd_weight", "kd_temperature", "constraint_eps")
MITIGATION_SETTINGS += ("multiplier_lr", "val_fraction")


@dataclass
class Analysis:
    classes: pd.DataFrame  # one row per (run, t, class): R, A, B, Bn, Bn1, I
    runs: pd.DataFrame  # one row per (run, t): accuracy, alpha, alpha_se, n_classes_used
    groups: pd.DataFrame  # one row per (group, t): n, mean_alpha, CI, p, mark, accuracy, pooled
    class_groups: pd.DataFrame  # one row per (group, t, class): recall change and its CI
    by: tuple[str, ...]
    ci: float
    ci_method: str
    notes: list[str] = field(default_factory=list)
    paired: pd.DataFrame | None = None  # one row per (group, t): alpha and accuracy minus --vs
    flips: object | None = None  # flips.Flips, where the runs recorded their predictions
    floor: float = DEFAULT_FLOOR  # marks need a mean accuracy above floor x chance
    adjust: str = "holm"  # the multiplicity control of each table column's marks

    @property
    def baseline(self) -> str | None:
        """The strategy or mitigation the others were compared with (`paired`), if any."""
        return None if self.paired is None else self.paired["baseline"].iloc[0]

    @property
    def paired_by(self) -> str:
        """What the comparison varies: "strategy", or "mitigation" (against `--vs plain`)."""
        return compared_column(self.baseline)


def compared_column(baseline: str | None) -> str:
    return "mitigation" if baseline in MITIGATIONS else "strategy"


def load(runs_dir: Path) -> pd.DataFrame:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise BadInput(f"{runs_dir} is not a directory")
    records = store.load_records(runs_dir, prefer_consolidated=True)
    if records.empty:
        raise BadInput(
            f"no records under {runs_dir} (write some with `rdfast run --out {runs_dir}`)"
        )
    if "mitigation" not in records.columns:  # recorded before mitigations existed
        records = records.assign(mitigation="plain")
    return attach_settings(records, runs_dir)


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def attach_settings(records: pd.DataFrame, runs_dir: Path) -> pd.DataFrame:
    """Add each run's `protocol`, `strategy_settings` and `mitigation_settings` (hashes of its
    manifest settings: everything but the dense model, the strategy and the mitigation; the
    strategy's own parameters; the mitigation's).

    The records name the dense model, strategy and weight decay; the manifests hold the rest
    (epochs, learning rates, ratios, retraining), which replicates must share. Runs without
    a readable manifest get an empty protocol. The flattened settings of each run are kept in
    `records.attrs["settings"]` to name what differs.
    """
    protocol, own, mit, flat = {}, {}, {}, {}
    for run_id in records["run_id"].unique():
        try:
            settings = store.read_json(store.manifest_path(store.run_dir(runs_dir, run_id)))[
                "settings"
            ]
            settings = dict(settings)
        except (DamagedFile, KeyError, TypeError):  # missing or foreign: no protocol known
            continue
        named = ("dense_id", *STRATEGY_SETTINGS, *MITIGATION_SETTINGS)
        rest = {k: v for k, v in settings.items() if k not in named}
        protocol[run_id] = store.stable_hash(rest)
        own[run_id] = store.stable_hash({k: settings.get(k) for k in STRATEGY_SETTINGS})
        mit[run_id] = store.stable_hash({k: settings.get(k) for k in MITIGATION_SETTINGS})
        flat[run_id] = _flat(settings)
    ids = records["run_id"]
    records = records.assign(
        protocol=ids.map(lambda r: protocol.get(r, "")),
        strategy_settings=ids.map(lambda r: own.get(r, "")),
        mitigation_settings=ids.map(lambda r: mit.get(r, "")),
    )
    records.attrs["settings"] = flat
    return records


def check_version(records: pd.DataFrame) -> None:
    if "records_version" not in records.columns:
        raise BadInput("these records carry no records_version: not written by rdfast run")
    versions = set(records["records_version"].unique().tolist())
    if versions != {store.RECORDS_VERSION}:
        raise BadInput(
            f"records of version {sorted(versions)}; this rdfast reads version "
            f"{store.RECORDS_VERSION} (rerun the experiments with this version)"
        )


def class_table(records: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Per (run, t, class): recall balance, normalized balance, and the ratio I."""
    df = records.rename(columns={"t_target": "t"})
    empty = df["support"] == 0
    if empty.any():
        left = df.loc[empty, ["dataset", "class"]].drop_duplicates()
        notes.append(
            f"left out {int(empty.sum())} class rows with no test examples "
            f"(classes {', '.join(map(str, sorted(left['class'].unique())))})"
        )
        df = df[~empty]
    zero_acc = df["accuracy"] == 0
    if zero_acc.any():
        bad = df.loc[zero_acc].drop_duplicates(["run_id", "t"])
        notes.append(f"left out {len(bad)} (run, t) with accuracy 0: Bn = (R - A) / A is undefined")
        df = df[~zero_acc]
    df = df.assign(B=df["recall"] - df["accuracy"])
    df = df.assign(Bn=df["B"] / df["accuracy"])
    base = df.loc[df["step"] == 0, ["run_id", "class", "Bn", "recall", "accuracy"]].rename(
        columns={"Bn": "Bn1", "recall": "R1", "accuracy": "A1"}
    )
    # Sets of the unique ids: Series.isin on pyarrow strings walks a million rows in Python
    # (2.7 s at 1e6 rows with pandas 3.1).
    no_base = set(df["run_id"].unique()) - set(base["run_id"].unique())
    if no_base:
        notes.append(f"left out {len(no_base)} runs without a usable dense (t = 1) evaluation")
    df = df.merge(base, on=["run_id", "class"], how="inner")
    zero = df["Bn1"] == 0
    df["I"] = np.where(zero, np.nan, df["Bn"] / df["Bn1"].where(~zero, 1.0))
    n_undef = int((zero & (df["step"] > 0)).sum())
    if n_undef:
        notes.append(f"I undefined for {n_undef} (run, t, class) rows where Bn_1 = 0")
    return df


def run_table(classes: pd.DataFrame) -> pd.DataFrame:
    """Per (run, t): alpha = sum(x y) / sum(x^2) and its standard error, x = Bn_1, y = Bn_t."""
    x, y = classes["Bn1"], classes["Bn"]
    keys = ["run_id", "t"]
    sums = (
        classes.assign(xy=x * y, xx=x * x, yy=y * y)
        .groupby(keys, sort=False)
        .agg(sxy=("xy", "sum"), sxx=("xx", "sum"), syy=("yy", "sum"), n_classes_used=("Bn", "size"))
    )
    alpha = sums["sxy"] / sums["sxx"].where(sums["sxx"] > 0)
    # RSS of the fit through the origin: sum(y^2) - alpha * sum(x y), clipped at rounding.
    rss = (sums["syy"] - alpha * sums["sxy"]).clip(lower=0)
    dof = (sums["n_classes_used"] - 1).where(sums["n_classes_used"] > 1)
    se = np.sqrt(rss / dof / sums["sxx"].where(sums["sxx"] > 0))
    # psi_c = (R_1^c - R_t^c) - (A_1 - A_t); its range over classes is that of R_t^c - R_1^c.
    psi = (classes["R1"] - classes["recall"]) - (classes["A1"] - classes["accuracy"])
    spread = psi.groupby([classes["run_id"], classes["t"]], sort=False).agg(["max", "min"])
    spread.index.names = keys
    meta_cols = [c for c in RUN_COLUMNS if c in classes.columns and c != "run_id"]
    meta = classes.drop_duplicates(keys).set_index(keys)[[*meta_cols, "step", "accuracy", "A1"]]
    meta = meta.rename(columns={"A1": "dense_accuracy"})
    out = meta.join(
        pd.DataFrame(
            {
                "alpha": alpha,
                "alpha_se": se,
                "n_classes_used": sums["n_classes_used"],
                "disparity": spread["max"] - spread["min"],
                "max_excess_drop": spread["max"],
            }
        )
    )
    out = out.reset_index()
    return out.sort_values(["run_id", "t"], kind="stable").reset_index(drop=True)


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
    change = _summary(g["change"], ci, method, n_resamples, seed)
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
    own = ("strategy", "saliency", "eps") if col == "strategy" else ("mitigation",)
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
    pairs = pairs.assign(
        diff=pairs["alpha"] - pairs["base_alpha"],
        acc_diff=pairs["accuracy"] - pairs["base_accuracy"],
        psi_diff=pairs["disparity"] - pairs["base_psi"],
        floor_accuracy=accuracy_floor(floor, pairs["n_classes_used"], pairs["dense_accuracy"]),
    )
    g = pairs.groupby([*by, "t"], sort=True, dropna=False)
    diff = _summary(g["diff"], ci, method, n_resamples, seed)
    acc = _summary(g["acc_diff"], ci, method, n_resamples, seed)
    psi = _summary(g["psi_diff"], ci, method, n_resamples, seed)
    # Either side's mean accuracy at the floor: no mark for the slopes' difference.
    means = g[["accuracy", "base_accuracy", "floor_accuracy"]].mean()
    below = np.minimum(means["accuracy"], means["base_accuracy"]) <= means["floor_accuracy"]
    below &= diff.index.get_level_values("t") > 1
    _note_undercover(method, ci, diff["n"], notes)
    constant = (diff["constant"] | acc["constant"]) & (diff.index.get_level_values("t") > 1)
    if notes is not None and constant.any():
        notes.append(
            f"{int(constant.sum())} (group, t) of the comparison with {baseline} have the same "
            "difference in every pair: no interval and no mark there"
        )

    def columns(summary, prefix, what, hide=False):
        """mean_{prefix}diff, its interval, raw and adjusted p-values and mark against 0 (none
        where `hide`); each column's marks are one family."""
        shown = ~undercovering(method, ci, summary["n"]) & ~hide
        marks, p_adj = adjusted_marks(summary["low"], summary["high"], summary["n"],
                                      summary["p"], shown, ci, adjust, ref=0.0)  # fmt: skip
        _note_family(notes, adjust, ci, f"the {what} difference against {baseline}", p_adj)
        return {
            f"mean_{prefix}diff": summary["mean"],
            f"{prefix}ci_low": summary["low"],
            f"{prefix}ci_high": summary["high"],
            f"{prefix}p_value": summary["p"],  # = scipy.stats.ttest_rel of the pairs
            f"{prefix}p_adjusted": p_adj,
            f"{prefix}mark": marks,
        }

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


def _t_interval(mean, sd, n, ci):
    """Student-t interval mean +- t_{(1+ci)/2, n-1} * sd / sqrt(n); NaN where n < 2."""
    n = n.astype(float)
    half = stats.t.ppf((1 + ci) / 2, (n - 1).where(n > 1)) * sd / np.sqrt(n)
    return mean - half, mean + half


def _summary(g, ci, method, n_resamples, seed, ref=0.0) -> pd.DataFrame:
    """Per group of the grouped column `g`: n, mean and sd, the interval of the mean
    (Student-t or a percentile bootstrap) and the p-value of the one-sample t-test of
    mean = ref (scipy.stats.ttest_1samp, vectorized)."""
    s = g.agg(["count", "mean", "std", "min", "max"]).rename(columns={"count": "n", "std": "sd"})
    if method == "t":
        s["low"], s["high"] = _t_interval(s["mean"], s["sd"], s["n"], ci)
    else:
        arrays = g.apply(lambda v: v.dropna().to_numpy())
        s["low"], s["high"] = _bootstrap_interval(arrays, ci, n_resamples, seed)
    # Identical replicates: a zero-width "interval" says nothing about the spread of the
    # mean (and the t-test is undefined), so there is none, and no mark from it.
    s["constant"] = (s["n"] >= 2) & (s["min"] == s["max"])
    s.loc[s["constant"], ["low", "high"]] = np.nan
    se = s["sd"] / np.sqrt(s["n"])
    dof = (s["n"] - 1).where(s["n"] > 1)
    s["p"] = 2 * stats.t.sf(np.abs((s["mean"] - ref) / se.where(se > 0)), dof)
    return s


def _bootstrap_interval(arrays: pd.Series, ci, n_resamples, seed):
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


def _note_family(notes, adjust, ci, what: str, p_adj: pd.Series) -> None:
    if notes is None or adjust == "none":
        return
    m = int(p_adj.notna().sum())
    if m:
        notes.append(
            f"marks of {what}: {ADJUSTMENT_NAMES[adjust]} adjusted p < {1 - ci:.2g} over its "
            f"family of {m} cells (every cell of the column that has an interval); p_value is "
            "the raw t-test, p_adjusted the adjusted one"
        )


def group_table(
    runs, classes, by, ci, method, n_resamples=9999, seed=0, notes=None, floor=DEFAULT_FLOOR,
    adjust="holm",
) -> pd.DataFrame:  # fmt: skip
    keys = [*by, "t"]
    g = runs.groupby(keys, sort=True, dropna=False)
    alpha = _summary(g["alpha"], ci, method, n_resamples, seed, ref=1.0)
    acc = _summary(g["accuracy"], ci, method, n_resamples, seed)
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
    _note_undercover(method, ci, alpha["n"], notes)
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
    psi = _summary(g["disparity"], ci, method, n_resamples, seed)
    shown = ~undercovering(method, ci, alpha["n"]) & ~below
    marks, p_adj = adjusted_marks(alpha["low"], alpha["high"], alpha["n"], alpha["p"], shown, ci,
                                  adjust, ref=1.0)  # fmt: skip
    _note_family(notes, adjust, ci, "E[alpha_t] against 1", p_adj)
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
            "acc_ci_low": acc["low"],
            "acc_ci_high": acc["high"],
            "accuracy_floor": group_floor,
            "below_floor": below,
            "mean_disparity": psi["mean"],
            "disparity_ci_low": psi["low"],
            "disparity_ci_high": psi["high"],
        }
    )
    # Pooled slope: every class of every replicate in one fit (what a scatter plot shows).
    c = classes.assign(xy=classes["Bn1"] * classes["Bn"], xx=classes["Bn1"] ** 2)
    pooled = c.groupby(keys, sort=True, dropna=False)[["xy", "xx"]].sum()
    agg["pooled_alpha"] = pooled["xy"] / pooled["xx"].where(pooled["xx"] > 0)
    return agg.reset_index()


def analyze(
    records: pd.DataFrame,
    by=DEFAULT_BY,
    ci: float = 0.99,
    ci_method: str = "t",
    n_resamples: int = 9999,
    seed: int = 0,
    vs: str | None = "auto",
    floor: float = DEFAULT_FLOOR,
    adjust: str = "holm",
) -> Analysis:
    """All statistics of the records. `vs`: the strategy (or mitigation) the others are
    compared with, run by run (`paired_table`); "auto" takes plain when runs retrained with a
    mitigation and without, else mp when mp and another strategy were run; None none.
    Records of several mitigations are grouped by mitigation too. `floor`: alpha's marks and
    cells need a mean accuracy above floor x chance (0: always). `adjust`: the multiplicity
    control of each table column's marks (holm, bh or none; `adjust_p`)."""
    if records.empty:
        raise BadInput("no records to analyze")
    check_version(records)
    by = tuple(by)
    unknown = [b for b in by if b not in records.columns or b in ("class", "t_target", "step")]
    if unknown or not by:
        allowed = [c for c in SETTING_COLUMNS if c in records.columns and c != "dense_id"]
        raise BadInput(
            f"cannot group by {', '.join(unknown) or '(nothing)'}; choose from {', '.join(allowed)}"
        )
    if not 0 < ci < 1:
        raise BadInput(f"--ci must lie strictly between 0 and 1, got {ci}")
    if ci_method not in CI_METHODS:
        raise BadInput(f"unknown CI method {ci_method!r}; choose from t, bootstrap")
    if not 0 <= floor < np.inf:
        raise BadInput(f"--floor must be >= 0 and finite, got {floor}")
    if adjust not in ADJUSTMENTS:
        raise BadInput(f"unknown --adjust {adjust!r}; choose from {', '.join(ADJUSTMENTS)}")
    notes: list[str] = []
    if "mitigation" in records.columns and "mitigation" not in by:
        if records["mitigation"].nunique() > 1:
            by = (*by, "mitigation")
    _check_replicates(records, by)
    classes = class_table(records, notes)
    if classes.empty:
        raise BadInput("no usable records: every class row was left out")
    runs = run_table(classes)
    _note_differing_t(runs, by, notes)
    groups = group_table(runs, classes, by, ci, ci_method, n_resamples, seed, notes, floor,
                         adjust)  # fmt: skip
    class_groups = class_group_table(classes, by, ci, ci_method, n_resamples, seed)
    if vs == "auto":
        vs = _auto_baseline(runs, by)
    paired = (
        paired_table(runs, by, vs, ci, ci_method, n_resamples, seed, notes, floor, adjust)
        if vs
        else None
    )
    if paired is not None and paired.empty:
        notes.append(f"no run pruned the same dense model as a {vs} run: no comparison with {vs}")
        paired = None
    return Analysis(
        classes, runs, groups, class_groups, by, ci, ci_method, notes, paired, floor=floor,
        adjust=adjust,
    )  # fmt: skip


def _auto_baseline(runs, by) -> str | None:
    mitigations = set(runs["mitigation"]) if "mitigation" in runs.columns else set()
    if "plain" in mitigations and len(mitigations) > 1 and "mitigation" in by:
        return "plain"
    strategies = set(runs["strategy"])
    return "mp" if "mp" in strategies and len(strategies) > 1 and "strategy" in by else None


def _check_replicates(records, by):
    """Within a group, runs must differ by their seed alone: the same protocol (training,
    ratios, retraining), strategy settings and weight decay, one run per seed."""
    runs = records.drop_duplicates("run_id")
    checked = [
        c
        for c in (*SETTING_COLUMNS, "protocol", "strategy_settings", "mitigation_settings")
        if c in runs.columns and c not in by and c != "dense_id"
    ]
    for col in checked:
        varying = runs.groupby(list(by), dropna=False)[col].nunique(dropna=False)
        if (varying > 1).any():
            key = varying[varying > 1].index[0]
            sub = runs.set_index(list(by)).loc[[key] if len(by) > 1 else key]
            raise BadInput(
                f"the runs of group {_label(key)} differ in {_what_differs(records, sub, col)}: "
                f"they are not replicates; add it to --by or analyze their folders separately"
            )
    per_seed = records.drop_duplicates("run_id").groupby([*by, "seed"], dropna=False)
    counts = per_seed["run_id"].nunique()
    if (counts > 1).any():
        key = counts[counts > 1].index[0]
        sub = records.drop_duplicates("run_id").set_index([*by, "seed"]).loc[[key]]
        varying = [
            c for c in SETTING_COLUMNS if c in sub.columns and sub[c].nunique(dropna=False) > 1
        ]
        what = (
            ", ".join("training settings" if c == "dense_id" else c for c in varying)
            or "the ratios or retraining settings"
        )
        raise BadInput(
            f"{counts.max()} runs share one group and seed; they differ in {what}: "
            f"add it to --by or analyze their folders separately"
        )


def _label(key) -> str:
    return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _what_differs(records, sub: pd.DataFrame, col: str) -> str:
    """The setting that differs between the runs in `sub`, with two of its values."""
    if col not in ("protocol", "strategy_settings", "mitigation_settings"):
        values = sub[col].drop_duplicates().tolist()[:2]
        return f"{col} ({' vs '.join(map(str, values))})"
    flat = records.attrs.get("settings", {})
    first = sub.drop_duplicates(col)["run_id"].tolist()[:2]
    a, b = (flat.get(r, {}) for r in first)
    names = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "dense_id")
    if not names:
        return "their settings"
    k = names[0]
    return f"{k} ({a.get(k)} vs {b.get(k)})" + (
        f" and {len(names) - 1} more" if len(names) > 1 else ""
    )


def _note_differing_t(runs, by, notes):
    """A group whose runs did not all reach the same t values (a run lacks some t)."""
    keys = list(by)
    per_group = runs.groupby(keys, dropna=False)["run_id"].nunique()
    per_t = runs.groupby([*keys, "t"], dropna=False)["run_id"].nunique()
    short = per_t < per_group.reindex(per_t.index.droplevel("t")).to_numpy()
    n = short.groupby(level=keys, dropna=False).any().sum()
    if n:
        notes.append(
            f"{int(n)} group(s) hold runs with different t values; "
            "each t is summarized over the runs that reached it"
        )


def write_tables(a: Analysis, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    tables = [("alpha_runs", a.runs), ("alpha_groups", a.groups), ("class_groups", a.class_groups)]
    if a.paired is not None:
        tables.append(("alpha_paired", a.paired))
    if a.flips is not None and not a.flips.empty:
        f = a.flips
        tables += [("flip_runs", f.runs), ("flip_classes", f.classes), ("pie_groups", f.groups),
                   ("pie_classes", f.pie_classes), ("most_flipped", f.most_flipped)]  # fmt: skip
    for name, df in tables:
        store.write_parquet(out_dir / f"{name}.parquet", df)
        data = df.to_csv(index=False).encode()
        store.atomic_write(out_dir / f"{name}.csv", lambda f, d=data: f.write(d))
        written += [out_dir / f"{name}.parquet", out_dir / f"{name}.csv"]
    return written
