"""One pruning run: a (seed, strategy) of an experiment, from its dense model through every
ratio, each step pruned, retrained, evaluated and recorded.

Resumable: the recorded steps are checked (`steps.intact_steps`) and the run continues after
the last intact one; each step writes its state, its confusion matrix and then its records,
so a killed process loses at most the step in progress. The lifecycle around the steps (lock,
manifest, status) is `lifecycle.run_steps`.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from rdfast import mitigations, training
from rdfast.config import CLASS_MAX
from rdfast.errors import RunFailed
from rdfast.kernels.selection import NaNScoreError
from rdfast.models import prunable_layers
from rdfast.pruning.class_share import class_importance
from rdfast.pruning.strategies import apply_masks, class_gradients, data_gradients, prune_to
from rdfast.runs import store
from rdfast.runs.context import RunContext
from rdfast.runs.lifecycle import RunOutcome, new_manifest, run_steps
from rdfast.runs.steps import intact_steps, meta_columns, write_step
from rdfast.seeding import derive_seed
from rdfast.training import masked_linear_layers


class PruningRun:
    """One (seed, strategy) of an experiment, resumed from its intact steps by
    `lifecycle.run_steps`: every ratio pruned, retrained, evaluated and recorded."""

    def __init__(self, ctx: RunContext, dense_models, seed: int, strategy: str):
        self.ctx, self.dense_models = ctx, dense_models
        self.seed, self.strategy = seed, strategy
        self.exp, self.data = ctx.exp, ctx.data
        self.settings = ctx.run_settings(seed, strategy)
        self.run_id = ctx.run_id(seed, strategy, self.settings)
        self.folder = store.run_dir(ctx.out, self.run_id)
        self.n_steps = len(self.exp.prune.ratios)
        self._resume_from: tuple[int, dict | None] = (-1, None)

    def run(self, bar) -> RunOutcome:
        return run_steps(self, bar, self.ctx.device, self.ctx.log)

    # ------------------------------------------------------------------ RunSteps
    def new_manifest(self) -> dict:
        return new_manifest(self.run_id, self.data.name, self.exp, self.seed, self.settings)

    def remaining(self) -> int:
        self._resume_from = intact_steps(self.folder, self.data, self.ctx.log)
        return self.n_steps - max(self._resume_from[0], 0)

    def work(self, bar) -> dict:
        last_done, state = self._resume_from
        return self._steps(last_done, state, bar)

    def _steps(self, last_done: int, state: dict | None, bar) -> dict:
        """Every step after `last_done`; returns what the manifest records of the run."""
        exp, p = self.exp, self.exp.prune
        dense = self.dense_models.get(self.seed)
        model = self.ctx.new_model(self.seed)
        forward = self.ctx.forward(model)
        # Built before any step seeds the global generator (building draws from it), so a
        # resumed run's steps draw what the uninterrupted run's did.
        self._mitigation = mitigations.RunMitigation(self.ctx, p, self.data, self.seed, dense,
                                                     state if last_done > 0 else None)  # fmt: skip
        layers = prunable_layers(model, p.exclude)
        total = sum(w.numel() for w in layers.values())
        meta = record_meta(self)
        if last_done <= 0:
            model.load_state_dict(dense["model"])
            masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in layers.items()}
        else:
            model.load_state_dict(state["model"])
            masks = {k: v.to(self.ctx.device) for k, v in state["masks"].items()}
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
                ev = training.evaluate(model, self.data, self.ctx.eval_batch,
                                       exp.train.precision, forward=forward)  # fmt: skip
            if stats:
                throughput.append(stats["images_per_second"])
            remaining = sum(int(m.sum()) for m in masks.values())
            state = {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "masks": {k: v.cpu() for k, v in masks.items()},
            }
            state.update(self._mitigation.state())
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
        grads = class_grads = importance = None
        draw = dict(batches=p.grad_batches, batch_size=tr.batch_size,
                    seed_parts=(self.seed, i, "grad"))  # fmt: skip
        if self.strategy == "cs":
            importance = (h for _, h in class_importance(model, layers, self.data, **draw))
        if self.strategy in ("gp", "up"):
            if p.saliency.endswith(CLASS_MAX):
                class_grads = (g for _, g in class_gradients(model, layers, self.data, **draw))
            else:
                grads = data_gradients(model, layers, self.data, **draw)
        try:
            return prune_to(
                layers,
                masks,
                t,
                self.strategy,
                grads=grads,
                class_grads=class_grads,
                class_importance=importance,
                form=p.saliency,
                eps=p.eps(tr),
                seed_parts=(self.seed, i, "rp"),
                dense_weights={k: dense["model"][f"{k}.weight"] for k in layers},
            )
        except NaNScoreError as e:  # the gradient estimate blew up
            raise RunFailed(f"pruning to t={t:g} failed: {e}") from None

    def _write_step(self, i, meta, cm, loss, t, remaining, total, seconds, state, predictions):
        write_step(self.folder, i, meta, cm, self.data.class_names, loss, t, remaining, total,
                   seconds, state, predictions=predictions, labels=self.data.y_test)  # fmt: skip

    def _retrain(self, model, layers, masks, dense, i, forward):
        p, tr = self.exp.prune, self.exp.train
        by_param = {layers[k]: m for k, m in masks.items()}
        data, objective = self._mitigation.retraining(model, forward, tr.batch_size)
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
        device=run.ctx.device.type,
        mitigation=exp.prune.mitigation,
    )
