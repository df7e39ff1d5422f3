"""`rdfast prune` with a dataset: a trained model someone brings, pruned once per ratio with
each strategy, its per-class recall measured, recorded as `rdfast run` records its runs.

One run = (strategy, seed) of the given model. Step 0 is the given model (t = 1); step i
restores the given weights, prunes them to ratio t_i (`given_model.prune_module`), optionally
fine-tunes, evaluates on the test split and records. Steps do not build on each other, so a
run resumes at its first step not recorded, and the records, manifests and folder layout are
those `rdfast analyze`, `report` and `status` read. The given model is the dense model of
every run (`dense_id` names the checkpoint by its sha256), so strategies pair seed by seed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rdfast import training
from rdfast.config import PruneJob, TrainSettings
from rdfast.data import load_dataset, normalize
from rdfast.errors import BadInput, RunFailed
from rdfast.kernels.selection import NaNScoreError
from rdfast.models import build_model, check_takes, is_convolutional, prunable_layers
from rdfast.pruning.checkpoints import Checkpoint
from rdfast.pruning.given_model import load_weights, prune_module, save_pruned
from rdfast.pruning.strategies import check_ratios, data_gradients
from rdfast.runs import keys, store
from rdfast.runs.context import use_channels_last
from rdfast.runs.engine import resolve_device
from rdfast.runs.keys import eval_batch
from rdfast.runs.lifecycle import RunOutcome, now, run_steps
from rdfast.runs.steps import intact_steps, meta_columns, write_step
from rdfast.seeding import derive_seed


def _refuse_foreign_folder(out: Path) -> None:
    """The records of `rdfast prune --dataset` go into a new or empty folder, or one rdfast
    wrote records into: never among a user's own files."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = (out / "runs").is_dir() or store.records_path(out).exists()
    if not ours:
        raise BadInput(
            f"refusing to write the prune records into {out}: it is not empty and holds no "
            "rdfast records; give a new or empty folder"
        )


def warn_near_chance(ev: dict, data, normalization: dict, warn) -> None:
    """One line when the given model is no better than twice chance: the checkpoint, the
    data or the normalization probably do not match."""
    chance = 1 / data.num_classes
    accuracy = float(ev["confusion"].diagonal().sum() / ev["confusion"].sum())
    if accuracy <= 2 * chance:
        n = normalization
        warn(
            f"warning: the given model's accuracy on {data.name} is {accuracy:.3f}, "
            f"at most twice chance ({2 * chance:.3f}): do the checkpoint, the data and "
            f"--normalize {n['normalize']} (mean {n['mean']}, std {n['std']}) match "
            "how it was trained?"
        )


@dataclass
class GivenModel:
    """The loaded model, its prunable layers, the given weights (restored before every step)
    and their evaluation (step 0 of every run)."""

    model: torch.nn.Module
    layers: dict
    weights: dict
    total: int
    evaluation: dict | None = None
    grads: dict = field(default_factory=dict)  # per seed, while its runs need them


