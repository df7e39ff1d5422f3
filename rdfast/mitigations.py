"""What retraining minimizes after a pruning step (`--mitigation`), beside plain cross-entropy.

- kd: knowledge distillation from the run's own dense model (Hinton et al. 2015), the
  mitigation Blakeney et al. ("Simon Says", 2021) found to reduce the bias pruning adds:
  loss = (1 - w) CE(z, y) + w T^2 KL(softmax(z_dense / T) || softmax(z / T)). The T^2 keeps
  the soft term's gradients on the scale of the hard one's as T grows. One extra forward pass
  of the dense model per batch (no gradient).
- constrained: Balancing Act (Hashemizadeh et al., ICLR 2024): one Lagrange multiplier per
  class c on the excess recall drop psi_c = (R_1^c - R_t^c) - (A_1 - A_t) <= eps. The recall
  is not differentiable, so, as in that paper (proxy constraints, Cotter et al. 2019), the
  model descends on a differentiable proxy while the multipliers ascend on the measured
  psi_c: lambda_c <- max(0, lambda_c + eta (psi_c - eps)). The proxy of psi_c is the class's
  mean loss CE_c in the batch: (CE + sum_c lambda_c CE_c) / (1 + sum_c lambda_c). The
  model's own loss, the other half of psi_c, is left out of the proxy: with it (- lambda_c
  CE), the objective is unbounded below once the multipliers sum past 1, and retraining
  diverged within 3 epochs on digits. The division keeps the plain objective's step size.
  psi_c is measured on a validation split carved from the training set (stratified, seeded
  by the run's seed) and held out of retraining; the test set stays the measurement. The
  dense model was trained on the whole training set, split included: its R_1 on the split
  is a training recall.
  The multipliers carry over from one pruning step to the next (they are part of the
  step's state), so a class that kept paying keeps its weight.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rdfast.data import TensorData
from rdfast.errors import BadInput

# Multiplier updates per retraining epoch: 10 evaluations of the validation split cost
# ~40 % of an epoch's compute with a 10 % split (forward only, over 10 x 10 % of the set),
# and give 20-40 ascent steps over the 2-4 fine-tuning epochs of the presets.
UPDATES_PER_EPOCH = 10


class CrossEntropy:
    """Plain retraining: the mean cross-entropy of the batch."""

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def after_step(self) -> None:
        pass


class Distillation(CrossEntropy):
    def __init__(self, teacher, weight: float, temperature: float):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def loss(self, logits, x, y):
        with torch.no_grad():
            soft = self.teacher(x).float()
        return distillation_loss(logits.float(), soft, y, self.weight, self.temperature)


def distillation_loss(logits, teacher_logits, y, weight: float, temperature: float):
    """(1 - w) CE(logits, y) + w T^2 KL(softmax(teacher / T) || softmax(logits / T)),
    the KL term averaged over the batch."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - weight) * F.cross_entropy(logits, y) + weight * t * t * kl


def surrogate_loss(logits, y, multipliers: torch.Tensor) -> torch.Tensor:
    """(CE + sum_c lambda_c CE_c) / (1 + sum_c lambda_c): CE_c the mean loss of the batch's
    examples of class c (a class absent from the batch contributes nothing)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    c = multipliers.shape[0]
    lam = multipliers.to(ce.dtype)
    counts = torch.bincount(y, minlength=c).to(ce.dtype)
    per_class = torch.zeros(c, dtype=ce.dtype, device=ce.device).index_add_(0, y, ce)
    per_class = per_class / counts.clamp_min(1)  # 0 for absent classes
    return (ce.mean() + (lam * per_class).sum()) / (1 + lam.sum())


def excess_drop(recall, accuracy, dense_recall, dense_accuracy):
    """psi_c = (R_1^c - R_t^c) - (A_1 - A_t): how much more class c lost than the model."""
    return (dense_recall - recall) - (dense_accuracy - accuracy)


class Constrained(CrossEntropy):
    """Surrogate descent for the model, projected gradient ascent for the multipliers (the
    run's tensor `multipliers`, updated in place every `every` optimizer steps, so it carries
    over to the next pruning step)."""

    def __init__(self, model, forward, val: tuple, dense: tuple, multipliers, eps, lr, every):
        self.model, self.forward = model, forward
        self.val_x, self.val_y = val
        self.dense_recall, self.dense_accuracy = dense
        self.multipliers = multipliers
        self.eps, self.lr, self.every = eps, lr, every
        self.steps = 0

    def loss(self, logits, x, y):
        return surrogate_loss(logits.float(), y, self.multipliers)

    def after_step(self):
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()

    def update(self) -> None:
        was_training = self.model.training
        recall, accuracy = class_recall(self.forward, self.model, self.val_x, self.val_y,
                                        self.multipliers.shape[0])  # fmt: skip
        self.model.train(was_training)
        psi = excess_drop(recall, accuracy, self.dense_recall, self.dense_accuracy)
        self.multipliers.add_(self.lr * (psi - self.eps)).clamp_(min=0)


@torch.no_grad()
def class_recall(forward, model: nn.Module, x, y, num_classes: int, batch_size: int = 4096):
    """(recall per class, accuracy) of `model` on prepared inputs `x` (eval mode)."""
    model.eval()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=y.device)
    for start in range(0, x.shape[0], batch_size):
        pred = forward(x[start : start + batch_size]).argmax(dim=1)
        yy = y[start : start + batch_size]
        hits.index_add_(0, yy, (pred == yy).double())
    support = torch.bincount(y, minlength=num_classes).double()
    return hits / support.clamp_min(1), float(hits.sum() / support.sum())


def validation_split(data: TensorData, fraction: float, seed: int):
    """(data without the split, (x_val prepared, y_val)): a stratified share `fraction` of the
    training set, drawn with `seed`; every class keeps at least one example on both sides."""
    keep, held = (torch.from_numpy(i).to(data.x_train.device)
                  for i in _split_indices(data, fraction, seed))  # fmt: skip
    rest = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    return rest, (data.prepare(data.x_train[held]), data.y_train[held])


def _split_indices(data: TensorData, fraction: float, seed: int):
    """(kept, held-out) training indices, each sorted; ValueError where the split cannot be
    stratified (a class with fewer than two examples, fewer held out than classes)."""
    from sklearn.model_selection import train_test_split

    y = data.y_train.cpu().numpy()
    keep, held = train_test_split(
        np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed
    )
    return np.sort(keep), np.sort(held)


def check_split(data: TensorData, fraction: float) -> None:
    """The split can be drawn (checked before anything is written; whether it can does not
    depend on the seed)."""
    try:
        _split_indices(data, fraction, seed=0)
    except ValueError as e:
        n, c = int(data.y_train.shape[0]), data.num_classes
        raise BadInput(
            f"--val-fraction {fraction:g} of {n} training examples: both sides need at least "
            f"one example of each of the {c} classes ({' '.join(str(e).split())})"
        ) from None
