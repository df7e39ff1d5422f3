"""A study's records without its checkpoints: what `rdfast export` writes, and what `analyze`,
`report` and `tables` read like any records folder.

An export holds the complete runs' per-class records (records.parquet), their confusion
matrices (confusion.parquet) and their manifests (runs/<id>/manifest.json: every setting,
so replicates group as they did): about 3 KB a run, where a runs folder holds about 1 MB a
run of models and predictions. Exporting into an earlier export adds runs to it, so the
seeds of one study run on different machines or days analyze as one; a run in both must
have the same records to the bit (but its wall seconds). Prediction flips need the
per-example predictions, which an export leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rdfast import outdir
from rdfast.errors import BadInput
from rdfast.runs import manifests, store

KIND = "export"
MACHINE_TIME = {"seconds"}  # differs on every run of the same settings


@dataclass
class Exported:
    added: list[str]  # run ids new to the export
    already: int  # runs the export held with the same records
    incomplete: list[str]  # runs under RUNS_DIR left out: not complete
    total: int  # runs in the export now


def _exported(dest: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The records and confusion matrices of an earlier export in `dest` (empty when new)."""
    if not store.records_path(dest).exists():
        return pd.DataFrame(), pd.DataFrame()
    records = store.read_parquet(store.records_path(dest))
    cm = store.confusion_path(dest)
    return records, (store.read_parquet(cm) if cm.exists() else pd.DataFrame())


def _sorted(df: pd.DataFrame, keys) -> pd.DataFrame:
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def exported_runs(dest: Path) -> set[str]:
    """The ids of the runs the export `dest` holds; BadInput where it is not an export."""
    dest = Path(dest)
    if outdir.owner(dest) != KIND or not store.records_path(dest).exists():
        raise BadInput(f"{dest} is not an rdfast export (make one with `rdfast export`)")
    return set(store.read_parquet(store.records_path(dest), columns=["run_id"])["run_id"])


def export(runs_dir: Path, dest: Path, run_ids=None) -> Exported:
    """Copy the complete runs under `runs_dir` (those of `run_ids` alone, when given) into the
    export folder `dest`, adding them to the runs it holds. BadInput, before anything is
    written, where `dest` is another kind of folder or holds one of these runs with other
    records."""
    runs_dir, dest = Path(runs_dir), Path(dest)
    if not runs_dir.is_dir():
        raise BadInput(f"{runs_dir} is not a directory")
    outdir.check(dest, KIND, records=runs_dir, flag="DEST")
    # Every step file read and checked; an export's records.parquet where there are none.
    records = store.load_records(runs_dir, prefer_consolidated=True)
    if records.empty:
        raise BadInput(f"no records under {runs_dir} (make some with `rdfast run --out ...`)")
    if run_ids is not None:
        records = records[records["run_id"].isin(set(run_ids))]
    ids = sorted(records["run_id"].unique())
    done = [r for r in ids if manifests.finished(runs_dir, r)]
    incomplete = sorted(set(ids) - set(done))
    if not done:
        raise BadInput(f"no complete run under {runs_dir} to export")
    records = _sorted(records[records["run_id"].isin(done)], ["run_id", "step", "class"])
    confusion = store.load_confusion(runs_dir)
    if not confusion.empty:
        confusion = confusion[confusion["run_id"].isin(done)]

    old_records, old_confusion = _exported(dest)
    held = set(old_records["run_id"]) if not old_records.empty else set()
    both = sorted(held & set(done))
    for run_id in both:
        mine = records[records["run_id"] == run_id].reset_index(drop=True)
        theirs = _sorted(old_records[old_records["run_id"] == run_id], ["step", "class"])
        columns = [c for c in mine.columns if c not in MACHINE_TIME]
        if not mine[columns].equals(theirs.reindex(columns=columns)):
            raise BadInput(
                f"run {run_id} has other records in {dest} than under {runs_dir}: the same "
                "settings gave other numbers (on another kind of CPU?); "
                "export into another folder"
            )
    added = [r for r in done if r not in held]
    new_records = records[records["run_id"].isin(added)]
    new_confusion = confusion[confusion["run_id"].isin(added)] if not confusion.empty else confusion
    all_records = _sorted(pd.concat([old_records, new_records], ignore_index=True),
                          ["run_id", "step", "class"])  # fmt: skip
    all_confusion = pd.concat([old_confusion, new_confusion], ignore_index=True)
    if not all_confusion.empty:
        all_confusion = _sorted(all_confusion, ["run_id", "step", "true", "pred"])

    dest.mkdir(parents=True, exist_ok=True)
    outdir.mark(dest, KIND)
    # Manifests first, the tables last: a killed export leaves at most manifests of runs the
    # tables do not name yet, which every reader ignores and the next export rewrites.
    for run_id in added:
        manifest = store.read_json(store.manifest_path(store.run_dir(runs_dir, run_id)))
        target = store.run_dir(dest, run_id)
        target.mkdir(parents=True, exist_ok=True)
        store.write_json(store.manifest_path(target), manifest)
    if not all_confusion.empty:
        store.write_parquet(store.confusion_path(dest), all_confusion)
    store.write_parquet(store.records_path(dest), all_records)
    total = all_records["run_id"].nunique()
    return Exported(added=added, already=len(both), incomplete=incomplete, total=total)
