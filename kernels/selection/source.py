"""Where the scores of a selection come from, and what every path checks first.

A selection reads its candidates through a `ScoreSource`: `TensorScores` hands out scores
given as tensors, or computes them from weights and gradients chunk by chunk (the fused
strategies); `rdfast.pruning.streaming` hands out magnitudes read from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from rdfast.kernels._layout import kernel_view, logical_slices, padded, same_layout
from rdfast.kernels.saliency import FORM_CODES, STRATEGY_CODES, saliency_ref

FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
# Entries a torch-path piece holds at most: 2^18 fp32 scores (1 MiB) plus their keys keep a
# pass's working set in the L2 cache of the CPUs measured (benchmarks/README.md).
CHUNK = 1 << 18
POS_INF_KEY = 0x7F800000  # signed key of +inf; above it: NaN with the sign bit clear
NEG_INF_KEY = -0x7F800001  # signed key of -inf; below it: NaN with the sign bit set


class NaNScoreError(ValueError):
    """NaN among the candidates of a selection (the message names the tensor)."""


class TooFewCandidates(ValueError):
    """k or n beyond the number of candidates."""


# One segment of a piece: (tensor, start, end, logical index or None, offset in the piece).
Segment = tuple[int, int, int, object, int]


class ScoreSource(Protocol):
    """What the torch path reads. `abs_bits` (optional, default False): the pieces hold the
    int32 bits of fp32 values whose scores are their absolute values."""

    def pieces(self, masks) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[Segment]]]:
        """The scores in logical order as (x, kept, segments): x at most CHUNK fp32 scores
        (or int32 bits, see `abs_bits`), kept their mask entries (None without masks)."""
        ...


def abs_bits(src: ScoreSource) -> bool:
    return getattr(src, "abs_bits", False)


class TensorScores:
    """A `ScoreSource` over tensors: the scores given, or computed from (w, g) chunk by chunk
    (`strategy`, `form`, `eps`: the saliency of `rdfast.kernels.saliency`)."""

    def __init__(
        self, scores=None, weights=None, grads=None, strategy=None, form="taylor", eps=0.0
    ):
        self.fused = scores is None
        self.tensors = list(weights if self.fused else scores)
        self.grads = list(grads) if grads is not None else None
        self.strategy, self.form, self.eps = strategy, form, float(eps)
        self._geometry = {}

    def __len__(self):
        return len(self.tensors)

    def numel(self, i):
        return self.tensors[i].numel()

    def operands(self, i, masks):
        """The tensors read for tensor i: scores (or weight), gradient, mask, if present."""
        ops = [self.tensors[i]]
        if self.fused and self.grads is not None:
            ops.append(self.grads[i])
        if masks is not None:
            ops.append(masks[i])
        return ops

    def ranges(self, i, masks):
        """(start, end, index) in logical order, at most CHUNK entries each: flat views when
        every operand is contiguous, bounded logical slices otherwise (index not None)."""
        n = self.numel(i)
        if all(t.is_contiguous() for t in self.operands(i, masks)):
            for start in range(0, n, CHUNK):
                yield start, min(start + CHUNK, n), None
        else:
            yield from logical_slices(self.tensors[i].shape, CHUNK)

    def chunk(self, i, start, end, index) -> torch.Tensor:
        """fp32 scores of the logical range [start, end) of tensor i."""

        def part(t):
            return t.reshape(-1)[start:end] if index is None else t[index].reshape(-1)

        if not self.fused:
            x = part(self.tensors[i])
            return x if x.dtype == torch.float32 else x.float()
        g = part(self.grads[i]) if self.grads is not None else None
        return saliency_ref(part(self.tensors[i]), g, self.strategy, self.form, self.eps)

    def pieces(self, masks):
        """Scores in logical order as (x, kept, segments), x at most CHUNK fp32 values.

        Large pieces come as they are; small ones are packed into one buffer (copied,
        bounded by CHUNK) so that 100 tensors of 1e4 entries cost a few torch calls per pass
        instead of a few hundred. `segments` lists (tensor, start, end, index, offset in x).
        """
        buf_x = buf_m = None
        pending, fill = [], 0

        def flush():
            nonlocal pending, fill
            out = (buf_x[:fill], None if buf_m is None else buf_m[:fill], pending)
            pending, fill = [], 0
            return out

        for i in range(len(self)):
            for start, end, index in self.ranges(i, masks):
                x = self.chunk(i, start, end, index)
                kept = None
                if masks is not None:
                    m = masks[i]
                    kept = m.reshape(-1)[start:end] if index is None else m[index].reshape(-1)
                size = end - start
                if 2 * size > CHUNK:  # a large piece: no copy, after what is pending
                    if fill:
                        yield flush()
                    yield x, kept, [(i, start, end, index, 0)]
                    continue
                if fill + size > CHUNK:
                    yield flush()
                if buf_x is None:
                    buf_x = torch.empty(CHUNK, dtype=torch.float32, device=x.device)
                    buf_m = (
                        None
                        if masks is None
                        else torch.empty(CHUNK, dtype=torch.bool, device=x.device)
                    )
                buf_x[fill : fill + size] = x
                if buf_m is not None:
                    buf_m[fill : fill + size] = kept
                pending.append((i, start, end, index, fill))
                fill += size
        if fill:
            yield flush()

    # ------------------------------------------------------------------ Triton arguments
    def triton_args(self, i):
        w = kernel_view(self.tensors[i])
        if not self.fused:
            return w, w, 0, 0
        g = kernel_view(self.grads[i]) if self.grads is not None else w
        return w, g, STRATEGY_CODES[self.strategy], FORM_CODES[self.form]

    def walk(self, i, masks, out=None, ordered=False, name="tensor"):
        """(LOGICAL, geometry) for one launch over tensor i: memory order when it is safe
        (module docstring of `_layout`), else logical indices through each operand's strides
        (the geometry: `triton_path.GEOMETRY`). `ordered`: the launch depends on the order of
        the entries (tie ranks)."""
        ops = self.operands(i, masks) + ([out] if out is not None else [])
        if all(t.is_contiguous() for t in ops) or (not ordered and same_layout(*ops)):
            return False, None
        key = (i, out is not None)
        if key not in self._geometry:
            g = self.grads[i] if self.fused and self.grads is not None else self.tensors[i]
            m = masks[i] if masks is not None else self.tensors[i]
            o = out if out is not None else m
            sizes, _ = padded(self.tensors[i], name)
            strides = [padded(t, name)[1] for t in (self.tensors[i], g, m, o)]
            self._geometry[key] = torch.tensor(
                sizes[1:] + [s for st in strides for s in st],
                dtype=torch.int64,
                device=self.tensors[i].device,
            )
        return True, self._geometry[key]


def validate(src: TensorScores, masks, names):
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(src))]
    if len(names) != len(src):
        raise ValueError(f"{len(names)} names for {len(src)} tensors")
    if masks is not None and len(masks) != len(src):
        raise ValueError(f"{len(src)} score tensors but {len(masks)} masks")
    for i, t in enumerate(src.tensors):
        if t.dtype not in FLOAT_TYPES:
            raise ValueError(
                f"{names[i]}: scores must be float32, bfloat16 or float16, got {t.dtype}"
            )
        if src.fused and src.grads is not None:
            g = src.grads[i]
            if g.shape != t.shape:
                raise ValueError(
                    f"{names[i]}: gradient {tuple(g.shape)} and weight {tuple(t.shape)} differ"
                )
            if g.dtype not in FLOAT_TYPES:
                raise ValueError(
                    f"{names[i]}: gradient must be float32, bfloat16 or float16, got {g.dtype}"
                )
        if masks is not None:
            if masks[i].shape != t.shape:
                raise ValueError(
                    f"{names[i]}: scores {tuple(t.shape)} and mask {tuple(masks[i].shape)} differ"
                )
            if masks[i].dtype != torch.bool:
                raise ValueError(f"{names[i]}: mask must be bool, got {masks[i].dtype}")
    devices = {t.device for t in src.tensors} | {m.device for m in masks or []}
    if src.fused and src.grads is not None:
        devices |= {g.device for g in src.grads}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return names


def find_nan(src: TensorScores, masks, names):
    """Raise naming the first tensor with a NaN among its candidates, if there is one.

    Chunked like the passes; runs only when the first histogram saw keys beyond +-inf."""
    for x, kept, segments in src.pieces(masks):
        bad = (x & 0x7FFFFFFF) > POS_INF_KEY if abs_bits(src) else torch.isnan(x)
        if kept is not None:
            bad &= kept
        if bad.any():
            first = int(bad.nonzero()[0])
            i = next(i for i, start, end, _, off in segments if off <= first < off + end - start)
            raise NaNScoreError(f"{names[i]}: scores contain NaN")
