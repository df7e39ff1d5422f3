"""Global unstructured pruning: scores per strategy, then the lowest are removed.

Ratio t = prunable weights / remaining prunable weights. To reach t from the current masks,
exactly `remaining - round(total / t)` kept weights are removed (Python's round: halves to
even), chosen across all layers at once by `rdfast.kernels.prune_lowest`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from rdfast.data import TensorData
from rdfast.errors import BadInput
from rdfast.kernels import prune_lowest, prune_lowest_fused
from rdfast.seeding import generator


def target_remaining(total: int, t: float) -> int:
    return int(round(total / t))


def check_ratios(total: int, ratios) -> None:
    for t in ratios:
        if target_remaining(total, t) < 1:
            raise BadInput(
                f"ratio t={t:g} leaves no weight: the model has {total} prunable weights"
            )


def _batches(data: TensorData, batch_size: int, gen: torch.Generator) -> Iterator:
    while True:  # more batches than one epoch holds: continue with a fresh permutation
        yield from data.train_batches(batch_size, gen)


def data_gradients(
    model: nn.Module,
    layers: dict[str, nn.Parameter],
    data: TensorData,
    *,
    batches: int,
    batch_size: int,
    seed_parts: tuple,
) -> dict[str, torch.Tensor]:
    """Mean over `batches` training batches of d(cross-entropy)/dw, model in train mode."""
    stream = _batches(data, batch_size, generator(*seed_parts))
    return mean_gradients(model, layers, (next(stream) for _ in range(batches)), F.cross_entropy)


def mean_gradients(model: nn.Module, layers: dict[str, nn.Parameter], batches, loss_fn):
    """Mean over the (x, y) `batches` of d loss_fn(model(x), y) / dw, model in train mode.

    The data loss alone: weight decay lives in the optimizer, never in this loss. Gradients
    accumulate in the parameters' own .grad (one copy of the weights' size, whatever the
    number of batches) and are divided in place. Forward passes in train mode would move
    batch-norm running statistics; they are put back, so measuring the gradient leaves the
    model as it was.
    """
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    for p in model.parameters():
        p.grad = None
    count = 0
    for x, y in batches:
        loss_fn(model(x), y).backward()
        count += 1
    if count == 0:
        raise BadInput("no calibration batches: the gradient of gp/up needs at least one")
    grads = {name: w.grad.detach().div_(count) for name, w in layers.items()}
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return grads


def random_scores(layers: dict[str, nn.Parameter], seed_parts: tuple) -> list[torch.Tensor]:
    gen = generator(*seed_parts)
    return [torch.rand(w.shape, generator=gen).to(w.device) for w in layers.values()]


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    for name, w in layers.items():
        w.mul_(masks[name].to(w.dtype))


def magnitude_counts(dense_weights: dict[str, torch.Tensor], t: float) -> dict[str, int]:
    """Per layer: how many weights global magnitude pruning of the dense model to ratio t
    keeps. Non-increasing in t (one score, a rising threshold), so the masks of a run that
    follows them stay nested."""
    names = list(dense_weights)
    ws = [dense_weights[k] for k in names]
    total = sum(w.numel() for w in ws)
    ones = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    kept = prune_lowest_fused(
        ws, None, ones, total - target_remaining(total, t), strategy="mp", names=names
    )
    return {k: int(m.sum()) for k, m in zip(names, kept)}


def layer_matched_random(
    layers: dict[str, nn.Parameter],
    masks: dict[str, torch.Tensor],
    counts: dict[str, int],
    seed_parts: tuple,
) -> list[torch.Tensor]:
    """Random pruning inside each layer down to `counts[layer]` kept weights (uniform among
    the layer's kept weights, seeded): OpenLTH's `layerwise` random pruning."""
    scores = random_scores(layers, seed_parts)
    out = []
    for (name, _), s in zip(layers.items(), scores):
        n = max(int(masks[name].sum()) - counts[name], 0)
        out.append(prune_lowest([s], [masks[name]], n, names=[name])[0])
    return out


def global_counts(counts: list[int], group) -> list[int]:
    """`counts` summed over the processes of `group` (as they are without one)."""
    if group is None:
        return list(counts)
    import torch.distributed as dist

    summed = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(summed, group=group)
    return [int(v) for v in summed]


def select_masks(
    layers: dict[str, nn.Parameter],
    masks: dict[str, torch.Tensor] | None,
    t: float,
    strategy: str,
    *,
    grads: dict[str, torch.Tensor] | None = None,
    form: str = "taylor",
    eps: float = 0.0,
    seed_parts: tuple = (),
    dense_weights: dict[str, torch.Tensor] | None = None,
    group=None,
) -> dict[str, torch.Tensor]:
    """New masks holding round(total / t) weights (`masks` None: every weight is kept now).

    mp/gp/up score inside the selection passes (no score tensor is stored); rp draws seeded
    uniform scores over all layers at once; rp-layer draws them inside each layer, down to
    the per-layer counts magnitude pruning gives `dense_weights` at t. With `group`, the
    layers are this process's share of a model spread over the group's processes, and the
    counts are global.
    """
    names = list(layers)
    if masks is None:
        masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in layers.items()}
    total = sum(m.numel() for m in masks.values())
    remaining = sum(int(m.sum()) for m in masks.values())
    total, remaining = global_counts([total, remaining], group)
    n = max(remaining - target_remaining(total, t), 0)
    old = [masks[k] for k in names]
    if strategy == "rp":
        new = prune_lowest(random_scores(layers, seed_parts), old, n, names=names, group=group)
    elif strategy == "rp-layer":
        if dense_weights is None:
            raise ValueError("rp-layer needs the dense model's weights")
        if group is not None:
            raise ValueError("rp-layer is not available across processes")
        counts = magnitude_counts({k: dense_weights[k] for k in names}, t)
        new = layer_matched_random(layers, masks, counts, seed_parts)
    else:
        weights = [layers[k].detach() for k in names]
        g = None if grads is None else [grads[k] for k in names]
        new = prune_lowest_fused(
            weights, g, old, n, strategy=strategy, form=form, eps=eps, names=names, group=group
        )
    return dict(zip(names, new))


def prune_to(layers, masks, t, strategy, **kw) -> dict[str, torch.Tensor]:
    """`select_masks`, and the removed weights zeroed in place."""
    new = select_masks(layers, masks, t, strategy, **kw)
    apply_masks(layers, new)
    return new
