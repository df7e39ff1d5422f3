"""The files of a run's steps: each step's records, confusion matrix, predictions and state,
written in an order that makes resuming safe, and checked before a run resumes.

The same for `rdfast run` and `rdfast prune --dataset`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rdfast.runs import store


def step_records(meta: dict, cm: np.ndarray, class_names, **step) -> pd.DataFrame:
    """One row per class: support, recall, and the model-level accuracy and loss."""
    support = cm.sum(axis=1)
    correct = np.diagonal(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
    n = len(class_names)
    df = pd.DataFrame(
        {
            **meta,
            **step,
            "class": np.arange(n),
            "class_name": list(class_names),
            "support": support.astype(np.int64),
            "correct": correct.astype(np.int64),
            "recall": recall,
            "accuracy": correct.sum() / cm.sum(),
        }
    )
    return df


def meta_columns(
    run_id, settings, *, dataset, model, width, seed, weight_decay, retrain, device,
    mitigation="plain",
):  # fmt: skip
    """The record columns that name a run (`settings`: its key, with dense_id, strategy,
    saliency and eps), the same for `rdfast run` and `rdfast prune`."""
    eps = settings["eps"]
    return {
        "records_version": store.RECORDS_VERSION,
        "run_id": run_id,
        "dense_id": settings["dense_id"],
        "dataset": dataset,
        "model": model,
        "width": float(width),
        "seed": seed,
        "strategy": settings["strategy"],
        "saliency": settings["saliency"],
        "eps": float("nan") if eps is None else float(eps),
        "weight_decay": float(weight_decay),
        "retrain": retrain,
        "mitigation": mitigation,
        "device": device,
    }


def intact_steps(run_dir: Path, data, log, stateful: bool = True) -> tuple[int, dict | None]:
    """(last recorded step, its state) after checking every recorded file of a run.

    Records must parse and agree with their confusion matrices, and the latest state must
    match its checksum (`stateful`: runs whose steps start from the one before). Anything
    missing or damaged sends the run back to its dense model (every step is recomputed bit
    for bit: earlier states are not kept), with one line naming the file."""
    done = store.step_files(run_dir)
    if not done:
        return -1, None
    last, c = max(done), data.num_classes
    n_test = int(data.y_test.shape[0])
    try:
        for i in range(last + 1):
            if i not in done:
                raise store.DamagedFile(store.step_path(run_dir, i, "parquet"), "missing")
            df = store.read_parquet(done[i])
            store.check_owner(done[i], df)
            cm = store.read_npy(store.step_path(run_dir, i, "npy"))
            if cm.shape != (c, c) or int(cm.sum()) != n_test:
                raise store.DamagedFile(store.step_path(run_dir, i, "npy"), "not this run's matrix")
            if len(df) != c or not (
                np.array_equal(df["correct"].to_numpy(), cm.diagonal())
                and np.array_equal(df["support"].to_numpy(), cm.sum(1))
            ):
                raise store.DamagedFile(done[i], "disagrees with its confusion matrix")
            _check_predictions(run_dir, i, cm)
        state = None
        if stateful and last >= 1:
            state = store.load_torch(store.step_path(run_dir, last, "pt"))
    except (store.DamagedFile, KeyError) as e:
        log(f"run {run_dir.name}: {e}: recomputing the run from its dense model")
        for f in store.step_files_of(run_dir):
            store.remove(f)
        return -1, None
    return last, state


def _check_predictions(run_dir: Path, i: int, cm: np.ndarray) -> None:
    """A step's predictions, where recorded, count up to its confusion matrix exactly."""
    path = store.step_path(run_dir, i, "pred.npy")
    if not path.exists():  # runs recorded before predictions were kept
        return
    labels_path = store.labels_path(run_dir)
    if not labels_path.exists():
        raise store.DamagedFile(labels_path, "missing beside the predictions")
    pred, y = store.read_npy(path), store.read_npy(labels_path)
    c = cm.shape[0]
    ok = pred.shape == y.shape == (int(cm.sum()),) and (
        pred.size == 0
        or (
            0 <= pred.min()
            and pred.max() < c
            and np.array_equal(
                np.bincount(y.astype(np.int64) * c + pred, minlength=c * c).reshape(c, c), cm
            )
        )
    )
    if not ok:
        raise store.DamagedFile(path, "disagrees with its confusion matrix")  # fmt: skip


def write_step(
    run_dir: Path, i, meta, cm, class_names, loss, t, remaining, total, seconds, state,
    predictions=None, labels=None,
):  # fmt: skip
    """Step i of a run. Order matters for resuming: the state first, then the confusion
    matrix and each test example's prediction, then the records that mark the step done; the
    previous state goes only after. Step 0 also writes the test labels the predictions are of
    (once per run: they are the same at every step)."""
    if state is not None:
        store.save_torch(store.step_path(run_dir, i, "pt"), state)
    store.write_npy(store.step_path(run_dir, i, "npy"), np.asarray(cm, dtype=np.int64))
    if predictions is not None:
        if i == 0:
            y = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
            store.write_npy(store.labels_path(run_dir), y.astype(predictions.dtype))
        store.write_npy(store.step_path(run_dir, i, "pred.npy"), np.asarray(predictions))
    df = step_records(
        meta,
        np.asarray(cm),
        class_names,
        step=i,
        t_target=float(t),
        t_actual=total / remaining,
        remaining=remaining,
        total=total,
        loss=float(loss),
        seconds=float(seconds),
    )
    store.write_parquet(store.step_path(run_dir, i, "parquet"), df)
    if i > 1:
        store.remove(store.step_path(run_dir, i - 1, "pt"))
