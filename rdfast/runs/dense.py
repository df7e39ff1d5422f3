"""The dense model of each seed: trained once, cached under OUT/dense/<key>/, shared by every
strategy of that seed (so strategy comparisons are paired).

Get-or-train: an intact cached checkpoint trained for this key is loaded; otherwise one
process trains it (others wait on its lock), resuming its `partial.pt` if a killed process
left one, and saves it with its checksum. Held in memory while the seed's runs need it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rdfast import training
from rdfast.config import DEFAULT_FLOOR
from rdfast.errors import RunFailed
from rdfast.runs import store
from rdfast.runs.context import RunContext
from rdfast.stats.measures import untrained_limit


class DenseModels:
    """Dense checkpoints of one engine's experiment, by seed."""

    def __init__(self, ctx: RunContext, save_every: float = 60.0):
        self.ctx = ctx
        self._held: dict[int, dict | RunFailed] = {}  # per seed: checkpoint or its failure
        # Dense training saves its state at the end of an epoch when this many seconds have
        # passed since the last save: a killed run repeats at most that much of it.
        self.save_every = save_every

    def in_memory(self, seed: int) -> bool:
        return seed in self._held

    def forget(self, seed: int) -> None:
        self._held.pop(seed, None)

    def get(self, seed: int) -> dict:
        """The trained dense model of `seed`, from the cache or trained now (then cached).

        Held in memory too, so the strategies of one seed neither reload nor retrain it, and
        a dense model whose training failed is tried once per command.
        """
        if seed not in self._held:
            try:
                self._held[seed] = self._load_or_train(seed)
            except RunFailed as e:
                self._held[seed] = e
        if isinstance(self._held[seed], RunFailed):
            raise RunFailed(f"dense training failed: {self._held[seed]}")
        return self._held[seed]

    def path(self, seed: int, key: dict | None = None) -> Path:
        key = key or self.ctx.dense_key(seed)
        return store.dense_checkpoint(self.ctx.out, store.stable_hash(key))

    def elsewhere(self, seed: int) -> bool:
        """Whether another process is training this seed's dense model right now."""
        path = self.path(seed)
        return not path.exists() and store.lock_holder(store.lock_path(path.parent)) is not None

    def _read(self, path: Path, key: dict) -> dict | None:
        """The cached dense model if it is intact and was trained for `key`; else None, with
        one line saying why (the caller then trains it again, bit for bit)."""
        if not path.exists():
            return None
        try:
            ckpt = store.load_torch(path)
            if ckpt.get("key") != store.stable_hash(key):
                raise store.DamagedFile(
                    path, f"holds the dense model {ckpt.get('key')}, not {store.stable_hash(key)}"
                )
            return ckpt
        except store.DamagedFile as e:
            self.ctx.log(f"dense checkpoint {e}: training it again")
            return None

    def _load_or_train(self, seed: int) -> dict:
        key = self.ctx.dense_key(seed)
        path = self.path(seed, key)
        ckpt = self._read(path, key)
        if ckpt is not None:
            return ckpt
        lock = store.lock_path(path.parent)
        with store.locked(lock, wait=False) as held:
            if held:
                return self._train(seed, key, path)
        holder = store.lock_holder(lock) or "another process"
        self.ctx.log(f"dense seed {seed}: waiting for {holder}")
        with store.locked(lock, wait=True):
            ckpt = self._read(path, key)  # trained by the other process
            return ckpt if ckpt is not None else self._train(seed, key, path)

    def _resume(self, seed: int, model, partial_path: Path) -> tuple[dict, dict | None]:
        """(rewind snapshot so far, resume point) of an interrupted training, loaded into
        `model` and the global generator; ({}, None) when there is none to continue."""
        if not partial_path.exists():
            return {}, None
        try:
            partial = store.load_torch(partial_path)
        except store.DamagedFile as e:
            self.ctx.log(f"dense seed {seed}: {e}: training from the start")
            store.remove(partial_path)
            return {}, None
        model.load_state_dict(partial["model"])
        torch.set_rng_state(partial["rng"])
        return partial["rewind"], {"epoch": partial["epoch"], "optimizer": partial["optimizer"]}

    def _snapshot(self, model, rewind: dict, epoch: int) -> None:
        """The rewind point: the weights after `--rewind-epoch` epochs (rewind runs only)."""
        p = self.ctx.exp.prune
        if p.retrain == "rewind" and epoch == p.rewind_epoch:
            rewind["state"] = _cpu_state(model, clone=True)

    def _epoch_end(self, model, rewind: dict, partial_path: Path):
        """The hook after each epoch: the rewind snapshot at its epoch, and the partial
        checkpoint when `save_every` seconds have passed since the last one."""
        epochs = self.ctx.exp.train.epochs
        last_save = time.perf_counter()

        def on_epoch_end(epoch, opt):
            nonlocal last_save
            self._snapshot(model, rewind, epoch)
            if epoch < epochs and time.perf_counter() - last_save >= self.save_every:
                store.save_torch(
                    partial_path,
                    {
                        "epoch": epoch,
                        "model": _cpu_state(model),
                        "optimizer": opt.state_dict(),
                        "rewind": rewind,
                        "rng": torch.get_rng_state(),
                    },
                )
                last_save = time.perf_counter()

        return on_epoch_end

    def _train(self, seed: int, key: dict, path: Path) -> dict:
        """Train the dense model of `seed` (resuming partial.pt) and cache it at `path`."""
        ctx, exp = self.ctx, self.ctx.exp
        store.remove(path)  # damaged or foreign, if present (the lock is held)
        store.clear_temporaries(path.parent, lock_held=True)
        model = ctx.new_model(seed)
        partial_path = store.dense_partial(path)
        rewind, resume = self._resume(seed, model, partial_path)
        on_epoch_end = self._epoch_end(model, rewind, partial_path)
        if resume is None:
            self._snapshot(model, rewind, 0)
        first = 0 if resume is None else resume["epoch"]
        bar = tqdm(
            total=exp.train.epochs,
            initial=first,
            desc=f"dense seed {seed}",
            unit="epoch",
            leave=False,
            disable=ctx.quiet,
        )
        forward = ctx.forward(model)
        try:
            stats = training.train(
                model,
                ctx.data,
                exp.train,
                seed_parts=(seed, "dense"),
                on_epoch_end=on_epoch_end,
                progress=bar,
                forward=forward,
                resume=resume,
            )
        finally:
            bar.close()
        ev = training.evaluate(model, ctx.data, ctx.eval_batch, exp.train.precision,
                               forward=forward)  # fmt: skip
        cm = ev["confusion"]
        ctx.log(
            f"dense seed {seed}: {stats['seconds']:.1f} s, "
            f"{stats['images_per_second']:,.0f} img/s training, "
            f"{ev['eval_images_per_second']:,.0f} img/s evaluation, "
            f"test accuracy {cm.trace() / cm.sum():.4f}"
        )
        warn_untrained(cm, seed, ctx.log)
        ckpt = {
            "key": store.stable_hash(key),
            "model": _cpu_state(model),
            "rewind": rewind.get("state"),
            "confusion": torch.from_numpy(cm),
            "predictions": torch.from_numpy(ev["predictions"]),
            "loss": ev["loss"],
            "seconds": stats["seconds"],
            "images_per_second": stats["images_per_second"],
            "eval_images_per_second": ev["eval_images_per_second"],
        }
        store.save_torch(path, ckpt)
        store.write_json(store.dense_settings(path), key)
        store.remove(partial_path)
        return ckpt


def warn_untrained(cm, seed, log) -> None:
    """One line when the dense model ended near chance (`stats.measures.untrained_runs`):
    its training diverged or did not start, and `analyze` will leave its runs out."""
    accuracy, n_classes = cm.trace() / cm.sum(), int((cm.sum(axis=1) > 0).sum())
    if accuracy < untrained_limit(n_classes, DEFAULT_FLOOR):
        log(
            f"warning: dense seed {seed} ended at test accuracy {accuracy:.3f}, near chance "
            f"({1 / n_classes:.3f}): its training did not converge (a learning rate too high "
            "for this model?); rdfast analyze leaves its runs out"
        )


def _cpu_state(model, clone: bool = False) -> dict:
    return {
        k: (v.detach().cpu().clone() if clone else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
