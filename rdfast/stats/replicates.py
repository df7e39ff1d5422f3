"""Checks that a group holds replicates of one experiment, and notes where it does not."""

from __future__ import annotations

import pandas as pd

from rdfast.errors import BadInput
from rdfast.stats.records import SETTING_COLUMNS


def check_replicates(records, by):
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
                f"the runs of group {label_of(key)} differ in {_what_differs(records, sub, col)}: "
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


def label_of(key) -> str:
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


def note_differing_t(runs, by, notes):
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
