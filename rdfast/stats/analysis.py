"""`analyze`: the records in, every table out (`Analysis`), and the tables as CSV files.

Per group:  E[alpha_t] over replicate models (seeds) with a confidence interval (Student-t or
            bootstrap), a one-sample t-test of alpha = 1, the mark `<` / `>` / `?` (none where
            the mean accuracy is at most `floor` x chance), the mean accuracy and E[Psi_t]
            with their intervals, and the pooled slope over all classes of all models.
Per group and class: the mean recall change R_t - R_1 over the replicates with its interval,
            beside the accuracy change A_t - A_1: which classes pay for the sparsity.
Per pair of strategies, or of mitigations: alpha, accuracy and Psi differences between runs
            of one dense model.
Across one setting (--across dataset=mnist): the same differences between groups that differ
            in that setting alone, unpaired (Welch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rdfast.config import DEFAULT_FLOOR
from rdfast.errors import BadInput
from rdfast.runs import store
from rdfast.stats.across import across_table, parse_across
from rdfast.stats.comparisons import class_group_table, compared_column, group_table, paired_table
from rdfast.stats.error_rates import group_error_changes, run_error_changes
from rdfast.stats.intervals import ADJUSTMENTS, CI_METHODS
from rdfast.stats.measures import class_table, run_table, untrained_runs
from rdfast.stats.records import (
    RUN_COLUMNS,
    SETTING_COLUMNS,
    check_version,
    with_setting_columns,
)
from rdfast.stats.replicates import check_replicates, note_differing_t

DEFAULT_BY = ("strategy", "saliency", "dataset", "model", "width")


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
    across: pd.DataFrame | None = None  # per (group, t): minus the --across reference group
    untrained: tuple[str, ...] = ()  # runs left out: their dense model did not train

    @property
    def baseline(self) -> str | None:
        """The strategy or mitigation the others were compared with (`paired`), if any."""
        return None if self.paired is None else self.paired["baseline"].iloc[0]

    @property
    def paired_by(self) -> str:
        """What the comparison varies: "strategy", or "mitigation" (against `--vs plain`)."""
        return compared_column(self.baseline)

    @property
    def across_setting(self) -> tuple[str, str] | None:
        """(column, reference value) of the comparison across one setting, if any."""
        if self.across is None or self.across.empty:
            return None
        first = self.across.iloc[0]
        return first["across"], first["reference"]


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
    confusion: pd.DataFrame | None = None,
    cost: bool = False,
    across=None,
) -> Analysis:
    """All statistics of the records. `vs`: the strategy (or mitigation) the others are
    compared with, run by run (`paired_table`); "auto" takes plain when runs retrained with a
    mitigation and without, else mp when mp and another strategy were run; None none.
    Records of several mitigations are grouped by mitigation too. `floor`: alpha's marks and
    cells need a mean accuracy above floor x chance (0: always). `adjust`: the multiplicity
    control of each table column's marks (holm, bh or none; `adjust_p`). `confusion` (the
    long confusion table, `store.load_confusion`) adds CEV and SDE (`error_rates`) to the
    run and group tables. `cost`: each step's wall seconds join the run table and their
    median per group and t (`median_seconds`) the group table: what each method costs,
    machine time that differs from run to run, so left out unless asked for. `across`
    ("dataset=mnist"): every group against the group of that value and the same other
    settings, unpaired (`across.across_table`)."""
    if records.empty:
        raise BadInput("no records to analyze")
    check_version(records)
    by = tuple(by)
    records = with_setting_columns(records, by)
    unknown = [b for b in by if b not in records.columns or b in ("class", "t_target", "step")]
    if unknown or not by:
        allowed = [c for c in SETTING_COLUMNS if c in records.columns and c != "dense_id"]
        raise BadInput(
            f"cannot group by {', '.join(unknown) or '(nothing)'}; choose from "
            f"{', '.join(allowed)}, or a setting the runs' manifests hold (e.g. ceag_tolerance)"
        )
    if not 0 < ci < 1:
        raise BadInput(f"--ci must lie strictly between 0 and 1, got {ci}")
    if ci_method not in CI_METHODS:
        raise BadInput(f"unknown CI method {ci_method!r}; choose from t, bootstrap")
    if not 0 <= floor < np.inf:
        raise BadInput(f"--floor must be >= 0 and finite, got {floor}")
    if adjust not in ADJUSTMENTS:
        raise BadInput(f"unknown --adjust {adjust!r}; choose from {', '.join(ADJUSTMENTS)}")
    across = parse_across(across)
    notes: list[str] = []
    if "mitigation" in records.columns and "mitigation" not in by:
        if records["mitigation"].nunique() > 1:
            by = (*by, "mitigation")
    check_replicates(records, by)
    classes = class_table(records, notes)
    untrained = untrained_runs(classes, floor)
    if len(untrained):
        classes = classes[~classes["run_id"].isin(untrained.index)]
        accs = ", ".join(f"{v:.3f}" for v in sorted(set(untrained.round(3))))
        notes.append(
            f"{len(untrained)} runs left out: their dense model's accuracy ({accs}) is below "
            f"{(1 + floor) / 2:g} x chance, a dense model that did not train (--floor 0 keeps "
            "them)"
        )
    if classes.empty:
        raise BadInput("no usable records: every class row was left out")
    timed = ("seconds",) if cost and "seconds" in classes.columns else ()
    runs = run_table(classes, extra=(*by, *timed))
    note_differing_t(runs, by, notes)
    groups = group_table(runs, classes, by, ci, ci_method, n_resamples, seed, notes, floor,
                         adjust)  # fmt: skip
    if confusion is not None and not confusion.empty:
        runs = runs.merge(run_error_changes(confusion), on=["run_id", "t"], how="left")
        errors = group_error_changes(runs, by, ci, ci_method, n_resamples, seed)
        groups = groups.merge(errors.reset_index(), on=[*by, "t"], how="left")
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
    compared = None
    if across is not None:
        compared = across_table(runs, groups, by, across, ci, adjust, notes)
        if compared.empty:
            notes.append(f"no group has a {across[0]} {across[1]} group with its other "
                         f"settings: no comparison across {across[0]}")  # fmt: skip
            compared = None
        if ci_method != "t":
            notes.append(f"the comparison across {across[0]} uses Welch's t interval whatever "
                         "--ci-method")  # fmt: skip
    return Analysis(
        classes, runs, groups, class_groups, by, ci, ci_method, notes, paired, floor=floor,
        adjust=adjust, across=compared, untrained=tuple(untrained.index),
    )  # fmt: skip


def _auto_baseline(runs, by) -> str | None:
    mitigations = set(runs["mitigation"]) if "mitigation" in runs.columns else set()
    if "plain" in mitigations and len(mitigations) > 1 and "mitigation" in by:
        return "plain"
    strategies = set(runs["strategy"])
    return "mp" if "mp" in strategies and len(strategies) > 1 and "strategy" in by else None


# What `read_tables` needs besides the CSV tables to print them as `analyze` did.
SETTINGS_FILE = "analysis.json"


def write_tables(a: Analysis, out_dir: Path) -> list[Path]:
    """Every table as Parquet and CSV, and the analysis' settings and notes (`SETTINGS_FILE`),
    so the compact tables alone print again (`read_tables`)."""
    out_dir = Path(out_dir)
    written = []
    tables = [("alpha_runs", a.runs), ("alpha_groups", a.groups), ("class_groups", a.class_groups)]
    if a.paired is not None:
        tables.append(("alpha_paired", a.paired))
    if a.across is not None and not a.across.empty:
        tables.append(("alpha_across", a.across))
    if a.flips is not None and not a.flips.empty:
        f = a.flips
        tables += [("flip_runs", f.runs), ("flip_classes", f.classes), ("pie_groups", f.groups),
                   ("pie_classes", f.pie_classes), ("most_flipped", f.most_flipped)]  # fmt: skip
    for name, df in tables:
        store.write_parquet(out_dir / f"{name}.parquet", df)
        data = df.to_csv(index=False).encode()
        store.atomic_write(out_dir / f"{name}.csv", lambda f, d=data: f.write(d))
        written += [out_dir / f"{name}.parquet", out_dir / f"{name}.csv"]
    settings = {"by": list(a.by), "ci": a.ci, "ci_method": a.ci_method, "floor": a.floor,
                "adjust": a.adjust, "notes": a.notes}  # fmt: skip
    store.write_json(out_dir / SETTINGS_FILE, settings)
    return written + [out_dir / SETTINGS_FILE]


def read_tables(folder: Path) -> Analysis:
    """The Analysis that `write_tables` wrote into `folder`, from its CSV files and settings
    alone (no records): its group, class, paired and PIE tables, for printing again. The
    per-run and per-class tables are left empty."""
    from rdfast.stats.flips import Flips

    folder = Path(folder)
    needed = [folder / SETTINGS_FILE, folder / "alpha_groups.csv", folder / "class_groups.csv"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise BadInput(f"{folder} holds no tables written by rdfast analyze "
                       f"(missing {', '.join(missing)})")  # fmt: skip
    settings = store.read_json(folder / SETTINGS_FILE)

    def csv(name):
        path = folder / f"{name}.csv"
        if not path.is_file():
            return None
        df = pd.read_csv(path)
        marks = [c for c in df.columns if c == "mark" or c.endswith("_mark")]
        # No mark, and a grouped-by setting a run lacks: both written as an empty field.
        lacking = [b for b in settings["by"] if b in df.columns and b not in RUN_COLUMNS]
        text = [*marks, *lacking]
        return df.assign(**{c: df[c].astype(object).fillna("") for c in text})

    flips = None
    pie = csv("pie_groups")
    if pie is not None:
        empty = pd.DataFrame()
        flips = Flips(runs=empty, classes=empty, groups=pie, pie_classes=empty,
                      most_flipped=empty)  # fmt: skip
    return Analysis(
        classes=pd.DataFrame(), runs=pd.DataFrame(), groups=csv("alpha_groups"),
        class_groups=csv("class_groups"), by=tuple(settings["by"]), ci=settings["ci"],
        ci_method=settings["ci_method"], notes=list(settings.get("notes", [])),
        paired=csv("alpha_paired"), flips=flips, floor=settings["floor"],
        adjust=settings["adjust"], across=csv("alpha_across"),
    )  # fmt: skip
