"""The experiment engine: train a dense model once, prune it with each strategy, record.

One *run* = (dataset, model, width, seed, strategy and its settings). All runs of one seed
branch from the same dense model, cached under a hash of what determines it, so strategy
comparisons are paired. Each run walks its ratios in order; after every step the state and
the records are written atomically, so a killed command loses at most the step in progress
and a rerun continues where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import rdfast
from rdfast import store, training
from rdfast.config import (
    PAPER_STRATEGIES,
    PRECISIONS,
    PruneSettings,
    TrainSettings,
    check_strategies,
)
from rdfast.data import TensorData, load_dataset
from rdfast.dense import DenseModels
from rdfast.errors import BadInput, RunFailed
from rdfast.kernels._backend import cuda_path, interpreting
from rdfast.kernels.selection import NaNScoreError
from rdfast.models import build_model, prunable_layers
from rdfast.pruning import (
    apply_masks,
    check_ratios,
    data_gradients,
    prune_to,
)
from rdfast.seeding import derive_seed
from rdfast.training import masked_linear_layers

DENSE_FORMAT = 1


@dataclass
class Experiment:
    """Everything one `rdfast run` command asks for."""

    dataset: str = "digits"
    model: str = "mlp"
    width: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    strategies: tuple[str, ...] = PAPER_STRATEGIES
    train: TrainSettings | None = None
    prune: PruneSettings = field(default_factory=PruneSettings)
    device: str = "auto"
    data_root: Path | None = None
    out: Path = Path("runs")
    masked_kernels: bool = False  # Linear layers through the masked-linear kernel (CUDA)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model for training and evaluation


@dataclass
class RunOutcome:
    run_id: str
    seed: int
    strategy: str
    status: str
    error: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise BadInput(f"unknown device {name!r}; choose from auto, cpu, cuda")
    return torch.device(name)


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


class Engine:
    def __init__(self, exp: Experiment, progress: bool | None = None, log=None):
        self.exp = exp
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.data: TensorData | None = None
        self.dense_models = DenseModels(self)

    # ------------------------------------------------------------------ validation
    def prepare(self) -> None:
        """Validate every setting and load the data; nothing is written here."""
        exp = self.exp
        if exp.train is None:
            raise BadInput("training settings are missing")
        exp.train.validate()
        exp.prune.validate(exp.train)
        check_strategies(exp.strategies)
        if not exp.seeds:
            raise BadInput("no seeds given")
        self.device = resolve_device(exp.device)
        if exp.masked_kernels and self.device.type != "cuda" and not interpreting():
            raise BadInput("--masked-kernels needs a CUDA device (--device cuda)")
        if exp.masked_kernels and exp.compile:
            raise BadInput("--masked-kernels and --compile do not combine yet; choose one")
        if exp.precision not in ("auto", *PRECISIONS):
            raise BadInput(
                f"unknown precision {exp.precision!r}; choose from auto, {', '.join(PRECISIONS)}"
            )
        precision = exp.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        exp.train = replace(exp.train, precision=precision)
        data = load_dataset(exp.dataset, exp.data_root)
        probe = build_model(exp.model, data.input_shape, data.num_classes, exp.width)
        try:  # a model that cannot take this data fails here, with a reason, not mid-run
            with torch.no_grad():
                probe.eval()(data.prepare(data.x_train[:2]))
        except RuntimeError as e:
            raise BadInput(
                f"model {exp.model} cannot take inputs of shape {data.input_shape}: "
                f"{' '.join(str(e).split())[:160]}"
            ) from None
        layers = prunable_layers(probe, exp.prune.exclude)
        self.convolutional = any(isinstance(m, torch.nn.Conv2d) for m in probe.modules())
        # channels_last pays on CUDA tensor cores for conv nets; on the CPU it would only
        # change the arithmetic order and with it the bit-identical records. RDFAST_CUDA_PATH
        # takes it on the CPU too, to check the CUDA code path without a GPU.
        self.channels_last = (self.device.type == "cuda" or cuda_path()) and self.convolutional
        data.channels_last = self.channels_last
        check_ratios(sum(w.numel() for w in layers.values()), exp.prune.ratios)
        self.data = data.to(self.device)
        self.out = Path(exp.out)
        for p in (self.out, *self.out.absolute().parents):
            if p.exists():
                if not p.is_dir():
                    raise BadInput(f"--out {self.out}: {p} exists and is not a directory")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise BadInput(f"--out {self.out}: {p} is not writable")
                break

    # ------------------------------------------------------------------ keys
    def dense_key(self, seed: int) -> dict:
        exp = self.exp
        return {
            "format": DENSE_FORMAT,
            "dataset": self.data.name,
            "model": exp.model,
            "width": exp.width,
            "seed": seed,
            "train": asdict(exp.train),
            "rewind_epoch": exp.prune.rewind_epoch if exp.prune.retrain == "rewind" else None,
            "device": self.device.type,
            # CPU reductions split work by thread: 1 and 2 threads give losses that differ in
            # the 7th digit, so the thread count is part of what a CPU model is.
            **({"threads": torch.get_num_threads()} if self.device.type == "cpu" else {}),
        }

    def run_settings(self, seed: int, strategy: str) -> dict:
        p, tr = self.exp.prune, self.exp.train
        uses_grad = strategy in ("gp", "up")
        return {
            "dense_id": store.stable_hash(self.dense_key(seed)),
            "strategy": strategy,
            "saliency": p.saliency if uses_grad else "none",
            "grad_batches": p.grad_batches if uses_grad else None,
            "eps": p.eps(tr) if strategy == "up" else None,
            "ratios": list(p.ratios),
            "retrain": p.retrain,
            "finetune_epochs": p.finetune_epochs if p.retrain == "finetune" else None,
            "finetune_lr": p.finetune_rate(tr) if p.retrain == "finetune" else None,
            "rewind_epoch": p.rewind_epoch if p.retrain == "rewind" else None,
            "exclude": list(p.exclude),
            "masked_kernels": self.exp.masked_kernels,
            # Rewound survivors train from the rewind epoch to the end of the schedule, the
            # learning rate resuming there (OpenLTH's lottery loop); the key is absent for
            # fine-tuning, whose run ids stay as they were.
            **({"rewind_schedule": "resume"} if p.retrain == "rewind" else {}),
        }

    # ------------------------------------------------------------------ pieces
    def _new_model(self, seed: int):
        torch.manual_seed(derive_seed(seed, "init"))
        model = build_model(
            self.exp.model, self.data.input_shape, self.data.num_classes, self.exp.width
        )
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _forward(self, model):
        """What training and evaluation call: the model, or its torch.compile'd form."""
        return torch.compile(model) if self.exp.compile else model

    def dense(self, seed: int) -> dict:
        return self.dense_models.get(seed)

    def _quiet(self):
        return None if self.progress is None else not self.progress

    # ------------------------------------------------------------------ one run
    def run_id(self, seed: int, strategy: str, settings: dict | None = None) -> str:
        settings = settings or self.run_settings(seed, strategy)
        return store.stable_hash(
            {"dense": self.dense_key(seed), **settings, "records": store.RECORDS_VERSION}
        )

    def run_one(self, seed: int, strategy: str, bar) -> RunOutcome:
        settings = self.run_settings(seed, strategy)
        run_id = self.run_id(seed, strategy, settings)
        run_dir = self.out / "runs" / run_id
        with store.locked(run_dir / ".lock", wait=False) as held:
            if held:
                return self._run_locked(seed, strategy, settings, run_id, run_dir, bar)
        holder = store.lock_holder(run_dir / ".lock") or "another process"
        self.log(f"run {run_id} (seed {seed}, {strategy}) is being written by {holder}: skipped")
        bar.update(len(self.exp.prune.ratios))
        return RunOutcome(run_id, seed, strategy, "busy", f"being written by {holder}")

    def _run_locked(self, seed, strategy, settings, run_id, run_dir, bar) -> RunOutcome:
        """One run, resumed from its recorded steps; the caller holds the run's lock."""
        exp, p = self.exp, self.exp.prune
        for stale in run_dir.glob(".*.tmp"):  # a write the last process did not finish
            stale.unlink()
        last_done, state = self._intact_steps(run_id, run_dir)
        manifest_path = run_dir / "manifest.json"
        manifest = None
        if manifest_path.exists():
            try:
                manifest = store.read_json(manifest_path)
            except store.DamagedFile as e:
                self.log(f"run {run_id}: {e}: writing it again")
                store.remove(manifest_path)
        if not isinstance(manifest, dict):
            manifest = {
                "run_id": run_id,
                "dataset": self.data.name,
                "model": exp.model,
                "width": exp.width,
                "seed": seed,
                "settings": {**settings, "train": asdict(exp.train)},
                "created": _now(),
            }
        if last_done == len(p.ratios):
            if manifest.get("status") != "complete":  # killed after its last step
                manifest.update(status="complete", error=None, updated=_now())
                store.write_json(manifest_path, manifest)
            bar.update(len(p.ratios))
            return RunOutcome(run_id, seed, strategy, "complete")
        manifest.update(status="running", error=None, updated=_now(), **environment(self.device))
        store.write_json(manifest_path, manifest)

        meta = {
            "records_version": store.RECORDS_VERSION,
            "run_id": run_id,
            "dense_id": settings["dense_id"],
            "dataset": self.data.name,
            "model": exp.model,
            "width": float(exp.width),
            "seed": seed,
            "strategy": strategy,
            "saliency": settings["saliency"],
            "eps": float("nan") if settings["eps"] is None else float(settings["eps"]),
            "weight_decay": float(exp.train.weight_decay),
            "retrain": p.retrain,
            "device": self.device.type,
        }
        try:
            dense = self.dense(seed)
            model = self._new_model(seed)
            forward = self._forward(model)
            layers = prunable_layers(model, p.exclude)
            total = sum(w.numel() for w in layers.values())
            if last_done <= 0:
                model.load_state_dict(dense["model"])
                masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in layers.items()}
            else:
                model.load_state_dict(state["model"])
                masks = {k: v.to(self.device) for k, v in state["masks"].items()}
            if last_done < 0:
                self._write_step(
                    run_dir,
                    0,
                    meta,
                    dense["confusion"].numpy(),
                    dense["loss"],
                    1.0,
                    total,
                    total,
                    dense["seconds"],
                    state=None,
                )
                last_done = 0
            throughput = []
            for i in range(last_done + 1, len(p.ratios) + 1):
                t = p.ratios[i - 1]
                start = time.perf_counter()
                # Dropout and other draws from the global generator start from a state of
                # this step's own, so a resumed run repeats them exactly.
                torch.manual_seed(derive_seed(seed, strategy, i, "step"))
                masks = self._prune_step(model, layers, masks, strategy, seed, i, t, dense)
                kernels = (
                    masked_linear_layers(model, masks)
                    if exp.masked_kernels
                    else contextlib.nullcontext()
                )
                with kernels:
                    stats = self._retrain(model, layers, masks, dense, seed, i, forward)
                    ev = training.evaluate(
                        model, self.data, precision=exp.train.precision, forward=forward
                    )
                if stats:
                    throughput.append(stats["images_per_second"])
                remaining = sum(int(m.sum()) for m in masks.values())
                state = {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "masks": {k: v.cpu() for k, v in masks.items()},
                }
                self._write_step(
                    run_dir,
                    i,
                    meta,
                    ev["confusion"],
                    ev["loss"],
                    t,
                    remaining,
                    total,
                    time.perf_counter() - start,
                    state=state,
                )
                bar.update(1)
            manifest.update(
                status="complete",
                updated=_now(),
                dense={
                    "seconds": dense["seconds"],
                    "train_images_per_second": dense["images_per_second"],
                    "eval_images_per_second": dense["eval_images_per_second"],
                },
                retrain_images_per_second=float(np.mean(throughput)) if throughput else None,
            )
            store.write_json(manifest_path, manifest)
            return RunOutcome(run_id, seed, strategy, "complete")
        except RunFailed as e:
            manifest.update(status="failed", error=str(e), updated=_now())
            store.write_json(manifest_path, manifest)
            self.log(f"run {run_id} (seed {seed}, {strategy}) failed: {e}")
            return RunOutcome(run_id, seed, strategy, "failed", str(e))

    def _intact_steps(self, run_id: str, run_dir: Path) -> tuple[int, dict | None]:
        """(last recorded step, its state) after checking every recorded file of the run.

        Records must parse and agree with their confusion matrices, and the latest state must
        match its checksum. Anything missing or damaged sends the run back to its dense model
        (every step is recomputed bit for bit: earlier states are not kept), with one line
        naming the file."""
        done = store.step_files(run_dir)
        if not done:
            return -1, None
        last, c = max(done), self.data.num_classes
        n_test = int(self.data.y_test.shape[0])
        try:
            for i in range(last + 1):
                if i not in done:
                    raise store.DamagedFile(run_dir / f"step-{i}.parquet", "missing")
                df = store.read_parquet(done[i])
                cm = store.read_npy(run_dir / f"step-{i}.npy")
                if cm.shape != (c, c) or int(cm.sum()) != n_test:
                    raise store.DamagedFile(run_dir / f"step-{i}.npy", "not this run's matrix")
                if len(df) != c or not np.array_equal(df["correct"].to_numpy(), cm.diagonal()):
                    raise store.DamagedFile(done[i], "disagrees with its confusion matrix")
            state = store.load_torch(run_dir / f"step-{last}.pt") if last >= 1 else None
        except (store.DamagedFile, KeyError) as e:
            self.log(f"run {run_id}: {e}: recomputing the run from its dense model")
            for f in run_dir.glob("step-*"):
                store.remove(f)
            return -1, None
        return last, state

    def _prune_step(self, model, layers, masks, strategy, seed, i, t, dense):
        p, tr = self.exp.prune, self.exp.train
        grads = None
        if strategy in ("gp", "up"):
            grads = data_gradients(
                model,
                layers,
                self.data,
                batches=p.grad_batches,
                batch_size=tr.batch_size,
                seed_parts=(seed, i, "grad"),
            )
        try:
            return prune_to(
                layers,
                masks,
                t,
                strategy,
                grads=grads,
                form=p.saliency,
                eps=p.eps(tr),
                seed_parts=(seed, i, "rp"),
                dense_weights={k: dense["model"][f"{k}.weight"] for k in layers},
            )
        except NaNScoreError as e:  # the gradient estimate blew up
            raise RunFailed(f"pruning to t={t:g} failed: {e}") from None

    def _retrain(self, model, layers, masks, dense, seed, i, forward):
        p, tr = self.exp.prune, self.exp.train
        by_param = {layers[k]: m for k, m in masks.items()}
        if p.retrain == "rewind":
            model.load_state_dict(dense["rewind"])
            apply_masks(layers, masks)
            return training.train(
                model,
                self.data,
                tr,
                masks=by_param,
                seed_parts=(seed, i, "rewind"),
                forward=forward,
                start_epoch=p.rewind_epoch,
            )
        if p.finetune_epochs == 0:
            return None
        return training.train(
            model,
            self.data,
            tr,
            lr=p.finetune_rate(tr),
            epochs=p.finetune_epochs,
            masks=by_param,
            seed_parts=(seed, i, "finetune"),
            forward=forward,
        )

    def _write_step(self, run_dir, i, meta, cm, loss, t, remaining, total, seconds, state):
        # Order matters for resuming: the state first, then the confusion matrix, then the
        # records that mark the step done; the previous state goes only after that.
        if state is not None:
            store.save_torch(run_dir / f"step-{i}.pt", state)
        store.write_npy(run_dir / f"step-{i}.npy", np.asarray(cm, dtype=np.int64))
        df = step_records(
            meta,
            np.asarray(cm),
            self.data.class_names,
            step=i,
            t_target=float(t),
            t_actual=total / remaining,
            remaining=remaining,
            total=total,
            loss=float(loss),
            seconds=float(seconds),
        )
        store.write_parquet(run_dir / f"step-{i}.parquet", df)
        if i > 1:
            store.remove(run_dir / f"step-{i - 1}.pt")

    # ------------------------------------------------------------------ all runs
    def execute(self) -> list[RunOutcome]:
        if self.data is None:
            self.prepare()
        exp = self.exp
        n_steps = len(exp.seeds) * len(exp.strategies) * len(exp.prune.ratios)
        outcomes = []
        queue, deferred = list(exp.seeds), set()
        todo = {seed: list(exp.strategies) for seed in exp.seeds}
        with tqdm(total=n_steps, desc="prune+retrain", unit="step", disable=self._quiet()) as bar:
            while queue:
                seed = queue.pop(0)
                while todo[seed]:
                    # While another process trains this seed's dense model, the seed's runs
                    # would only wait for it: once, the rest of them go to the back.
                    if (
                        queue
                        and seed not in deferred
                        and not self.dense_models.in_memory(seed)
                        and self.dense_models.elsewhere(seed)
                    ):
                        deferred.add(seed)
                        queue.append(seed)
                        break
                    outcomes.append(self.run_one(seed, todo[seed].pop(0), bar))
                else:
                    self.dense_models.forget(seed)  # its strategies are done: free the weights
        store.consolidate(self.out)
        return outcomes


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
