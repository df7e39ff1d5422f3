"""Exact global selection over many tensors without concatenating them.

`prune_lowest(scores, masks, n)` removes exactly n kept entries, lowest score first, ties in
(tensor position, flat index) order -- bit for bit what a stable sort of the concatenated
scores gives. `kth_smallest(tensors, k)` is the exact k-th smallest value (1-based).
`prune_lowest_fused(weights, grads, masks, n, strategy=...)` computes the saliency inside the
passes, so no score tensor is ever stored.

Method: radix select on the float bit patterns. A float32 x maps to a signed int32 key
`b ^ ((b >> 31) & 0x7fffffff)` (b = bits of x; -0.0 first becomes +0.0) that orders exactly as
the floats do, +inf included. Histogram passes over the key's digits, accumulated across all
tensors, narrow the k-th key down to one value T; a last pass writes the masks: entries below
T go, and of the entries equal to T the first r in (tensor, index) order.

Layouts: every input may be strided in any way (channels_last, transposed, sliced, expanded);
entries are paired and ties broken by logical (row-major) index, and the new masks take the
old masks' layout. How each path reads them: `rdfast.kernels._layout`. bf16 and fp16 scores
are compared as their exact fp32 values.

Extra memory is O(bins) plus one bounded chunk, whatever the number of weights or layouts.
The package: `source` (where scores come from, validation), `torch_path` (16/16-bit digits,
CPU), `triton_path` (11/11/10-bit digits, the kernels), `collectives` (one threshold across
processes); this module is the API and the driver that picks a path.
NaN among the candidates is an error naming the tensor; +inf is allowed. Removing n = 0
entries reads no score: the masks come back as copies and NaN goes unnoticed there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rdfast.kernels._backend import pick
from rdfast.kernels.saliency import STRATEGY_CODES
from rdfast.kernels.selection import torch_path, triton_path
from rdfast.kernels.selection.collectives import all_reduce
from rdfast.kernels.selection.source import (
    NaNScoreError,
    ScoreSource,
    TensorScores,
    TooFewCandidates,
    validate,
)
from rdfast.kernels.selection.torch_path import count_true, keep_chunk

__all__ = [
    "NaNScoreError", "ScoreSource", "TensorScores", "TooFewCandidates",
    "count_true", "float_of_key", "keep_chunk", "kth_smallest", "prune_lowest",
    "prune_lowest_fused", "prune_lowest_ref", "select_thresholds", "zero_lowest_fused",
]  # fmt: skip


def _radix_select(src, masks, k, names, backend, group=None):
    """(T, r): the signed key of the k-th smallest candidate, and how many of the k smallest
    candidates equal T. Raises on NaN among the candidates or k beyond their number."""
    if backend == "triton":
        return triton_path.select(src, masks, k, names, group)
    return torch_path.select(src, masks, [k], names, group)[0]


def float_of_key(T: int) -> torch.Tensor:
    """The float32 whose selection key is T (the inverse of `float_key_torch`)."""
    b = torch.tensor([T], dtype=torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)[0]


GROUP_DOC = """`group`: a `torch.distributed` process group over which the tensors are spread; every
process passes its own tensors and gets the result of the selection over all of them (ties
in rank order), k and n counting over all processes."""


def kth_smallest(
    tensors: Sequence[torch.Tensor],
    k: int,
    *,
    masks=None,
    names=None,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """The exact k-th smallest value (1-based) among all entries of all tensors (of the kept
    entries where `masks` is given), as a 0-dim float32 tensor; -0.0 comes back as +0.0."""
    src = TensorScores(scores=tensors)
    if not len(src) and group is None:
        raise ValueError("no tensors given")
    names = validate(src, masks, names)
    be = pick(backend, *src.tensors)
    T, _ = _radix_select(src, masks, int(k), names, be, group)
    return float_of_key(T)


def _prune(src, masks, n, names, backend, group):
    names = validate(src, masks, names)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return [m.clone() for m in masks]
    if not len(src) and group is None:
        raise ValueError(f"cannot remove {n} entries: no tensors given")
    be = pick(backend, *src.tensors, *masks)
    T, r = _select_n(src, masks, n, names, be, group)
    if be == "triton":
        return triton_path.triton_masks(src, masks, T, r, names, group)
    return torch_path.torch_masks(src, masks, T, r, group)


def _select_n(src, masks, n, names, backend, group):
    """(T, r) of removing n entries, or TooFewCandidates saying how many are kept."""
    try:
        return _radix_select(src, masks, int(n), names, backend, group)
    except TooFewCandidates:
        if masks is None:
            counts = [src.numel(i) for i in range(len(src))]
        else:
            counts = [int(m.sum()) for m in masks]
        kept = all_reduce(torch.tensor([sum(counts)]), group)
        raise TooFewCandidates(f"cannot remove {n} entries: {int(kept)} are kept") from None


def prune_lowest(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    n: int,
    names: Sequence[str] | None = None,
    *,
    backend: str = "auto",
    group=None,
):
    """New bool masks with exactly `n` more entries removed, lowest score first.

    `scores[i]` and `masks[i]` have the same shape; only entries with `masks[i] == True` are
    candidates. NaN among them is an error naming the tensor; +inf is allowed.
    """
    return _prune(TensorScores(scores=scores), list(masks), n, names, backend, group)


def prune_lowest_fused(
    weights,
    grads,
    masks,
    n,
    *,
    strategy: str,
    form: str = "taylor",
    eps: float = 0.0,
    names=None,
    backend: str = "auto",
    group=None,
):
    """`prune_lowest(saliency(w, g), masks, n)` without ever storing the scores."""
    src = _fused_source(weights, grads, strategy, form, eps)
    return _prune(src, list(masks), n, names, backend, group)


def _fused_source(weights, grads, strategy, form, eps) -> TensorScores:
    if strategy not in STRATEGY_CODES:
        raise ValueError(f"fused selection takes strategy mp, gp or up, got {strategy!r}")
    if strategy != "mp" and grads is None:
        raise ValueError(f"strategy {strategy} needs the gradients")
    return TensorScores(weights=weights, grads=grads, strategy=strategy, form=form, eps=eps)


@torch.no_grad()
def zero_lowest_fused(
    weights,
    grads,
    n,
    *,
    strategy: str,
    form: str = "taylor",
    eps: float = 0.0,
    names=None,
    group=None,
) -> list[int]:
    """Zero, in place, the `n` weights of lowest saliency(w, g) among all of them -- the
    weights `prune_lowest_fused` with all-true masks removes, ties alike -- without any
    mask: the memory beyond weights and gradients is a chunk of scores (2^20 fp32) and the
    histograms, where masks would take a byte a weight (300 MB for 3e8 weights). Returns
    the weights kept per tensor. Torch path on every device (three reads, one write)."""
    src = _fused_source(weights, grads, strategy, form, eps)
    names = validate(src, None, names)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kept = [int(w.numel()) for w in src.tensors]
    if n == 0:
        return kept
    T, r = _select_n(src, None, n, names, "torch", group)
    # The scores of a piece are computed before its weights are zeroed, and no piece is read
    # twice: zeroing as the pass goes changes no later score.
    for i, start, end, index, keep in torch_path.kept_parts(src, None, T, r, group):
        w = src.tensors[i]
        kept[i] -= keep.numel() - int(torch.count_nonzero(keep))
        target = torch_path.region(w, start, end, index)
        target.mul_(keep.view(target.shape).to(w.dtype))
    return kept


for _f in (kth_smallest, prune_lowest, prune_lowest_fused):
    _f.__doc__ += "\n\n    " + GROUP_DOC.replace("\n", "\n    ")


def select_thresholds(source: ScoreSource, ks: Sequence[int], names: Sequence[str], *, group=None):
    """[(T, r)] for each k of `ks` over the scores `source.pieces(None)` yields, from the same
    two reads: T the signed key of the k-th smallest score, r how many of the k smallest
    equal T. For scores read from disk (`rdfast.pruning.streaming`): torch path only."""
    return torch_path.select(source, None, [int(k) for k in ks], list(names), group)


def prune_lowest_ref(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], n: int):
    """Reference: stable sort of the kept scores, concatenated (4N bytes more memory)."""
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
