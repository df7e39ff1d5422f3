"""Global 50 % selection over many tensors: rdfast and what users would pick instead.

Each case takes the list of score tensors (and the modules, for torch.nn.utils.prune) and
returns something that depends on the whole answer, so nothing is skipped. Run as a script, a
case reports its extra peak memory (VmHWM after minus before, inputs already built and every
code path warmed up on a small input) in a fresh process:

    python -m benchmarks.selection_cases CASE TOTAL TENSORS
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from benchmarks.memory import peak_rss_mb
from rdfast.kernels import kth_smallest, prune_lowest


def make_scores(total: int, tensors: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(total // tensors, generator=gen) for _ in range(tensors)]


def transposed(scores):
    """The same values as (rows x 1000)^T views: strided, not contiguous."""
    return [s.view(-1, 1000).t() for s in scores]


def kept_masks(scores, kept: float, seed: int = 1):
    """Masks of an iterative schedule: a `kept` fraction still unpruned, at random."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(s.shape, generator=gen) < kept for s in scores]


def rdfast_prune_lowest(scores, masks):
    """Takes the current masks (built outside, like the module state the peers hold) and
    returns new ones: 1 byte per weight of output."""
    n = sum(s.numel() for s in scores) // 2
    return prune_lowest(scores, masks, n, backend="torch")


def rdfast_kth_smallest(scores, modules=None):
    return kth_smallest(scores, sum(s.numel() for s in scores) // 2, backend="torch")


def rdfast_prune_lowest_kept(scores, masks):
    """Half of the still-kept entries go (masks from `kept_masks`)."""
    n = sum(int(m.sum()) for m in masks) // 2
    return prune_lowest(scores, masks, n, backend="torch")


def rdfast_kth_smallest_transposed(scores, modules=None):
    return rdfast_kth_smallest(transposed(scores))


def rdfast_prune_lowest_transposed(scores, masks):
    return rdfast_prune_lowest(transposed(scores), masks)


def torch_kthvalue(scores, modules=None):
    return torch.kthvalue(
        torch.cat([s.reshape(-1) for s in scores]), sum(s.numel() for s in scores) // 2
    ).values


def numpy_sort(scores, modules=None):
    """OpenLTH's sparse_global pruning: sort the concatenated scores, read the threshold."""
    flat = np.concatenate([s.numpy().reshape(-1) for s in scores])
    return np.sort(flat)[flat.size // 2]


def state_for(case, scores):
    """What a case holds besides the scores: modules for torch.nn.utils.prune, masks for
    rdfast.prune_lowest, nothing for the rest."""
    if case == "torch_global_unstructured":
        return modules_for(scores)
    if case in ("rdfast_prune_lowest", "rdfast_prune_lowest_transposed"):
        shaped = transposed(scores) if case.endswith("transposed") else scores
        return [torch.ones_like(s, dtype=torch.bool) for s in shaped]
    if case.startswith("rdfast_prune_lowest_kept"):
        return kept_masks(scores, int(case.removeprefix("rdfast_prune_lowest_kept")) / 100)
    return None


def modules_for(scores):
    mods = []
    for s in scores:
        m = nn.Module()
        m.weight = nn.Parameter(s.clone(), requires_grad=False)
        mods.append(m)
    return mods


def torch_global_unstructured(scores, modules):
    from torch.nn.utils import prune

    prune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=0.5
    )
    out = [m.weight_mask for m in modules]
    for m in modules:  # undo, so that the next round starts from the same state
        prune.remove(m, "weight")
    return out


CASES = {
    "rdfast_prune_lowest": rdfast_prune_lowest,
    # Realistic masks: 50, 75 and 90 % already pruned; all-ones masks take a fast path.
    "rdfast_prune_lowest_kept50": rdfast_prune_lowest_kept,
    "rdfast_prune_lowest_kept25": rdfast_prune_lowest_kept,
    "rdfast_prune_lowest_kept10": rdfast_prune_lowest_kept,
    "rdfast_kth_smallest": rdfast_kth_smallest,
    # Strided inputs are read in bounded slices, never copied whole.
    "rdfast_kth_smallest_transposed": rdfast_kth_smallest_transposed,
    "rdfast_prune_lowest_transposed": rdfast_prune_lowest_transposed,
    "torch_kthvalue": torch_kthvalue,
    "numpy_sort": numpy_sort,
    "torch_global_unstructured": torch_global_unstructured,
}


def main(case: str, total: int, tensors: int) -> None:
    torch.set_num_threads(2)
    fn = CASES[case]
    small = make_scores(10_000, 10)
    fn(small, state_for(case, small))  # warm up allocators and kernels
    scores = make_scores(total, tensors)
    state = state_for(case, scores)
    before = peak_rss_mb()
    fn(scores, state)
    print(f"{peak_rss_mb() - before:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], int(float(sys.argv[2])), int(sys.argv[3]))