class GivenModelStudy:
    def __init__(self, job: PruneJob, progress: bool | None = None, log=None, warn=None):
        self.job = job
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg))
        self.warn = warn or (lambda msg: tqdm.write(msg, file=sys.stderr))

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Validate, load the data and the checkpoint into the model; nothing is written."""
        job = self.job
        job.validate()
        if job.model is None:
            raise BadInput("--model is needed with --dataset: the architecture of the checkpoint")
        if job.include:
            raise BadInput("--include selects tensors of a streamed prune (no --dataset); "
                           "with --dataset, leave layers out with --exclude")  # fmt: skip
        self.device = resolve_device(job.device)
        self.precision = "fp32"
        self.eval_batch = eval_batch(job.model, self.device.type)
        self.ckpt = Checkpoint(job.checkpoint)
        data = load_dataset(job.dataset, job.data_root)
        model = build_model(job.model, data.input_shape, data.num_classes, job.width)
        load_weights(model, self.ckpt, data.num_classes)
        data, self.normalization = normalize(data, job.normalize, model)
        check_takes(model, data, job.model)
        self.out = store.check_out(job.out)
        _refuse_foreign_folder(self.out)
        # As `rdfast run` does; masks are paired with weights by logical index.
        self.channels_last = use_channels_last(self.device, is_convolutional(model))
        data.channels_last = self.channels_last
        self.data = data.to(self.device)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        layers = prunable_layers(model, job.exclude)
        total = sum(w.numel() for w in layers.values())
        check_ratios(total, job.ratios)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.given = GivenModel(model, layers, weights, total)
        self.sha256 = self.ckpt.sha256()

    # ------------------------------------------------------------------ keys
    @property
    def dense_id(self) -> str:
        return keys.given_dense_id(self.sha256, self.job.model, self.job.width)

    def run_settings(self, strategy: str) -> dict:
        return keys.given_run_settings(
            self.job, strategy, self.dense_id, self.device.type, self.eval_batch
        )

    def run_id(self, seed: int, strategy: str) -> str:
        return keys.given_run_id(self.run_settings(strategy), self.data.name, seed)

    # ------------------------------------------------------------------ the runs
    def execute(self) -> list[RunOutcome]:
        j = self.job
        n_steps = len(j.seeds) * len(j.strategies) * len(j.ratios)
        outcomes = []
        disable = None if self.progress is None else not self.progress
        with tqdm(total=n_steps, desc="prune", unit="step", disable=disable) as bar:
            for seed in j.seeds:
                for strategy in j.strategies:
                    outcomes.append(self._run(seed, strategy, bar))
                self.given.grads.pop(seed, None)
        store.consolidate(self.out)
        return outcomes

    def _run(self, seed: int, strategy: str, bar) -> RunOutcome:
        run = GivenRun(self, seed, strategy)
        return run_steps(run, bar, self.device, self.log, self.warn)

    def _new_manifest(self, run_id, seed, strategy) -> dict:
        return {
            "run_id": run_id,
            "dataset": self.data.name,
            "model": self.job.model,
            "width": self.job.width,
            "seed": seed,
            "settings": {**self.run_settings(strategy), "train": {}},
            "checkpoint": {
                "path": str(Path(self.job.checkpoint).resolve()),
                "sha256": self.sha256,
            },  # fmt: skip
            "normalization": self.normalization,
            "created": now(),
        }

    def _saved(self, run_id: str, i: int) -> bool:
        if not self.job.save:
            return True
        folder = store.pruned_model(self.out, run_id, self.job.ratios[i - 1])
        if not folder.is_dir():
            return False
        problem = store.saved_problem(folder)
        if problem is not None:
            self.log(f"run {run_id}: saved model {problem}: pruning it again")
        return problem is None

    def _meta(self, run_id, seed, strategy) -> dict:
        s = self.run_settings(strategy)
        return meta_columns(
            run_id,
            s,
            dataset=self.data.name,
            model=self.job.model,
            width=self.job.width,
            seed=seed,
            # The weight decay of the given model's training is not known here.
            weight_decay=float("nan"),
            retrain=s["retrain"],
            device=self.device.type,
        )

    def _record_given(self, folder, run_id, seed, strategy) -> None:
        g = self.given
        if g.evaluation is None:
            g.model.load_state_dict(g.weights)
            start = time.perf_counter()
            ev = training.evaluate(g.model, self.data, self.eval_batch, self.precision)
            g.evaluation = {**ev, "seconds": time.perf_counter() - start}
            warn_near_chance(ev, self.data, self.normalization, self.warn)
        ev = g.evaluation
        meta = self._meta(run_id, seed, strategy)
        write_step(folder, 0, meta, ev["confusion"], self.data.class_names, ev["loss"], 1.0,
                   g.total, g.total, ev["seconds"], state=None, predictions=ev["predictions"],
                   labels=self.data.y_test)  # fmt: skip

    def _gradients(self, seed: int) -> dict:
        """The mean gradient of the given model over seed's calibration batches, once per
        seed (gp and up of a seed score with the same one)."""
        g, j = self.given, self.job
        if seed not in g.grads:
            g.model.load_state_dict(g.weights)
            g.grads[seed] = data_gradients(
                g.model,
                g.layers,
                self.data,
                batches=j.grad_batches,
                batch_size=j.batch_size,
                seed_parts=(seed, "calibration"),
            )
        return g.grads[seed]

    def _step(self, folder, run_id, seed, strategy, i) -> None:
        g, j = self.given, self.job
        t = j.ratios[i - 1]
        start = time.perf_counter()
        torch.manual_seed(derive_seed(seed, strategy, i, "step"))
        grads = self._gradients(seed) if strategy in ("gp", "up") else None
        g.model.load_state_dict(g.weights)
        try:
            masks = prune_module(
                g.model,
                [t],
                strategy,
                grads=grads,
                saliency=j.saliency,
                eps=j.up_eps,
                seed=seed,
                exclude=j.exclude,
                apply=True,
            )[float(t)]
        except NaNScoreError as e:
            raise RunFailed(f"pruning to t={t:g} failed: {e}") from None
        if j.finetune_epochs:
            self._finetune(masks, seed, i)
        ev = training.evaluate(g.model, self.data, self.eval_batch, self.precision)
        remaining = sum(int(m.sum()) for m in masks.values())
        if j.save:
            save_pruned(store.pruned_model(self.out, run_id, t), self.ckpt,
                        g.model.state_dict(), masks)  # fmt: skip
        meta = self._meta(run_id, seed, strategy)
        write_step(folder, i, meta, ev["confusion"], self.data.class_names, ev["loss"], t,
                   remaining, g.total, time.perf_counter() - start, state=None,
                   predictions=ev["predictions"])  # fmt: skip

    def _finetune(self, masks, seed, i) -> None:
        g, j = self.given, self.job
        settings = TrainSettings(
            epochs=j.finetune_epochs,
            lr=j.finetune_lr,
            batch_size=j.batch_size,
            weight_decay=j.weight_decay,
            precision=self.precision,
        )
        by_param = {g.layers[k]: m for k, m in masks.items()}
        training.train(g.model, self.data, settings, masks=by_param,
                       seed_parts=(seed, i, "finetune"))  # fmt: skip


class GivenRun:
    """One (seed, strategy) of a given model's study, as the lifecycle runs it: step 0 is the
    given model, each step i pruned from it afresh, so any step not recorded (or whose saved
    model is damaged) is done again on its own."""

    def __init__(self, study: GivenModelStudy, seed: int, strategy: str):
        self.study, self.seed, self.strategy = study, seed, strategy
        self.run_id = study.run_id(seed, strategy)
        self.folder = store.run_dir(study.out, self.run_id)
        self.n_steps = len(study.job.ratios)
        self._todo: list[int] = []
        self._given_recorded = False

    def new_manifest(self) -> dict:
        return self.study._new_manifest(self.run_id, self.seed, self.strategy)

    def remaining(self) -> int:
        s = self.study
        last, _ = intact_steps(self.folder, s.data, s.log, stateful=False)
        self._given_recorded = last >= 0
        self._todo = [
            i for i in range(1, self.n_steps + 1) if i > last or not s._saved(self.run_id, i)
        ]
        return len(self._todo)

    def work(self, bar) -> dict:
        s = self.study
        if not self._given_recorded:
            s._record_given(self.folder, self.run_id, self.seed, self.strategy)
        for i in self._todo:
            s._step(self.folder, self.run_id, self.seed, self.strategy, i)
            bar.update(1)
        return {}
