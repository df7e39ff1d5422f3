"""What the run manifests under OUT say, one row per run: the `status` table, the report's
settings table and the "has another process finished it" check all read them here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rdfast import store
from rdfast.config import STRATEGY_ORDER


def live_status(status: str | None, run_dir: Path) -> str | None:
    """A manifest says "running" from the start of a run; whether a process still writes it
    is told by the run's lock: otherwise the run was interrupted (rerun to resume it)."""
    if status == "running" and store.lock_holder(store.lock_path(run_dir)) is None:
        return "interrupted"
    return status


def finished(out: Path, run_id: str) -> bool:
    manifest = store.manifest_path(store.run_dir(out, run_id))
    return manifest.exists() and store.read_json(manifest).get("status") == "complete"


def run_row(manifest_path: Path) -> dict:
    """Everything a table shows of one run, from its manifest and recorded steps."""
    m = store.read_json(manifest_path)
    s = m.get("settings", {})
    tr = s.get("train", {})
    done = len(store.step_files(manifest_path.parent))
    return {
        "run_id": m.get("run_id", manifest_path.parent.name),
        "dataset": m.get("dataset"),
        "model": m.get("model"),
        "width": m.get("width"),
        "seed": m.get("seed"),
        "strategy": s.get("strategy"),
        "saliency": s.get("saliency"),
        "eps": s.get("eps"),
        "ratios": ",".join(f"{t:g}" for t in s.get("ratios", [])),
        "retrain": s.get("retrain"),
        "epochs": tr.get("epochs"),
        "lr": tr.get("lr"),
        "batch": tr.get("batch_size"),
        "weight_decay": tr.get("weight_decay"),
        "status": live_status(m.get("status"), manifest_path.parent),
        "steps": f"{max(done - 1, 0)}/{len(s.get('ratios', []))}",
        "error": m.get("error") or "",
        "device": m.get("device"),
    }


STATUS_COLUMNS = ["run_id", "dataset", "model", "width", "seed", "strategy", "saliency"]
STATUS_COLUMNS += ["status", "steps", "error"]
SETTINGS_COLUMNS = ["run_id", "dataset", "model", "width", "seed", "strategy", "saliency", "eps"]
SETTINGS_COLUMNS += ["ratios", "retrain", "epochs", "lr", "batch", "weight_decay", "status"]
SETTINGS_COLUMNS += ["device"]


def status_table(runs_dir) -> pd.DataFrame:
    """One row per run under `runs_dir`, in (dataset, model, width, seed, strategy) order."""
    rows = [run_row(m) for m in store.manifests(runs_dir)]
    table = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    if table.empty:
        return table
    order = table["strategy"].map(STRATEGY_ORDER)
    keys = ["dataset", "model", "width", "seed", "_order", "run_id"]
    return table.assign(_order=order).sort_values(keys).drop(columns="_order")


def settings_table(runs_dir: Path, run_ids) -> pd.DataFrame:
    """The settings of the given runs, in run-id order (runs without a manifest left out)."""
    paths = [store.manifest_path(store.run_dir(runs_dir, rid)) for rid in sorted(run_ids)]
    rows = [run_row(p) for p in paths if p.exists()]
    return pd.DataFrame(rows, columns=SETTINGS_COLUMNS) if rows else pd.DataFrame()
