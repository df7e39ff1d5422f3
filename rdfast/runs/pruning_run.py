"""One pruning run: a (seed, strategy) of an experiment, from its dense model through every
ratio, each step pruned, retrained, evaluated and recorded.

Resumable: the recorded steps are checked (`_intact_steps`) and the run continues after the
last intact one; each step writes its state, its confusion matrix and then its records, so a
killed process loses at most the step in progress. The run's lock keeps other processes out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import rdfast
from rdfast import mitigations, training
from rdfast.runs import store
from rdfast.errors import RunFailed
from rdfast.kernels.selection import NaNScoreError
from rdfast.models import prunable_layers
from rdfast.pruning.strategies import apply_masks, data_gradients, prune_to
from rdfast.seeding import derive_seed
from rdfast.training import masked_linear_layers


@dataclass
class RunOutcome:
    run_id: str
    seed: int
    strategy: str
    status: str
    error: str | None = None


@functools.cache
def _git_commit() -> str | None:
    try:
        here = Path(rdfast.__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    return {
        "versions": {
            "rdfast": rdfast.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "python": platform.python_version(),
        },
        "device": device_name(device),
        "git_commit": _git_commit(),
        "platform": platform.platform(),
    }


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class PruningRun:
    """One (seed, strategy) of an experiment: `run` resumes it and records every step."""

    def __init__(self, engine, seed: int, strategy: str):
        self.engine, self.seed, self.strategy = engine, seed, strategy
        self.exp, self.data = engine.exp, engine.data
        self.settings = engine.run_settings(seed, strategy)
        self.run_id = engine.run_id(seed, strategy, self.settings)
        self.dir = store.run_dir(engine.out, self.run_id)
        self.manifest_path = store.manifest_path(self.dir)

    def outcome(self, status: str, error: str | None = None) -> RunOutcome:
        return RunOutcome(self.run_id, self.seed, self.strategy, status, error)

    def run(self, bar) -> RunOutcome:
        """The run, unless another process is writing it (then "busy")."""
        with store.locked(store.lock_path(self.dir), wait=False) as held:
            if held:
                return self._locked(bar)
        holder = store.lock_holder(store.lock_path(self.dir)) or "another process"
        self.engine.log(
            f"run {self.run_id} (seed {self.seed}, {self.strategy}) is being written by "
            f"{holder}: skipped"
        )
        bar.update(len(self.exp.prune.ratios))
        return self.outcome("busy", f"being written by {holder}")

    def _locked(self, bar) -> RunOutcome:
        """Resume from the recorded steps; the caller holds the run's lock."""
        n_steps = len(self.exp.prune.ratios)
        store.clear_temporaries(self.dir, lock_held=True)  # writes a killed process left
        last_done, state = intact_steps(self.dir, self.data, self.engine.log)
        manifest = self._manifest()
        if last_done == n_steps:
            if manifest.get("status") != "complete":  # killed after its last step
                manifest.update(status="complete", error=None, updated=_now())
                store.write_json(self.manifest_path, manifest)
            bar.update(n_steps)
            return self.outcome("complete")
        manifest.update(
            status="running", error=None, updated=_now(), **environment(self.engine.device)
        )
        store.write_json(self.manifest_path, manifest)
        try:
            manifest.update(self._steps(last_done, state, bar))
            manifest.update(status="complete", updated=_now())
            store.write_json(self.manifest_path, manifest)
            return self.outcome("complete")
        except RunFailed as e:
            manifest.update(status="failed", error=str(e), updated=_now())
            store.write_json(self.manifest_path, manifest)
            self.engine.log(f"run {self.run_id} (seed {self.seed}, {self.strategy}) failed: {e}")
            return self.outcome("failed", str(e))

    def _manifest(self) -> dict:
        """The run's manifest as recorded, or a new one (also for a damaged one)."""
        exp = self.exp
        return load_manifest(self.manifest_path, self.engine.log) or new_manifest(
            self.run_id, self.data.name, exp, self.seed, self.settings
        )

    def _steps(self, last_done: int, state: dict | None, bar) -> dict:
        """Every step after `last_done`; returns what the manifest records of the run."""
        exp, p = self.exp, self.exp.prune
        dense = self.engine.dense(self.seed)
        model = self.engine._new_model(self.seed)
        forward = self.engine._forward(model)
        # Built before any step seeds the global generator (building draws from it), so a
        # resumed run's steps draw what the uninterrupted run's did.
        self._mitigation = self._mitigation_setup(dense, state if last_done > 0 else None)
        layers = prunable_layers(model, p.exclude)
        total = sum(w.numel() for w in layers.values())
        meta = record_meta(self)
        if last_done <= 0:
            model.load_state_dict(dense["model"])
            masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in layers.items()}
        else:
            model.load_state_dict(state["model"])
            masks = {k: v.to(self.engine.device) for k, v in state["masks"].items()}
        if last_done < 0:
            dense_pred = dense.get("predictions")  # absent from dense models of rdfast < 0.2
            self._write_step(
                0,
                meta,
                dense["confusion"].numpy(),
                dense["loss"],
                1.0,
                total,
                total,
                dense["seconds"],
                state=None,
                predictions=None if dense_pred is None else dense_pred.numpy(),
            )
        throughput = []
        for i in range(max(last_done, 0) + 1, len(p.ratios) + 1):
            t = p.ratios[i - 1]
            start = time.perf_counter()
            # Dropout and other draws from the global generator start from a state of this
            # step's own, so a resumed run repeats them exactly.
            torch.manual_seed(derive_seed(self.seed, self.strategy, i, "step"))
            masks = self._prune(model, layers, masks, i, t, dense)
            kernels = (
                masked_linear_layers(model, masks)
                if exp.masked_kernels
                else contextlib.nullcontext()
            )
            with kernels:
                stats = self._retrain(model, layers, masks, dense, i, forward)
                ev = training.evaluate(model, self.data, self.engine.eval_batch,
                                       exp.train.precision, forward=forward)  # fmt: skip
            if stats:
                throughput.append(stats["images_per_second"])
            remaining = sum(int(m.sum()) for m in masks.values())
            state = {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "masks": {k: v.cpu() for k, v in masks.items()},
            }
            if "multipliers" in self._mitigation:
                state["multipliers"] = self._mitigation["multipliers"].cpu().clone()
            self._write_step(
                i,
                meta,
                ev["confusion"],
                ev["loss"],
                t,
                remaining,
                total,
                time.perf_counter() - start,
                state=state,
                predictions=ev["predictions"],
            )
            bar.update(1)
        return {
            "dense": {
                "seconds": dense["seconds"],
                "train_images_per_second": dense["images_per_second"],
                "eval_images_per_second": dense["eval_images_per_second"],
            },
            "retrain_images_per_second": float(np.mean(throughput)) if throughput else None,
        }

    def _prune(self, model, layers, masks, i, t, dense):
        p, tr = self.exp.prune, self.exp.train
        grads = None
        if self.strategy in ("gp", "up"):
            grads = data_gradients(
                model,
                layers,
                self.data,
                batches=p.grad_batches,
                batch_size=tr.batch_size,
                seed_parts=(self.seed, i, "grad"),
            )
        try:
            return prune_to(
                layers,
                masks,
                t,
                self.strategy,
                grads=grads,
                form=p.saliency,
                eps=p.eps(tr),
                seed_parts=(self.seed, i, "rp"),
                dense_weights={k: dense["model"][f"{k}.weight"] for k in layers},
            )
        except NaNScoreError as e:  # the gradient estimate blew up
            raise RunFailed(f"pruning to t={t:g} failed: {e}") from None

    def _write_step(self, i, meta, cm, loss, t, remaining, total, seconds, state, predictions):
        write_step(self.dir, i, meta, cm, self.data.class_names, loss, t, remaining, total,
                   seconds, state, predictions=predictions, labels=self.data.y_test)  # fmt: skip

    def _mitigation_setup(self, dense, state) -> dict:
        """What the run's mitigation needs across its steps: the dense model (kd's teacher,
        and the recall the constraints start from), the validation split and the multipliers
        (from the last recorded step's state when resuming)."""
        p = self.exp.prune
        if p.mitigation == "plain":
            return {}
        teacher = self.engine._new_model(self.seed)
        teacher.load_state_dict(dense["model"])
        teacher.eval().requires_grad_(False)
        setup = {"teacher": teacher, "teacher_forward": self.engine._forward(teacher)}
        if p.mitigation == "constrained":
            data, val = mitigations.validation_split(
                self.data, p.val_fraction, derive_seed(self.seed, "val") % 2**32
            )
            c = self.data.num_classes
            dense_fit = mitigations.class_recall(setup["teacher_forward"], teacher, *val, c)
            saved = None if state is None else state.get("multipliers")
            device = self.engine.device
            multipliers = torch.zeros(c, dtype=torch.float64, device=device) if saved is None \
                else saved.to(device)  # fmt: skip
            setup.update(data=data, val=val, dense_fit=dense_fit, multipliers=multipliers)
        return setup

    def _objective(self, model, forward):
        """(training data, objective) of this step's retraining (the constrained one updates
        the run's multipliers in place)."""
        p, m = self.exp.prune, self._mitigation
        if p.mitigation == "kd":
            return self.data, mitigations.Distillation(
                m["teacher_forward"], p.kd_weight, p.kd_temperature
            )
        if p.mitigation == "constrained":
            data = m["data"]
            batches = -(-int(data.y_train.shape[0]) // self.exp.train.batch_size)
            every = max(1, round(batches / mitigations.UPDATES_PER_EPOCH))
            objective = mitigations.Constrained(model, forward, m["val"], m["dense_fit"],
                                                m["multipliers"], p.constraint_eps,
                                                p.multiplier_lr, every)  # fmt: skip
            return data, objective
        return self.data, None  # training's own default: cross-entropy

    def _retrain(self, model, layers, masks, dense, i, forward):
        p, tr = self.exp.prune, self.exp.train
        by_param = {layers[k]: m for k, m in masks.items()}
        data, objective = self._objective(model, forward)
        if p.retrain == "rewind":
            model.load_state_dict(dense["rewind"])
            apply_masks(layers, masks)
            return training.train(
                model,
                data,
                tr,
                masks=by_param,
                seed_parts=(self.seed, i, "rewind"),
                forward=forward,
                start_epoch=p.rewind_epoch,
                objective=objective,
            )
        if p.finetune_epochs == 0:
            return None
        return training.train(
            model,
            data,
            tr,
            lr=p.finetune_rate(tr),
            epochs=p.finetune_epochs,
            masks=by_param,
            seed_parts=(self.seed, i, "finetune"),
            forward=forward,
            objective=objective,
        )


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


def new_manifest(run_id: str, data_name: str, exp, seed: int, settings: dict) -> dict:
    """The manifest a run of `exp` starts with (its status is added as it goes)."""
    return {
        "run_id": run_id,
        "dataset": data_name,
        "model": exp.model,
        "width": exp.width,
        "seed": seed,
        "settings": {**settings, "train": asdict(exp.train)},
        "normalize": exp.normalize,
        "created": _now(),
    }


def load_manifest(path: Path, log) -> dict | None:
    """A run's recorded manifest; None when missing or damaged (then removed, one line)."""
    if not path.exists():
        return None
    try:
        manifest = store.read_json(path)
    except store.DamagedFile as e:
        log(f"run {path.parent.name}: {e}: writing it again")
        store.remove(path)
        return None
    return manifest if isinstance(manifest, dict) else None


def record_meta(run: PruningRun) -> dict:
    """The columns every record row of a run carries."""
    exp, s = run.exp, run.settings
    return meta_columns(
        run.run_id,
        s,
        dataset=run.data.name,
        model=exp.model,
        width=exp.width,
        seed=run.seed,
        weight_decay=exp.train.weight_decay,
        retrain=exp.prune.retrain,
        device=run.engine.device.type,
        mitigation=exp.prune.mitigation,
    )


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
