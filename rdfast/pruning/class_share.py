"""Class-share selection (`--strategy cs`): keep, for every class, the same share of the
importance it puts on the weights, after FairGRAPE (Lin, Kim, Sukthankar, ECCV 2022).

Importance of weight i for class c, as FairGRAPE estimates it: H_ic = the mean over the
calibration batches of (|w_i| |g_ic,b|)^2, g_ic,b the gradient of the mean cross-entropy of
batch b's examples of class c (0 where b has none). FairGRAPE then keeps weights one at a
time in a Python loop, each time for the class furthest below its share of the layer's total
importance. rdfast selects the same kind of set in one exact selection instead:

- per class, rank the weights by H_ic (highest first, ties by position) and give each weight
  the share of the class's total importance ranked strictly above it:
  a_ic = sum_{j before i} H_jc / sum_j H_jc, in [0, 1);
- a weight's key is key_i = min_c a_ic, the earliest share at which some class claims it;
- keep the weights with the lowest keys (`kernels.prune_lowest` on -key: exact, ties by
  (tensor, index) as every strategy).

Keeping every weight whose key is below rho keeps, for every class c, the prefix of its own
ranking that holds a share rho of its importance (and the weights other classes claim): the
K lowest keys are those prefixes at the largest rho that K weights allow. With one
class this is the top-K by importance, FairGRAPE's greedy result too. The greedy balances the
kept importance of each class including what other classes chose; class-share counts each
class's own prefix, so with several classes the two sets differ (measured in
benchmarks/README.md). The selection is global over the layers, as rdfast's other
strategies; FairGRAPE's is per layer. FairGRAPE also takes optimizer steps while it
estimates the importance; rdfast leaves the model as it was.

Memory: the classes' importances are measured together, one forward pass a calibration
batch for all of them, where they fit `calibration.CLASS_SUMS_MEMORY` (1 GiB: a float per
weight and class); else one class at a time, each running the batches again. Then, beyond
the model and those importances, one class's ranking (an int64 and a float64 per weight) and
the keys (a float64 per weight), whatever the number of classes: no per-class copy of the
gradients is held.
The keys are rounded to float32 for the selection; weights whose keys round alike are
ordered by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from rdfast.data import TensorData
from rdfast.kernels import prune_lowest
from rdfast.pruning.calibration import calibration_batches, class_sums


def class_importance(
    model: nn.Module,
    layers: dict[str, nn.Parameter],
    data: TensorData,
    *,
    batches: int,
    batch_size: int,
    seed_parts: tuple,
    memory: int | None = None,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Per class c of the calibration batches (the gp/up draw): (c, [H_c per layer]). Every
    batch runs whole in train mode (batch-norm statistics as training sees them); batch-norm
    running statistics are put back afterwards. All classes from one forward pass a batch
    where their importances fit `memory`, else one class at a time: the same numbers."""
    params = list(layers.values())
    labels = torch.cat([y for _, y in calibration_batches(data, batches, batch_size, seed_parts)])
    classes = torch.unique(labels).tolist()

    def term(c, logits, y):
        own = y == c
        if not bool(own.any()):
            return None
        loss = F.cross_entropy(logits[own], y[own])
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        return [(w.detach().float().abs() * g.float().abs()).square_()
                for w, g in zip(params, grads)]  # fmt: skip

    def draw():
        return calibration_batches(data, batches, batch_size, seed_parts)

    for c, got in class_sums(model, draw, classes, params, term, memory):
        got = got or [torch.zeros_like(w, dtype=torch.float32) for w in params]
        yield c, [a.div_(batches) for a in got]


@torch.no_grad()
def share_keys(shapes: list[torch.Size], per_class: Iterable[list[torch.Tensor]]) -> list:
    """key_i = min over classes of the share of the class's importance ranked strictly above
    weight i (module docstring), per tensor of `shapes`; 1 where no class puts importance."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    key = None
    for importance in per_class:
        flat = torch.cat([h.reshape(-1) for h in importance]).double()
        total = float(flat.sum())
        if key is None:
            key = torch.ones_like(flat)
        if total <= 0:
            continue
        order = torch.sort(flat, descending=True, stable=True).indices
        ranked = flat[order]
        above = torch.empty_like(flat)
        above[order] = (torch.cumsum(ranked, 0) - ranked) / total
        torch.minimum(key, above, out=key)
    if key is None:
        raise ValueError("class-share selection needs the importance of at least one class")
    return [k.view(s) for k, s in zip(key.split(sizes), shapes)]


def class_share_masks(layers: dict[str, nn.Parameter], old: list, n: int, per_class,
                      names: list[str]) -> list[torch.Tensor]:  # fmt: skip
    """New masks without the n kept weights of highest key (`share_keys` of `per_class`, an
    iterable of importance lists aligned with `names`)."""
    keys = share_keys([layers[k].shape for k in names], per_class)
    device = layers[names[0]].device
    scores = [(-k).float().to(device) for k in keys]
    return prune_lowest(scores, old, n, names=names)
