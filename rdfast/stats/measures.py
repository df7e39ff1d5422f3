"""The measures per class and per model (definitions: the science notes).

Per class:  B = R - A,  Bn = (R - A) / A,  I = Bn_t / Bn_1 (undefined where Bn_1 = 0).
Per model:  alpha_t = sum_c x_c y_c / sum_c x_c^2 with x = Bn_1, y = Bn_t (slope through the
            origin), and its standard error sqrt(RSS / (n - 1) / sum x^2); the disparity
            Psi_t = max_c psi_c - min_c psi_c of the excess recall drops
            psi_c = (R_1^c - R_t^c) - (A_1 - A_t) (bounded in [0, 2]; no division by A).

Vectorized with groupby sums."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rdfast.stats.records import RUN_COLUMNS


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


def untrained_runs(classes: pd.DataFrame, floor: float) -> pd.Series:
    """Per run whose dense model's accuracy A_1 is below halfway from chance to `floor` x
    chance (chance: 1 / its classes with test examples; below a quarter of the way from
    chance to 1, so that two classes keep a model at 0.625): that A_1. Such a dense model
    did not train -- a diverged seed: LeNet-5 at lr 0.1 ended at 0.10-0.11 on MNIST and
    Fashion-MNIST, where its other seeds reach 0.91-0.99 -- and pruning it measures nothing.
    With the default floor 2 that is below 1.5 x chance (0.15 for ten classes). `floor` 0:
    none."""
    if floor <= 0 or classes.empty:
        return pd.Series(dtype=float)
    per_run = classes.groupby("run_id", sort=True).agg(A1=("A1", "first"), C=("class", "nunique"))
    return per_run.loc[per_run["A1"] < untrained_limit(per_run["C"], floor), "A1"]


def untrained_limit(n_classes, floor: float):
    """The dense accuracy below which a model did not train (`untrained_runs`)."""
    chance = 1.0 / np.asarray(n_classes, dtype=float)
    return np.minimum((1 + floor) / 2 * chance, chance + (1 - chance) / 4)


# Coverage (%) of the intervals as `rdfast analyze` computes them, on normal data, by
# replicate count: `python -m benchmarks.ci_coverage` (4,000 samples per cell, 2026-11-26;
# benchmarks/README.md). Marks need an interval within COVERAGE_SLACK points of its nominal
# level; the percentile bootstrap undercovers badly with few replicates.


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


def run_table(classes: pd.DataFrame, extra=()) -> pd.DataFrame:
    """Per (run, t): alpha = sum(x y) / sum(x^2) and its standard error, x = Bn_1, y = Bn_t.
    Each run's RUN_COLUMNS are kept, and the `extra` columns (settings grouped by)."""
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
    meta_cols = [c for c in (*RUN_COLUMNS, *extra) if c in classes.columns and c != "run_id"]
    meta_cols = list(dict.fromkeys(meta_cols))
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
