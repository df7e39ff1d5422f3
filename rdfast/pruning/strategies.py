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

from rdfast.config import CLASS_MAX
from rdfast.data import TensorData
from rdfast.errors import BadInput
from rdfast.kernels import prune_lowest, prune_lowest_fused
from rdfast.pruning.calibration import calibration_batches, class_sums, preserved_buffers
from rdfast.pruning.class_share import class_share_masks
from rdfast.seeding import generator


def target_remaining(total: int, t: float) -> int:
    return int(round(total / t))


def check_ratios(total: int, ratios) -> None:
    for t in ratios:
        if target_remaining(total, t) < 1:
            raise BadInput(
                f"ratio t={t:g} leaves no weight: the model has {total} prunable weights"
            )


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
    draw = calibration_batches(data, batches, batch_size, seed_parts)
    return mean_gradients(model, layers, draw, F.cross_entropy)


def mean_gradients(model: nn.Module, layers: dict[str, nn.Parameter], batches, loss_fn):
    """Mean over the (x, y) `batches` of d loss_fn(model(x), y) / dw, model in train mode.

    The data loss alone: weight decay lives in the optimizer, never in this loss. Gradients
    accumulate in the parameters' own .grad (one copy of the weights' size, whatever the
    number of batches) and are divided in place. Forward passes in train mode would move
    batch-norm running statistics; they are put back, so measuring the gradient leaves the
    model as it was.
    """
    with preserved_buffers(model):
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
    return grads


def class_gradients(
    model: nn.Module,
    layers: dict[str, nn.Parameter],
    data: TensorData,
    *,
    batches: int,
    batch_size: int,
    seed_parts: tuple,
    memory: int | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Per class c of the calibration batches (the `data_gradients` draw): (c, the mean over
    c's examples of d(cross-entropy)/dw). Every batch runs whole (batch-norm statistics as
    the mean gradient sees them) and back-propagates each class's own examples' losses.
    Where the classes' gradients fit `memory` (`calibration.class_sums`), one forward pass
    a batch serves them all; else one class at a time, re-drawing the same batches, so the
    memory beyond the model is one gradient of the layers' size whatever the number of
    classes. Both give the same numbers."""

    def draw():
        return calibration_batches(data, batches, batch_size, seed_parts)

    labels = torch.cat([y for _, y in draw()])
    classes = torch.unique(labels).tolist()
    # Each batch's sum over c's examples times batches / n_c, averaged over the batches (the
    # division below), is the mean over c's n_c examples.
    scales = {c: batches / int((labels == c).sum()) for c in classes}
    params = list(layers.values())

    def term(c, logits, y):
        own = y == c
        if not bool(own.any()):  # a zero gradient: nothing to add
            return None
        loss = F.cross_entropy(logits, y, reduction="none")[own].sum() * scales[c]
        return [g.detach() for g in torch.autograd.grad(loss, params, retain_graph=True)]

    for c, got in class_sums(model, draw, classes, params, term, memory):
        got = got or [torch.zeros_like(w) for w in params]
        yield c, {name: g.div_(batches) for name, g in zip(layers, got)}


def class_max_scores(weights: list, per_class, strategy: str, form: str, eps: float) -> list:
    """Per weight, the largest `kernels.saliency` score over the classes' gradients
    (`per_class`: an iterable of gradient lists aligned with `weights`): a weight that any
    one class needs keeps a high score, where the mean gradient's score can cancel between
    classes (Tran et al., "Pruning has a disparate impact on model accuracy", 2022: the
    classes with the largest gradient norms lose most)."""
    from rdfast.kernels import saliency

    scores = None
    for grads in per_class:
        s = [saliency(w, g, strategy=strategy, form=form, eps=eps) for w, g in zip(weights, grads)]
        scores = s if scores is None else [torch.maximum(a, b) for a, b in zip(scores, s)]
    if scores is None:
        raise BadInput("no calibration examples: the class gradients of gp/up need one")
    return scores


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
    class_grads=None,
    class_importance=None,
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
    counts are global. `class_grads` (an iterable of per-class gradient dicts) with a form
    ending in -max: gp/up score with `class_max_scores`, stored, then selected exactly. cs
    selects on `class_importance` (an iterable of per-class importance lists aligned with the
    layers; `class_share`).
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
    elif strategy == "cs":
        if class_importance is None:
            raise ValueError("cs needs the classes' importance")
        if group is not None:
            raise ValueError("cs is not available across processes")
        new = class_share_masks(layers, old, n, class_importance, names)
    elif strategy in ("gp", "up") and form.endswith(CLASS_MAX):
        if class_grads is None:
            raise ValueError(f"saliency {form} needs the class gradients")
        if group is not None:
            raise ValueError(f"saliency {form} is not available across processes")
        weights = [layers[k].detach() for k in names]
        per_class = ([g[k] for k in names] for g in class_grads)
        base = form.removesuffix(CLASS_MAX)
        scores = class_max_scores(weights, per_class, strategy, base, eps)
        new = prune_lowest(scores, old, n, names=names, group=group)
    else:
        weights = [layers[k].detach() for k in names]
        g = None if grads is None else [grads[k] for k in names]
        form = form.removesuffix(CLASS_MAX)  # mp: the form does not matter
        new = prune_lowest_fused(
            weights, g, old, n, strategy=strategy, form=form, eps=eps, names=names, group=group
        )
    return dict(zip(names, new))


def prune_to(layers, masks, t, strategy, **kw) -> dict[str, torch.Tensor]:
    """`select_masks`, and the removed weights zeroed in place."""
    new = select_masks(layers, masks, t, strategy, **kw)
    apply_masks(layers, new)
    return new
