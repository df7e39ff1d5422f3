"""Order-preserving integer keys of float32 values, shared by selection and the confusion
matrix: `b ^ ((b >> 31) & 0x7fffffff)` on the bits b of x (after -0.0 -> +0.0) is a signed
int32 that orders exactly as the floats do, infinities included."""

from __future__ import annotations

import torch

from rdfast.kernels._backend import HAS_TRITON, tl, triton


def float_key_torch(x: torch.Tensor) -> torch.Tensor:
    b = (x + 0.0).view(torch.int32)  # -0.0 + 0.0 = +0.0
    return b ^ ((b >> 31) & 0x7FFFFFFF)


if HAS_TRITON:

    @triton.jit
    def float_key(x):
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0
        b = x.to(tl.int32, bitcast=True)
        return b ^ ((b >> 31) & 0x7FFFFFFF)
