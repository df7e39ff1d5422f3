"""Memory layouts the kernels accept, and how they read them.

A tensor's *logical* order is the row-major order of its shape (what `t.reshape(-1)` lists);
its memory order is what its strides make of it. The two differ for channels_last conv weights
(and the masks `ones_like(w)` makes of them), transposes, slices and expanded (stride-0)
tensors. Every kernel pairs entries of its inputs by logical index and breaks ties in logical
order, so layouts never change a result:

- Streaming kernels walk memory order when that is safe -- every operand contiguous, or, for
  passes where order does not matter (histograms, counts, masks without a tie boundary), every
  operand dense with the same strides -- and otherwise map each logical index to a memory
  offset through the operand's own strides (up to 4 dimensions; more is refused by name).
- The torch path reads strided tensors in bounded logical slices (`logical_slices`), never a
  whole-tensor copy.
- bf16 values are widened to fp32 through their bit patterns (`to_f32`): exact, and the same
  on compiled GPU code and under Triton 3.8's interpreter, which flushes bf16 subnormals to 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from rdfast.kernels._backend import HAS_TRITON, tl, triton

MAX_DIMS = 4


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides are a permutation of a contiguous layout's."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(*tensors: torch.Tensor) -> bool:
    """Dense and equally strided: memory position p holds the same logical index in all."""
    first = tensors[0]
    return all(is_dense(t) and t.stride() == first.stride() for t in tensors)


def padded(t: torch.Tensor, name: str) -> tuple[list[int], list[int]]:
    """(sizes, strides) of `t` as a 4-D tensor (leading dimensions of size 1)."""
    if t.dim() > MAX_DIMS:
        raise ValueError(
            f"{name}: a {t.dim()}-D tensor in a non-contiguous layout is not supported by the "
            f"Triton path (at most {MAX_DIMS} dimensions); pass it contiguous"
        )
    pad = MAX_DIMS - t.dim()
    return [1] * pad + list(t.shape), [0] * pad + list(t.stride())


def logical_slices(shape, chunk: int) -> Iterator[tuple[int, int, tuple]]:
    """(start, end, index) covering a tensor of `shape` in logical order, each at most
    `chunk` elements: `t[index].reshape(-1)` is `t.reshape(-1)[start:end]` for any strides,
    and costs at most `chunk` elements where it copies."""

    def walk(prefix: tuple, dims: tuple, base: int):
        row = math.prod(dims[1:])
        if not dims or row == 0 or dims[0] == 0:
            if not dims:
                yield base, base + 1, prefix
            return
        if row <= chunk:
            step = max(1, chunk // row)
            for a in range(0, dims[0], step):
                b = min(a + step, dims[0])
                yield base + a * row, base + b * row, (*prefix, slice(a, b))
        else:
            for a in range(dims[0]):
                yield from walk((*prefix, a), dims[1:], base + a * row)

    yield from walk((), tuple(shape), 0)


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """What a kernel receives: bf16 as its int16 bit patterns (see `to_f32`), bool as uint8."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t


if HAS_TRITON:

    @triton.jit
    def to_f32(x):
        """fp32 value of a loaded element; bf16 arrives as int16 bits (`kernel_view`), and
        bf16 -> fp32 is a 16-bit shift of the pattern: exact for every value."""
        if x.dtype == tl.int16:
            y = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            y = x.to(tl.float32)
        return y

    @triton.jit
    def unravel(lin, d1, d2, d3):
        """Logical 4-D index of the row-major flat indices `lin` (sizes d1..d3 of dims 1..3)."""
        i3 = lin % d3
        r = lin // d3
        i2 = r % d2
        r = r // d2
        return r // d1, r % d1, i2, i3

    @triton.jit
    def at(i0, i1, i2, i3, s0, s1, s2, s3):
        """Memory offset of a logical 4-D index under strides s0..s3."""
        return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
