"""Pruning a model someone else trained: its checkpoint loaded into the architecture it
belongs to, global masks per ratio, and the pruned weights written back shaped like the input.

`prune_module` is the Python API (a model, calibration batches, a loss -> the masks of each
ratio); `rdfast prune` (rdfast/runs/given_study.py) measures per-class recall with it.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rdfast.config import STRATEGIES
from rdfast.errors import BadInput
from rdfast.kernels.selection import zero_lowest_fused
from rdfast.models import prunable_layers
from rdfast.pruning.checkpoints import Checkpoint
from rdfast.pruning.strategies import (
    apply_masks,
    check_ratios,
    global_counts,
    mean_gradients,
    select_masks,
    target_remaining,
)
from rdfast.runs import store

MASKS_FILE = "masks.safetensors"


def all_kept(layers: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Masks that keep every weight, one byte in all each (expanded): a 3e8-weight model's
    masks of ones would otherwise take 300 MB before anything is pruned."""
    return {
        k: torch.ones((), dtype=torch.bool, device=w.device).expand(w.shape)
        for k, w in layers.items()
    }


def prune_module(
    model: nn.Module,
    ratios: Sequence[float],
    strategy: str = "mp",
    *,
    batches: Iterable | None = None,
    loss_fn: Callable = F.cross_entropy,
    saliency: str = "taylor",
    eps: float = 5e-4,
    seed: int = 0,
    exclude: Sequence[str] = (),
    grads: dict[str, torch.Tensor] | None = None,
    apply: bool = False,
    group=None,
) -> dict[float, dict[str, torch.Tensor]]:
    """Global unstructured masks (module path -> bool tensor, True = kept) for each ratio t
    (prunable weights / kept weights), each pruned once from the model's current weights.

    Prunable: the weights of every Linear and Conv layer outside `exclude` (module paths).
    gp/up score with the mean gradient of `loss_fn(model(x), y)` over the (x, y) `batches`,
    accumulated in the parameters' .grad (one copy, whatever the number of batches; pass
    `grads` to reuse one); scores are computed inside the selection passes, never stored.
    rp draws seeded uniform scores (`seed`), the same for every ratio, so its masks nest;
    rp-layer keeps magnitude pruning's per-layer counts. `apply`: the weights outside the
    mask are zeroed in place (one ratio only). `group`: a torch.distributed process group
    over which the model's layers are spread; the selection is global over all of them.
    """
    if strategy not in STRATEGIES:
        raise BadInput(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    ratios = [float(t) for t in ratios]
    if apply and len(ratios) != 1:
        raise ValueError("apply=True prunes the model to one ratio; give one")
    layers = prunable_layers(model, tuple(exclude))
    if group is None:
        check_ratios(sum(w.numel() for w in layers.values()), ratios)
    grads = _gradients(model, layers, strategy, grads, batches, loss_fn)
    dense = {k: w.detach() for k, w in layers.items()} if strategy == "rp-layer" else None
    out = {}
    for t in ratios:
        out[t] = select_masks(
            layers,
            all_kept(layers),
            t,
            strategy,
            grads=grads,
            form=saliency,
            eps=eps,
            seed_parts=(seed, "rp"),
            dense_weights=dense,
            group=group,
        )
    if apply:
        apply_masks(layers, out[ratios[0]])
    return out


def prune_in_place(
    model: nn.Module,
    t: float,
    strategy: str = "mp",
    *,
    batches: Iterable | None = None,
    loss_fn: Callable = F.cross_entropy,
    saliency: str = "taylor",
    eps: float = 5e-4,
    exclude: Sequence[str] = (),
    grads: dict[str, torch.Tensor] | None = None,
    group=None,
) -> dict[str, int]:
    """`prune_module(..., apply=True)` for one ratio and mp/gp/up, with no mask kept: the
    lowest-scored weights are zeroed as the last selection pass reads them, so the memory
    beyond weights and gradients is a chunk and the histograms (for a model that barely
    fits). Returns the weights kept per layer; the same weights as `prune_module` go."""
    if strategy not in ("mp", "gp", "up"):
        raise BadInput(f"prune_in_place scores by magnitude or gradient (mp, gp, up), not "
                       f"{strategy}: random scores would have to be stored")  # fmt: skip
    layers = prunable_layers(model, tuple(exclude))
    names = list(layers)
    (total,) = global_counts([sum(w.numel() for w in layers.values())], group)
    check_ratios(total, [t])
    grads = _gradients(model, layers, strategy, grads, batches, loss_fn)
    kept = zero_lowest_fused(
        [layers[k].detach() for k in names],
        None if strategy == "mp" else [grads[k] for k in names],
        total - target_remaining(total, t),
        strategy=strategy,
        form=saliency,
        eps=eps,
        names=names,
        group=group,
    )
    return dict(zip(names, kept))


def _gradients(model, layers, strategy, grads, batches, loss_fn):
    """The gradient gp and up score with: `grads` as given, or the mean over `batches`."""
    if strategy not in ("gp", "up") or grads is not None:
        return grads
    if batches is None:
        raise BadInput(f"{strategy} scores with a gradient: give calibration batches")
    return mean_gradients(model, layers, batches, loss_fn)


# --------------------------------------------------------------------------- checkpoints


def load_weights(model: nn.Module, ckpt: Checkpoint, num_classes: int | None = None) -> None:
    """The checkpoint's tensors into `model`, after checking every name and shape: the first
    mismatch is named with both shapes (a classifier of another class count says so)."""
    state = ckpt.state_dict()
    own = model.state_dict()
    head = list(prunable_layers(model))[-1]
    for name, mine in own.items():
        if name not in state:
            raise BadInput(
                f"{ckpt.path} does not match the model: {name} {tuple(mine.shape)} is not in "
                f"the checkpoint (it holds {len(state)} tensors, e.g. {next(iter(state), '-')})"
            )
        theirs = state[name]
        if tuple(theirs.shape) != tuple(mine.shape):
            if num_classes is not None and name.startswith(head + ".") and theirs.ndim >= 1:
                raise BadInput(
                    f"{ckpt.path}: the classifier {name} has {theirs.shape[0]} outputs, the "
                    f"dataset {num_classes} classes"
                )
            raise BadInput(
                f"{ckpt.path} does not match the model: {name} is {tuple(theirs.shape)} in "
                f"the checkpoint, {tuple(mine.shape)} in the model"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise BadInput(
            f"{ckpt.path} does not match the model: the checkpoint's {extra[0]} "
            f"{tuple(state[extra[0]].shape)} is not in the model"
        )
    model.load_state_dict(state)


def shard_plan(ckpt: Checkpoint, names: Iterable[str]) -> dict[str, list[str]]:
    """File name -> the tensors it holds, as in the input checkpoint (a torch state dict
    becomes one model.safetensors)."""
    names = list(names)
    if not ckpt.is_safetensors:
        return {"model.safetensors": names}
    plan: dict[str, list[str]] = {s.path.name: [] for s in ckpt.shards}
    for n in names:  # load_weights checked that the model and checkpoint share every name
        plan[ckpt.entries[n].file.name].append(n)
    return {f: ns for f, ns in plan.items() if ns}


def save_pruned(
    folder: Path, ckpt: Checkpoint, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> None:
    """A pruned model in the input's format: safetensors shards shaped like the input (same
    files, tensor names, dtypes and index) with every other file of the input's folder
    (config, ...), or for a torch state dict a plain state dict of the model under the
    input's file name (loads with `model.load_state_dict(torch.load(path))`); its masks
    bit-packed (np.packbits, 1 bit a weight) beside them. Written into FOLDER.partial and
    renamed when complete: never a half-written model."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    _remove_tree(partial)
    partial.mkdir(parents=True)
    try:
        if not ckpt.is_safetensors:
            torch.save({n: _as_stored(ckpt, n, t) for n, t in state.items()},
                       partial / ckpt.path.name)  # fmt: skip
        else:
            plan = shard_plan(ckpt, state)
            for file, names in plan.items():
                tensors = {n: _as_stored(ckpt, n, state[n]) for n in names}
                _save_safetensors(save_file, tensors, partial / file, {"format": "pt"})
            if ckpt.index_file is not None:
                weight_map = {n: f for f, ns in plan.items() for n in ns}
                index = {"metadata": {"total_size": _nbytes(state)}, "weight_map": weight_map}
                (partial / ckpt.index_file.name).write_text(json.dumps(index, indent=2) + "\n")
            ckpt.copy_other_files(partial)
        packed = {k: np.packbits(m.detach().cpu().reshape(-1).numpy()) for k, m in masks.items()}
        shapes = {k: list(m.shape) for k, m in masks.items()}
        _save_safetensors(save_numpy, packed, partial / MASKS_FILE, {"shapes": json.dumps(shapes)})
        # Every file's checksum, last: a rerun or `rdfast status` tells a complete folder
        # from one a full disk or a user truncated.
        digests = store.file_digests(partial)
        (partial / store.SAVED_RECORD).write_text(json.dumps({"files": digests}, indent=2) + "\n")
        _remove_tree(folder)
        partial.rename(folder)
    except BaseException:
        _remove_tree(partial)
        raise


def _save_safetensors(save_file, tensors: dict, path: Path, metadata: dict) -> None:
    """The library's save_file, its errors as the OSError they are (a full disk: one line,
    exit 1, not the library's SafetensorError traceback)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        full = "No space left" in str(e) or "os error 28" in str(e)
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, os.strerror(code) if full else str(e), str(path)) from None


def load_masks(folder: Path) -> dict[str, torch.Tensor]:
    """The bit-packed masks `save_pruned` wrote, as bool tensors of their shapes."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / MASKS_FILE), framework="numpy") as f:
        shapes = json.loads(f.metadata()["shapes"])
        out = {}
        for k, shape in shapes.items():
            n = int(np.prod(shape, dtype=np.int64))
            bits = np.unpackbits(f.get_tensor(k), count=n).astype(bool)
            out[k] = torch.from_numpy(bits).view(shape)
    return out


def _as_stored(ckpt: Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype the input stored it in, contiguous, on the CPU."""
    t = t.detach().cpu()
    if ckpt.is_safetensors and name in ckpt.entries:
        from rdfast.pruning.checkpoints import DTYPES

        t = t.to(DTYPES[ckpt.entries[name].dtype])
    return t.contiguous()


def _nbytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)
