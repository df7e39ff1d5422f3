"""Confusion matrix in one pass: argmax fused with the histogram, and what derives from it.

The Triton kernel reads each logit once (N x C x itemsize bytes: the roofline of this
operation), takes the row's argmax with torch's rule (the first maximal index; a NaN counts as
the maximum, the first NaN wins) and adds 1 to counts[target, pred] with an integer atomic, so
the result does not depend on the order of the programs.
"""

from __future__ import annotations

import torch

from rdfast.kernels._backend import HAS_TRITON, pick, tl, triton
from rdfast.kernels._layout import kernel_view

MAX_CLASSES = 1 << 16
# Tiles, from ptxas's report of the compiled kernel (benchmarks/README.md, "Compiled kernels"):
# the argmax keeps a key and an index per logit in registers, so a program takes 16 rows and
# at most 256 columns at a time -- 121-127 registers at 4 warps for C = 100 and 1000, where a
# whole 1000-class row (1024 columns) needed 168 (fp32) to 254 (bf16) and 32 rows of 128
# already spill. Labels cost 2 loads per row: 1024 rows a program (34 registers).
BLOCK_N = 16
BLOCK_N_LABELS = 1024
MAX_BLOCK_C = 256


def confusion_matrix_ref(logits_or_labels, targets, num_classes):
    pred = logits_or_labels.argmax(dim=1) if logits_or_labels.dim() == 2 else logits_or_labels
    flat = targets.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


if HAS_TRITON:
    from rdfast.kernels._float_key import float_key
    from rdfast.kernels._layout import to_f32

    @triton.jit
    def _order_key(x):
        """The float's key, with every NaN above +inf (torch.argmax picks NaN)."""
        return tl.where(x != x, 0x7FFFFFFF, float_key(x))

    @triton.jit
    def _confusion_kernel(
        x_ptr,
        t_ptr,
        cm_ptr,
        n,
        stride_n,
        stride_c,
        stride_t,
        C,
        IS_LABELS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Counts of (target, prediction) pairs of BLOCK_N rows, added into the matrix.

        Args:
            x_ptr: logits (n x C, fp32/fp16, bf16 as int16 bits) or predicted labels (n).
            t_ptr: target labels (n, any integer type).
            cm_ptr: int64 C x C matrix, row-major; integer atomics, so the counts are exact
                whatever the order the programs run in.
            n (int): rows.
            stride_n, stride_c (int): strides of x's rows and columns (elements).
            stride_t (int): stride of the targets.
            C (int): classes.
            IS_LABELS (constexpr): x holds predicted labels, not logits.
            BLOCK_N (constexpr): rows a program.
            BLOCK_C (constexpr): logit columns a tile (argmax tile by tile).
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        if IS_LABELS:
            pred = tl.load(x_ptr + rows * stride_n, mask=row_ok, other=0).to(tl.int64)
        else:
            best = tl.full([BLOCK_N], -0x7FFFFFFF - 1, tl.int32)
            pred = tl.zeros([BLOCK_N], dtype=tl.int64)
            # Columns in tiles of BLOCK_C: a later tile wins only with a strictly larger key,
            # and inside a tile argmax takes the first maximum -- together torch's rule.
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                ok = row_ok[:, None] & (cols[None, :] < C)
                x = to_f32(
                    tl.load(
                        x_ptr + rows[:, None] * stride_n + cols[None, :] * stride_c,
                        mask=ok,
                        other=0,
                    )
                )
                k = tl.where(ok, _order_key(x), -0x7FFFFFFF - 1)
                kmax = tl.max(k, axis=1)
                idx = tl.argmax(k, axis=1, tie_break_left=True).to(tl.int64) + c0
                better = kmax > best
                pred = tl.where(better, idx, pred)
                best = tl.where(better, kmax, best)
        target = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=0).to(tl.int64)
        # The launcher has checked the range; the guard keeps a bad value from ever writing
        # outside the matrix.
        inside = row_ok & (target >= 0) & (target < C) & (pred >= 0) & (pred < C)
        tl.atomic_add(cm_ptr + target * C + pred, 1, mask=inside)


def confusion_matrix(
    logits_or_labels: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """int64 (num_classes x num_classes) counts, rows = true class, columns = prediction.

    Logits (N x C, fp32/bf16/fp16/fp64) are reduced with argmax (first maximal index on ties;
    compared in the input's precision: fp64 goes through torch.argmax); a 1-D integer input
    is taken as predicted labels. Targets and predicted labels outside [0, num_classes) are an
    error. Any strides are read in place (transposed, sliced, expanded).
    """
    x = logits_or_labels
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must lie in 1..{MAX_CLASSES}, got {num_classes}")
    if x.dim() == 2:
        if x.shape[1] != num_classes:
            raise ValueError(f"logits have {x.shape[1]} columns for {num_classes} classes")
        if not x.is_floating_point():
            raise ValueError(f"logits must be floating point, got {x.dtype}")
    elif x.dim() != 1 or x.is_floating_point():
        raise ValueError("give N x C logits or N integer labels")
    if targets.dim() != 1 or targets.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} predictions for {tuple(targets.shape)} targets")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integers, got {targets.dtype}")
    _check_range("targets", targets, num_classes)
    if x.dim() == 1:
        _check_range("predicted labels", x, num_classes)
    # Triton compares fp32 keys: fp64 logits keep their precision through torch.argmax.
    if pick(backend, x, targets) == "torch" or x.dtype == torch.float64:
        return confusion_matrix_ref(x, targets, num_classes)
    n = x.shape[0]
    # int32 atomics: counts up to 2^31 - 1 per cell, far beyond any test set.
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int32, device=x.device)
    if n:
        block_n = BLOCK_N_LABELS if x.dim() == 1 else BLOCK_N
        block_c = min(triton.next_power_of_2(num_classes), MAX_BLOCK_C)
        _confusion_kernel[(triton.cdiv(n, block_n),)](
            kernel_view(x),
            kernel_view(targets),
            cm,
            n,
            x.stride(0),
            x.stride(1) if x.dim() == 2 else 0,
            targets.stride(0),
            num_classes,
            IS_LABELS=x.dim() == 1,
            BLOCK_N=block_n,
            BLOCK_C=block_c,
        )
    return cm.view(num_classes, num_classes).long()


def _check_range(what: str, labels: torch.Tensor, num_classes: int) -> None:
    """One reduction over N integers (a few microseconds beside the N x C logits)."""
    if labels.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(labels.long()))
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} must lie in [0, {num_classes}), found {bad}")


def per_class_recall(cm: torch.Tensor) -> torch.Tensor:
    """Recall per true class: diagonal / row sum; NaN for a class without test examples."""
    return cm.diagonal().double() / cm.sum(dim=1).double()


def accuracy(cm: torch.Tensor) -> float:
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else float("nan")
