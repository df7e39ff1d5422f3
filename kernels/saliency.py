"""Pruning scores: the lowest-scoring kept weights are removed.

Forms (see the science notes): with w the weight, g = dL/dw of the data loss alone and eps
the weight-decay coefficient,

    strategy  taylor (authors' code)      sum (design card)
    mp        |w|                         |w|
    gp        |w * g|                     |g|
    up        |-w * g + eps * w^2|        |g| + eps * |w|

The Taylor forms estimate the change of the loss when w is set to zero; UP adds back the
part of that change the weight-decay term would have contributed.

One fused elementwise pass reads w (and g) once and writes fp32 scores: 8 bytes read and 4
written per fp32 weight for gp/up, the memory roofline of this operation.
"""

from __future__ import annotations

import torch

from rdfast.kernels._backend import HAS_TRITON, code, constant, pick, tl, triton
from rdfast.kernels._layout import kernel_view, same_layout

SALIENCY_FORMS = ("taylor", "sum")
# The STRATEGY and FORM flags of `score_of`. Selection's SOURCE flag takes the strategy codes
# for scores it computes and SCORES_GIVEN for scores it is handed.
SCORES_GIVEN, MP, GP, UP = constant(0), constant(1), constant(2), constant(3)
TAYLOR, SUM = constant(0), constant(1)
STRATEGY_CODES = {"mp": code(MP), "gp": code(GP), "up": code(UP)}
FORM_CODES = {"taylor": code(TAYLOR), "sum": code(SUM)}
BLOCK = 1024


def saliency_ref(w: torch.Tensor, g: torch.Tensor | None, strategy: str, form: str, eps: float):
    """Pure-torch reference, fp32."""
    w = w.float()
    if strategy == "mp":
        return w.abs()
    g = g.float()
    if form == "taylor":
        return (w * g).abs() if strategy == "gp" else (-w * g + eps * w * w).abs()
    return g.abs() if strategy == "gp" else g.abs() + eps * w.abs()


if HAS_TRITON:
    from rdfast.kernels._layout import to_f32

    @triton.jit
    def score_of(w, g, eps, STRATEGY: tl.constexpr, FORM: tl.constexpr):
        """fp32 score from loaded w and g, as `saliency_ref` computes it; shared with the
        selection kernels.

        Args:
            w, g: loaded weights and gradients (fp32, fp16, or bf16 as int16 bits); g is
                ignored for MP.
            eps (float): UP's weight on the magnitude term.
            STRATEGY (constexpr): MP, GP or UP.
            FORM (constexpr): TAYLOR (|w g|, |-w g + eps w^2|) or SUM (|g|, |g| + eps |w|).
        """
        w = to_f32(w)
        if STRATEGY == MP:
            s = tl.abs(w)
        else:
            g = to_f32(g)
            if FORM == TAYLOR:
                if STRATEGY == GP:
                    s = tl.abs(w * g)
                else:
                    s = tl.abs(-w * g + eps * w * w)
            else:
                if STRATEGY == GP:
                    s = tl.abs(g)
                else:
                    s = tl.abs(g) + eps * tl.abs(w)
        return s

    @triton.jit
    def _saliency_kernel(
        w_ptr,
        g_ptr,
        out_ptr,
        n,
        eps,
        STRATEGY: tl.constexpr,
        FORM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The scores of n entries, one BLOCK a program.

        Args:
            w_ptr, g_ptr: weights and gradients, read in memory order (the launcher passes
                them with the same strides); g_ptr is not read for MP.
            out_ptr: fp32 scores, the same strides as the inputs.
            n (int): entries.
            eps (float), STRATEGY, FORM: as in `score_of`.
            BLOCK (constexpr): entries a program (1024: 4 warps, 8 a thread).
        """
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        w = tl.load(w_ptr + offs, mask=valid, other=0)
        if STRATEGY == MP:
            g = w
        else:
            g = tl.load(g_ptr + offs, mask=valid, other=0)
        tl.store(out_ptr + offs, score_of(w, g, eps, STRATEGY, FORM), mask=valid)


def _validate(w, g, strategy, form):
    if strategy not in STRATEGY_CODES:
        raise ValueError(f"saliency strategy must be mp, gp or up, got {strategy!r}")
    if form not in SALIENCY_FORMS:
        raise ValueError(f"saliency form must be one of {SALIENCY_FORMS}, got {form!r}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor, got {w.dtype}")
    if strategy != "mp":
        if g is None:
            raise ValueError(f"strategy {strategy} needs the gradient g")
        if g.shape != w.shape:
            raise ValueError(f"g has shape {tuple(g.shape)}, w has {tuple(w.shape)}")
        if g.device != w.device:
            raise ValueError(f"g is on {g.device}, w on {w.device}")


def saliency(
    w: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    strategy: str,
    form: str = "taylor",
    eps: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """fp32 scores of the same shape as `w` for strategy mp, gp or up (fp32/bf16/fp16 in).

    Layouts: w and g dense with the same strides (contiguous, channels_last, transposed) are
    read in place and the scores come in that layout; anything else (slices, expanded views,
    w and g in different layouts) is read through contiguous copies (w.numel() elements
    each). The kernel computes the reference's bits exactly: no FMA contraction, bf16
    widened through its bit pattern.
    """
    _validate(w, g, strategy, form)
    if pick(backend, w, *([] if g is None else [g])) == "torch":
        return saliency_ref(w, g, strategy, form, float(eps))
    ops = [w] if strategy == "mp" else [w, g]
    if not same_layout(*ops):
        ops = [t.contiguous() for t in ops]
    w_c, g_c = ops[0], ops[-1]
    out = torch.empty_like(w_c, dtype=torch.float32)  # the inputs' strides
    n = w.numel()
    if n:
        _saliency_kernel[(triton.cdiv(n, BLOCK),)](
            kernel_view(w_c),
            kernel_view(g_c),
            out,
            n,
            float(eps),
            STRATEGY=STRATEGY_CODES[strategy],
            FORM=FORM_CODES[form],
            BLOCK=BLOCK,
            enable_fp_fusion=False,  # a*b + c rounded twice, as torch does
        )
    return out
