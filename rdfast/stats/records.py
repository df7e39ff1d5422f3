"""The records table as `analyze` reads it: loaded from OUT, each run's protocol and
settings attached from its manifest, the record version checked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rdfast.errors import BadInput, DamagedFile
from rdfast.runs import store

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


# What a run's manifest settings hold besides its protocol: the dense model it pruned and the
# strategy with its own parameters. Everything else (training, ratios, retraining) is the
# protocol, which replicates and paired runs must share.
STRATEGY_SETTINGS = ("strategy", "saliency", "grad_batches", "eps")
# Likewise the retraining objective and its parameters: runs that differ only in these are
# paired by `--vs plain`.
MITIGATION_SETTINGS = ("mitigation", "kd_weight", "kd_temperature", "constraint_eps")
MITIGATION_SETTINGS += ("multiplier_lr", "val_fraction", "ceag_tolerance", "dual_lr", "ceag_memory")


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


def with_setting_columns(records: pd.DataFrame, names) -> pd.DataFrame:
    """`records` with a column for each of `names` that is a manifest setting rather than a
    record column (`ceag_tolerance`, `finetune_epochs`, `train.epochs`), so that --by can
    split runs that differ in it. Its cells read `name=value`, and are empty for runs that
    lack the setting (plain retraining has no ceag_tolerance): strings, so that a group
    label names the setting and runs without it sort and compare like any other group."""
    flat = records.attrs.get("settings", {})
    known = set().union(*flat.values()) if flat else set()
    added = {}
    for name in names:
        if name in records.columns or name not in known:
            continue
        values = {r: s[name] for r, s in flat.items() if name in s}
        added[name] = records["run_id"].map(
            lambda r, v=values, n=name: f"{n}={v[r]}" if r in v else ""
        )
    if not added:
        return records
    out = records.assign(**added)
    out.attrs = records.attrs
    return out


def check_version(records: pd.DataFrame) -> None:
    if "records_version" not in records.columns:
        raise BadInput("these records carry no records_version: not written by rdfast run")
    versions = set(records["records_version"].unique().tolist())
    if versions != {store.RECORDS_VERSION}:
        raise BadInput(
            f"records of version {sorted(versions)}; this rdfast reads version "
            f"{store.RECORDS_VERSION} (rerun the experiments with this version)"
        )
