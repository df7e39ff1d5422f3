"""Prediction flips and pruning-identified exemplars (PIE), from the predictions every step
records (`runs/<id>/step-<i>.pred.npy`, with the run's test labels in `labels.npy`).

- Flip rate of a run at step i: the share of test examples whose predicted class differs from
  the dense model's (step 0), overall and per true class.
- PIE (Hooker et al., "What Do Compressed Deep Neural Networks Forget?", 2019): across the
  runs of a group (its seeds), an example is a PIE at t when the modal prediction of the
  pruned models at t differs from the modal prediction of the dense models. Modes are taken
  with ties to the smallest class index.
- The most-flipped examples of each class: at a group's largest t, the test indices (in the
  dataset's test order) flipped in the most runs, with the modal predictions of the dense
  and the pruned models.
Runs recorded before predictions were kept, and exports (`rdfast export`), have none and are
left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rdfast.runs import store
from rdfast.stats.records import with_setting_columns


@dataclass
class Flips:
    runs: pd.DataFrame  # run_id, step, t, flip_rate
    classes: pd.DataFrame  # run_id, step, t, class, n, flipped, flip_rate
    groups: pd.DataFrame  # by..., t, n_runs, mean_flip_rate, pie, pie_share
    pie_classes: pd.DataFrame  # by..., t, class, n, pie, pie_share
    # by..., t, class, example, runs_flipped, and the modal dense and pruned predictions
    most_flipped: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """No flips measured (tables read back from CSV keep the group table alone)."""
        return self.runs.empty and self.groups.empty


def modal(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent class per column of an (R x N) array; ties to the smallest class."""
    r, n = predictions.shape
    counts = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(counts, (np.tile(np.arange(n), r), predictions.reshape(-1)), 1)
    return counts.argmax(axis=1)


def flip_rates(dense: np.ndarray, pruned: np.ndarray, labels: np.ndarray, num_classes: int):
    """(overall flip rate, per class (n, flipped)) of one step against the dense model."""
    flipped = pruned != dense
    n = np.bincount(labels, minlength=num_classes)
    f = np.bincount(labels, weights=flipped, minlength=num_classes).astype(np.int64)
    return float(flipped.mean()) if flipped.size else float("nan"), n, f


def read_run(run_dir: Path) -> tuple[np.ndarray, dict[int, np.ndarray]] | None:
    """(labels, {step: predictions}) of a run, or None when it has no dense predictions."""
    labels = store.labels_path(run_dir)
    if not labels.exists() or not store.step_path(run_dir, 0, "pred.npy").exists():
        return None
    preds = {}
    for p in Path(run_dir).glob("step-*.pred.npy"):
        preds[int(p.name.split(".")[0].split("-")[1])] = store.read_npy(p).astype(np.int64)
    return store.read_npy(labels).astype(np.int64), preds


def analyze_flips(runs_dir: Path, records: pd.DataFrame, by, top: int = 5) -> Flips:
    """Flip rates of every run with predictions, and per group of `by` (seeds its
    replicates) and t: the mean flip rate, the PIE set's size and share, per class too."""
    records = with_setting_columns(records, by)
    by = [b for b in by if b in records.columns and b != "seed"]
    meta = records.drop_duplicates(["run_id", "step"])[["run_id", "step", "t_target", *by]]
    num_classes = int(records["class"].max()) + 1 if not records.empty else 0
    loaded, run_rows, class_rows, notes = {}, [], [], []
    for run_id in meta["run_id"].unique():
        got = read_run(store.run_dir(runs_dir, run_id))
        if got is None:
            continue
        loaded[run_id] = got
        labels, preds = got
        for step, pred in sorted(preds.items()):
            rate, n, f = flip_rates(preds[0], pred, labels, num_classes)
            run_rows.append({"run_id": run_id, "step": step, "flip_rate": rate})
            class_rows += [{"run_id": run_id, "step": step, "class": c, "n": int(n[c]),
                            "flipped": int(f[c])} for c in range(num_classes)]  # fmt: skip
    skipped = meta["run_id"].nunique() - len(loaded)
    if skipped:
        notes.append(f"{skipped} run(s) without recorded predictions (an export, or recorded "
                     "before predictions were kept): left out of the flip rates")  # fmt: skip
    t_of = meta.rename(columns={"t_target": "t"})
    runs = pd.DataFrame(run_rows, columns=["run_id", "step", "flip_rate"])
    runs = runs.merge(t_of, on=["run_id", "step"])
    classes = pd.DataFrame(class_rows, columns=["run_id", "step", "class", "n", "flipped"])
    classes = classes.merge(t_of[["run_id", "step", "t"]], on=["run_id", "step"])
    with np.errstate(invalid="ignore", divide="ignore"):
        classes["flip_rate"] = classes["flipped"] / classes["n"].where(classes["n"] > 0)
    groups, pie_classes, most = _pie(runs, loaded, by, num_classes, top, notes)
    return Flips(runs, classes, groups, pie_classes, most, notes)


def _pie(runs, loaded, by, num_classes, top, notes):
    group_rows, class_rows, most_rows = [], [], []
    keys = [*by, "t"]
    if runs.empty:
        return pd.DataFrame(columns=keys), pd.DataFrame(columns=keys), pd.DataFrame(columns=keys)
    for key, part in runs.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ids = list(dict.fromkeys(part["run_id"]))
        label_sets = [loaded[r][0] for r in ids]
        if any(not np.array_equal(label_sets[0], y) for y in label_sets[1:]):
            notes.append(f"group {dict(zip(keys, key))}: its runs were tested on different "
                         "examples; no PIE set")  # fmt: skip
            continue
        labels = label_sets[0]
        steps = dict(zip(part["run_id"], part["step"]))
        dense = np.stack([loaded[r][1][0] for r in ids])
        pruned = np.stack([loaded[r][1][steps[r]] for r in ids])
        dense_modal, pruned_modal = modal(dense, num_classes), modal(pruned, num_classes)
        pie = dense_modal != pruned_modal
        n = np.bincount(labels, minlength=num_classes)
        per_class = np.bincount(labels, weights=pie, minlength=num_classes).astype(np.int64)
        row = dict(zip(keys, key))
        group_rows.append({**row, "n_runs": len(ids), "mean_flip_rate": part["flip_rate"].mean(),
                           "pie": int(pie.sum()), "pie_share": float(pie.mean())})  # fmt: skip
        for c in range(num_classes):
            share = per_class[c] / n[c] if n[c] else float("nan")
            class_rows.append({**row, "class": c, "n": int(n[c]), "pie": int(per_class[c]),
                               "pie_share": share})  # fmt: skip
        times_flipped = (pruned != dense).sum(axis=0)
        for c in range(num_classes):
            idx = np.flatnonzero(labels == c)
            order = idx[np.argsort(-times_flipped[idx], kind="stable")][:top]
            most_rows += [
                {**row, "class": c, "example": int(e), "runs_flipped": int(times_flipped[e]),
                 "n_runs": len(ids),
                 "dense_prediction": int(dense_modal[e]),
                 "pruned_prediction": int(pruned_modal[e])}
                for e in order if times_flipped[e] > 0
            ]  # fmt: skip
    groups = pd.DataFrame(group_rows)
    most = pd.DataFrame(most_rows)
    if not most.empty:  # the examples of each group's largest t only
        last = most.groupby(by, dropna=False)["t"].transform("max") if by else most["t"].max()
        most = most[most["t"] == last].reset_index(drop=True)
    return groups, pd.DataFrame(class_rows), most
