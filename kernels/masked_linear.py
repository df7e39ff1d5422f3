"""Linear layer with a pruning mask applied inside the GEMM tiles.

    y = x @ (w * mask)^T + b          forward
    dx = dy @ (w * mask)              backward, mask applied to the loaded w tiles
    dw = (dy^T @ x) * mask            backward, mask applied to the output tiles
    db = dy.sum(0)

`w * mask` is never materialized (it would cost a weight-sized tensor per call), and the
gradient of every pruned weight is exactly zero. One kernel serves all three products: the
operands are passed with their strides, so transposes are free, and `MASK_B` / `MASK_OUT`
say where the mask goes.

On the CPU, `SparseLinear` runs inference of highly pruned layers with a CSR weight; the
sparsity from which it beats the dense product is measured in benchmarks/README.md.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from rdfast.kernels._backend import HAS_TRITON, interpreting, pick, tl, triton


def _tiles(precision: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the dot's input precision.

    Chosen from ptxas's report of the compiled kernels (benchmarks/README.md, "Compiled
    kernels"), not from GPU timings. 64 x 64 x 32 with 4 warps puts the 16-bit and TF32 dots on
    the tensor cores (wgmma on sm_90, mma.sync on sm_80) in 64-158 registers without spills.
    An exact fp32 ("ieee") dot runs on the FMA units and holds both operand tiles in registers:
    at that tile it needs 255 registers and spills 550-680 bytes per thread with the mask on B,
    so it takes K in steps of 16 with 8 warps (128 registers, no spills).
    """
    if precision == "ieee":
        return 64, 64, 16, 8
    return 64, 64, 32, 4


def masked_linear_ref(x, w, mask, bias=None):
    return F.linear(x, w * mask.to(w.dtype), bias)


if HAS_TRITON:

    @triton.jit
    def _masked_matmul_kernel(
        a_ptr, b_ptr, c_ptr, mask_ptr, bias_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        stride_mk, stride_mn, stride_bias,
        MASK_B: tl.constexpr, MASK_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """C[M, N] = A[M, K] @ (B * mask)[K, N] (+ bias[N]), or (A @ B) * mask with MASK_OUT,
        one BLOCK_M x BLOCK_N tile of C a program.

        Args:
            a_ptr, b_ptr, c_ptr: A, B and C, each read or written through its own strides
                (stride_am, stride_ak, ...: elements), so transposed views need no copy.
            mask_ptr: uint8 mask, indexed like B (MASK_B) or like C (MASK_OUT) through
                stride_mk, stride_mn.
            bias_ptr: bias[N] (HAS_BIAS), stride stride_bias.
            M, N, K (int): the problem size.
            MASK_B (constexpr): zero B's masked elements before the product (forward, dX).
            MASK_OUT (constexpr): zero C's masked elements after it (the weight gradient).
            HAS_BIAS (constexpr): add the bias.
            PRECISION (constexpr): tl.dot's input precision ("ieee" or "tf32").
            WIDEN (constexpr): convert A and B tiles to fp32 before the product.
            BLOCK_M, BLOCK_N, BLOCK_K (constexpr): tile sizes.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            b_ok = (kk[:, None] < K) & (rn[None, :] < N)
            b = tl.load(
                b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_ok, other=0.0
            )
            if MASK_B:
                keep = tl.load(
                    mask_ptr + kk[:, None] * stride_mk + rn[None, :] * stride_mn, mask=b_ok, other=0
                )
                b = tl.where(keep != 0, b, tl.zeros_like(b))
            if WIDEN:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        c_ok = (rm[:, None] < M) & (rn[None, :] < N)
        if MASK_OUT:
            keep = tl.load(
                mask_ptr + rm[:, None] * stride_mk + rn[None, :] * stride_mn, mask=c_ok, other=0
            )
            acc = tl.where(keep != 0, acc, 0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[
                None, :
            ]
        tl.store(
            c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=c_ok,
        )


def _precision(dtype) -> str:
    """fp32 operands: TF32 only where torch would use it for F.linear too."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _matmul(a, b, mask, *, mask_b=False, mask_out=False, bias=None, out_dtype=None):
    """a @ b with the mask on b's elements or on the output; a, b, mask are strided views."""
    M, K = a.shape
    N = b.shape[1]
    out_dtype = out_dtype or a.dtype
    # Triton 3.8's interpreter truncates fp32 -> bf16 on store (twice the error of rounding to
    # nearest even, which compiled kernels do): there, store fp32 and let torch round.
    widen = interpreting() and out_dtype == torch.bfloat16
    if widen:
        return _matmul(
            a, b, mask, mask_b=mask_b, mask_out=mask_out, bias=bias, out_dtype=torch.float32
        ).to(out_dtype)
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        c.zero_()
        return c if bias is None else c.add_(bias)
    precision = _precision(a.dtype)
    block_m, block_n, block_k, num_warps = _tiles(precision)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _masked_matmul_kernel[grid](
        a,
        b,
        c,
        mask,
        bias if bias is not None else c,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        mask.stride(0),
        mask.stride(1),
        bias.stride(0) if bias is not None else 0,
        MASK_B=mask_b,
        MASK_OUT=mask_out,
        HAS_BIAS=bias is not None,
        PRECISION=precision,
        # Triton 3.8's interpreter gets bf16 tl.dot wrong (errors ~1e10 on a 16 x 16 product,
        # fp16 and fp32 exact), so there bf16 tiles are widened first; compiled kernels keep
        # the bf16 tensor-core dot.
        WIDEN=interpreting() and a.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return c


class MaskedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, mask, bias):
        x2 = x.reshape(-1, x.shape[-1])
        m8 = mask.view(torch.uint8)
        # B[k, n] = w[n, k]: the transpose is a change of strides.
        y = _matmul(x2, w.t(), m8.t(), mask_b=True, bias=bias)
        ctx.save_for_backward(x2, w, m8)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w, m8 = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _matmul(dy2, w, m8, mask_b=True).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _matmul(dy2.t(), x2, m8, mask_out=True, out_dtype=w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0).to(w.dtype)
        return dx, dw, None, db


def masked_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`F.linear(x, w * mask, bias)` with the mask applied inside the GEMM (Triton), or the
    reference (torch). Gradients of pruned weights are exactly zero."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} do not fit a linear layer")
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of shape {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but w is {w.dtype}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},)")
    if pick(backend, x, w, mask) == "torch":
        return masked_linear_ref(x, w, mask, bias)
    return MaskedLinearFunction.apply(x, w, mask, bias)


class SparseLinear(nn.Module):
    """Inference-only Linear with its weight stored as torch CSR (CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("weight", csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @torch.no_grad()
    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def sparsify_for_inference(model: nn.Module, min_sparsity: float) -> list[str]:
    """Replace, in place, every Linear whose weight has at least `min_sparsity` zeros by a
    SparseLinear; returns the names replaced. For inference on the CPU only."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                zeros = float((child.weight == 0).float().mean())
                if zeros >= min_sparsity:
                    setattr(module, child_name, SparseLinear(child.weight, child.bias))
                    replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced
