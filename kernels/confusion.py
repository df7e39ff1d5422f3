"""Confusion matrix and the per-class quantities derived from it."""

from __future__ import annotations

import torch


def confusion_matrix(logits_or_labels: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """int64 (num_classes x num_classes) counts, rows = true class, columns = prediction.

    Logits (N x C) are reduced with `argmax` (first maximal index on ties); a 1-D input is
    taken as predicted labels.
    """
    pred = logits_or_labels.argmax(dim=1) if logits_or_labels.dim() == 2 else logits_or_labels
    if pred.shape != targets.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {targets.shape[0]} targets")
    flat = targets.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_recall(cm: torch.Tensor) -> torch.Tensor:
    """Recall per true class: diagonal / row sum; NaN for a class without test examples."""
    support = cm.sum(dim=1)
    return cm.diagonal().double() / support.double()


def accuracy(cm: torch.Tensor) -> float:
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else float("nan")
