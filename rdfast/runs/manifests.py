"""What the run manifests under OUT say, one row per run: the `status` table, the report's
settings table (its columns follow the settings' declarations) and the "has another process
finished it" check all read them here."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pandas as pd

from rdfast import outdir
from rdfast.config import STRATEGY_ORDER, PruneSettings, TrainSettings
from rdfast.runs import store


def live_status(status: str | None, run_dir: Path) -> str | None:
    """A manifest says "running" from the start of a run; whether a process still writes it
    is told by the run's lock: otherwise the run was interrupted (rerun to resume it)."""
    if status == "running" and store.lock_holder(store.lock_path(run_dir)) is None:
        return "interrupted"
    return status


def finished(out: Path, run_id: str) -> bool:
    """Complete, and every recorded step is this run's own (a step file copied from another
    run makes the run one to redo)."""
    folder = store.run_dir(out, run_id)
    manifest = store.manifest_path(folder)
    if not manifest.exists() or store.read_json(manifest).get("status") != "complete":
        return False
    return not any(store.owner_problem(p) for p in store.step_files(folder).values())


def run_row(manifest_path: Path) -> dict:
    """A run's row of the status table, from its manifest and recorded steps."""
    m = store.read_json(manifest_path)
    s = m.get("settings", {})
    steps = store.step_files(manifest_path.parent)
    done = len(steps)
    damage = next((f"{p.name} {w}" for p in steps.values() if (w := store.owner_problem(p))), "")
    out, run_id = manifest_path.parent.parent.parent, manifest_path.parent.name
    saved = sorted(store.pruned_model(out, run_id, 1).parent.glob("t*"))
    damage = damage or next(
        (f"saved model {w}" for f in saved if (w := store.saved_problem(f))), ""
    )
    return {
        "run_id": m.get("run_id", manifest_path.parent.name),
        "dataset": m.get("dataset"),
        "model": m.get("model"),
        "width": m.get("width"),
        "seed": m.get("seed"),
        "strategy": s.get("strategy"),
        "saliency": s.get("saliency"),
        "mitigation": s.get("mitigation", "plain"),
        "status": "damaged" if damage else live_status(m.get("status"), manifest_path.parent),
        "steps": f"{max(done - 1, 0)}/{len(s.get('ratios', []))}",
        "error": (f"{damage}: rerun to recompute" if damage else m.get("error")) or "",
    }


STATUS_COLUMNS = ["run_id", "dataset", "model", "width", "seed", "strategy", "saliency"]
STATUS_COLUMNS += ["mitigation", "status", "steps", "error"]
IDENTITY = ["run_id", "dataset", "model", "width", "seed", "strategy"]


def _cell(value):
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def settings_row(manifest_path: Path) -> dict:
    """A run's identity, then every setting of its key and of its dense training, in the
    order they are declared (a new setting shows up here by itself), status and device."""
    m = store.read_json(manifest_path)
    s, tr = m.get("settings", {}), m.get("settings", {}).get("train", {})
    key_names = [f.metadata.get("key_name") or f.name for f in fields(PruneSettings)]
    row = {k: m.get(k) for k in IDENTITY if k != "strategy"}
    row["run_id"] = m.get("run_id", manifest_path.parent.name)
    row["strategy"] = s.get("strategy")
    # Settings left out of a run's key (a mitigation's, under plain retraining) are absent.
    row.update({k: _cell(s.get(k)) for k in [*key_names, "masked_kernels"] if k in s})
    row.update({f.name: tr.get(f.name) for f in fields(TrainSettings)})
    row["status"] = live_status(m.get("status"), manifest_path.parent)
    row["device"] = m.get("device")
    return row


def status_table(runs_dir) -> pd.DataFrame:
    """One row per run under `runs_dir`, in (dataset, model, width, seed, strategy) order."""
    rows = [run_row(m) for m in store.manifests(runs_dir)]
    table = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    if table.empty:
        return table
    if outdir.owner(runs_dir) == "export":  # no step files: the steps its records hold
        records = store.read_parquet(store.records_path(runs_dir), columns=["run_id", "step"])
        last = records.groupby("run_id")["step"].max()
        table = table[table["run_id"].isin(last.index)]  # manifests a killed export left
        table["steps"] = [f"{last[r]}/{n.split('/')[1]}" for r, n in
                          zip(table["run_id"], table["steps"])]  # fmt: skip
    order = table["strategy"].map(STRATEGY_ORDER)
    keys = ["dataset", "model", "width", "seed", "_order", "run_id"]
    return table.assign(_order=order).sort_values(keys).drop(columns="_order")


def settings_table(runs_dir: Path, run_ids) -> pd.DataFrame:
    """The settings of the given runs, in run-id order (runs without a manifest left out)."""
    paths = [store.manifest_path(store.run_dir(runs_dir, rid)) for rid in sorted(run_ids)]
    rows = [settings_row(p) for p in paths if p.exists()]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    return table[IDENTITY + [c for c in table.columns if c not in IDENTITY]]
