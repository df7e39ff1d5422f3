"""Pruning scores: the lowest-scoring kept weights are removed.

Forms (see the science notes): with w the weight, g = dL/dw of the data loss alone and eps
the weight-decay coefficient,

    strategy  taylor (authors' code)      sum (design card)
    mp        |w|                         |w|
    gp        |w * g|                     |g|
    up        |-w * g + eps * w^2|        |g| + eps * |w|

The Taylor forms estimate the change of the loss when w is set to zero; UP adds back the
part of that change the weight-decay term would have contributed.
"""

from __future__ import annotations

import torch

SALIENCY_FORMS = ("taylor", "sum")
STRATEGIES_NEEDING_GRAD = ("gp", "up")


def saliency_ref(w: torch.Tensor, g: torch.Tensor | None, strategy: str, form: str, eps: float):
    w = w.float()
    if strategy == "mp":
        return w.abs()
    g = g.float()
    if form == "taylor":
        return (w * g).abs() if strategy == "gp" else (-w * g + eps * w * w).abs()
    return g.abs() if strategy == "gp" else g.abs() + eps * w.abs()


def saliency(
    w: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    strategy: str,
    form: str = "taylor",
    eps: float = 0.0,
) -> torch.Tensor:
    """fp32 scores of the same shape as `w` for strategy mp, gp or up."""
    if strategy not in ("mp", "gp", "up"):
        raise ValueError(f"saliency strategy must be mp, gp or up, got {strategy!r}")
    if form not in SALIENCY_FORMS:
        raise ValueError(f"saliency form must be one of {SALIENCY_FORMS}, got {form!r}")
    if strategy in STRATEGIES_NEEDING_GRAD:
        if g is None:
            raise ValueError(f"strategy {strategy} needs the gradient g")
        if g.shape != w.shape:
            raise ValueError(f"g has shape {tuple(g.shape)}, w has {tuple(w.shape)}")
    return saliency_ref(w, g, strategy, form, float(eps))
