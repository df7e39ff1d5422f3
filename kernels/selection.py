"""Global selection: remove the n lowest-scoring kept entries across many tensors.

Tie rule: equal scores are removed in (tensor position, flat index) order, lowest first --
exactly what a stable sort of the concatenated scores gives. -0.0 and +0.0 are equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _validate(scores, masks, n, names):
    if len(scores) != len(masks):
        raise ValueError(f"{len(scores)} score tensors but {len(masks)} masks")
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(scores))]
    kept = 0
    for name, s, m in zip(names, scores, masks):
        if s.shape != m.shape:
            raise ValueError(f"{name}: scores {tuple(s.shape)} and mask {tuple(m.shape)} differ")
        if m.dtype != torch.bool:
            raise ValueError(f"{name}: mask must be bool, got {m.dtype}")
        if torch.isnan(s).any():
            raise ValueError(f"{name}: scores contain NaN")
        kept += int(m.sum())
    if not 0 <= n <= kept:
        raise ValueError(f"cannot remove {n} entries: {kept} are kept")


def prune_lowest_ref(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], n: int):
    """Reference: stable sort of the kept scores, concatenated."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = torch.cat([m.reshape(-1) for m in masks])
    candidates = keep.nonzero().squeeze(1)
    order = torch.sort(flat[candidates], stable=True).indices[:n]
    keep = keep.clone()
    keep[candidates[order]] = False
    out, start = [], 0
    for m in masks:
        out.append(keep[start : start + m.numel()].view_as(m))
        start += m.numel()
    return out


def prune_lowest(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    n: int,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """New bool masks with exactly `n` more entries removed, lowest score first.

    `scores[i]` and `masks[i]` have the same shape; only entries with `masks[i] == True` are
    candidates. NaN scores are an error naming the tensor; +inf is allowed.
    """
    _validate(scores, masks, n, names)
    return prune_lowest_ref(scores, masks, n)
