"""What retraining minimizes after a pruning step (`--mitigation`), beside plain cross-entropy.

- kd: knowledge distillation from the run's own dense model (Hinton et al. 2015), the
  mitigation Blakeney et al. ("Simon Says", 2021) found to reduce the bias pruning adds:
  loss = (1 - w) CE(z, y) + w T^2 KL(softmax(z_dense / T) || softmax(z / T)). The T^2 keeps
  the soft term's gradients on the scale of the hard one's as T grows. One extra forward pass
  of the dense model per batch (no gradient).
- ceag: Balancing Act's constrained excess accuracy gap (Hashemizadeh et al., ICLR 2024),
  as its code (`src/cmp/uniform_accuracy_gap.py` of merajhashemi/balancing-act) computes it.
  One multiplier lambda_c per class on the constraint
      (A_dense,c - A_c) - (A_dense - A) <= tol,
  the dense model's per-class and overall training accuracies (and losses) computed once
  over the whole training set in eval mode, the pruned model's measured on the training
  batches through a buffer of each class's last `memory` predictions (40). Alternating
  dual-primal steps on every batch: first the multipliers of the classes whose buffer is full
  ascend on the measured gap, lambda_c <- max(0, lambda_c + eta * defect_c) (eta 1e-2, the
  repository's CIFAR dual learning rate); then the model descends on the Lagrangian with the
  updated multipliers over the classes present in the batch, with the loss gap as the proxy:
      CE + sum_{c in batch} lambda_c [(CE_c - L_dense,c) - (CE - L_dense)].
  Tolerance 0.1 (the repository's CIFAR setting; 0.01 on UTKFace/FairFace with eta 1e-4).
  What differs, forced by rdfast's schedule: Balancing Act prunes gradually for 15 epochs
  and then fine-tunes under the constraints for 35; rdfast prunes in steps with a short
  fine-tuning after each, so the multipliers carry over from step to step (one constrained
  problem against the same dense model over the run's retraining; part of each step's
  state), while the buffer starts empty at each step (it measures the model being retrained).
- constrained: rdfast's own recall-constrained variant (not Balancing Act as published):
  the excess recall drop psi_c = (R_1^c - R_t^c) - (A_1 - A_t) <= eps measured ten times an
  epoch on a validation split held out of retraining, the model descending on
  (CE + sum_c lambda_c CE_c) / (1 + sum_c lambda_c), projected ascent with step 1. Kept
  because earlier studies used it; ceag is the published method.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rdfast.data import TensorData
from rdfast.errors import BadInput
from rdfast.seeding import derive_seed

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


# ------------------------------------------------------------------ ceag (Balancing Act)


class ClassBuffer:
    """The last `memory` correct/incorrect predictions of each class (Balancing Act's
    `GroupCyclicBuffer`): a class's accuracy counts only once its buffer is full."""

    def __init__(self, num_classes: int, memory: int):
        self.memory = memory
        self.values = torch.zeros(num_classes, memory, dtype=torch.float64)
        self.filled = torch.zeros(num_classes, dtype=torch.long)
        self.next = torch.zeros(num_classes, dtype=torch.long)

    def add(self, y: torch.Tensor, hit: torch.Tensor) -> None:
        """Append the batch's predictions (`hit`: correct or not) to their classes, in order."""
        y, hit = y.cpu(), hit.cpu().to(torch.float64)
        for c in torch.unique(y).tolist():
            h = hit[y == c][-self.memory :]  # more than fits: the oldest fall out first
            slots = (self.next[c] + torch.arange(len(h))) % self.memory
            self.values[c, slots] = h
            self.next[c] = (self.next[c] + len(h)) % self.memory
            self.filled[c] = min(self.memory, int(self.filled[c]) + len(h))

    def query(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(which classes are full, their accuracies (0 elsewhere), the mean over the full
        ones (0 when none is))."""
        full = self.filled == self.memory
        acc = torch.where(full, self.values.mean(dim=1), torch.zeros(()))
        mean = float(acc[full].mean()) if bool(full.any()) else 0.0
        return full, acc, mean


@torch.no_grad()
def class_loss_accuracy(forward, model: nn.Module, x, y, num_classes: int, prepare=None,
                        batch_size: int = 1024):  # fmt: skip
    """The dense baseline of ceag: (per-class mean CE, per-class accuracy, mean CE, accuracy)
    over inputs `x` (eval mode), in float64; `prepare` (the data's) applied a batch at a
    time, so the whole prepared training set is never held."""
    model.eval()
    loss = torch.zeros(num_classes, dtype=torch.float64, device=y.device)
    hits = torch.zeros(num_classes, dtype=torch.float64, device=y.device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        z = forward(xb if prepare is None else prepare(xb)).double()
        yy = y[start : start + batch_size]
        loss.index_add_(0, yy, F.cross_entropy(z, yy, reduction="none"))
        hits.index_add_(0, yy, (z.argmax(dim=1) == yy).double())
    n = torch.bincount(y, minlength=num_classes).double()
    return loss / n.clamp_min(1), hits / n.clamp_min(1), float(loss.sum() / n.sum()), \
        float(hits.sum() / n.sum())  # fmt: skip


class AccuracyGap(CrossEntropy):
    """Balancing Act's CEAG objective with its alternating dual-primal update on every batch
    (module docstring). `dense` = `class_loss_accuracy` of the dense model on the training
    set; `multipliers` (float64, one per class) is updated in place."""

    def __init__(self, dense: tuple, multipliers: torch.Tensor, tolerance: float, dual_lr: float,
                 memory: int):  # fmt: skip
        self.class_loss, self.class_acc, self.loss_mean, self.acc = dense
        self.class_acc_cpu = self.class_acc.cpu()  # beside the buffer's, once, not per batch
        self.multipliers = multipliers
        self.tolerance, self.dual_lr = tolerance, dual_lr
        self.buffer = ClassBuffer(multipliers.shape[0], memory)

    def loss(self, logits, x, y):
        c = self.multipliers.shape[0]
        logits = logits.float()
        ce = F.cross_entropy(logits, y, reduction="none")
        self.dual_step(y, logits.detach().argmax(dim=1) == y)
        counts = torch.bincount(y, minlength=c)
        class_ce = torch.zeros(c, dtype=ce.dtype, device=ce.device).index_add_(0, y, ce)
        class_ce = class_ce / counts.clamp_min(1).to(ce.dtype)
        mean = ce.mean()
        proxy = (class_ce - self.class_loss.to(ce)) - (mean - self.loss_mean)
        lam = self.multipliers.to(ce)
        return mean + (lam * proxy)[counts > 0].sum()

    @torch.no_grad()
    def dual_step(self, y: torch.Tensor, hit: torch.Tensor) -> None:
        """lambda_c <- max(0, lambda_c + eta [(A_dense,c - A_c) - (A_dense - A) - tol]) for
        the classes whose buffer is full, A_c and A from the buffer."""
        self.buffer.add(y, hit)
        full, acc, mean = self.buffer.query()
        if not bool(full.any()):
            return
        defect = (self.class_acc_cpu - acc) - (self.acc - mean) - self.tolerance
        lam = self.multipliers
        rows = full.to(lam.device)
        lam[rows] = (lam[rows] + self.dual_lr * defect[full].to(lam)).clamp(min=0)


# ------------------------------------------------------------------ a run's mitigation


class RunMitigation:
    """What a run's mitigation needs across its pruning steps and what each step's
    retraining minimizes: built once per run (before any step seeds the global generator),
    from the dense checkpoint and, when resuming, the last recorded step's state."""

    def __init__(self, ctx, settings, data: TensorData, seed: int, dense: dict,
                 state: dict | None):  # fmt: skip
        self.settings, self.data, self.kind = settings, data, settings.mitigation
        self.multipliers = None
        if self.kind == "plain":
            return
        # The dense model: kd's teacher on every batch; the constrained mitigations need
        # only its per-class fit, measured once here, and do not keep it.
        teacher = ctx.new_model(seed)
        teacher.load_state_dict(dense["model"])
        teacher.eval().requires_grad_(False)
        teacher_forward = ctx.forward(teacher)
        if self.kind == "kd":
            self.teacher_forward = teacher_forward
        c = data.num_classes
        if self.kind in ("constrained", "ceag"):
            saved = None if state is None else state.get("multipliers")
            self.multipliers = torch.zeros(c, dtype=torch.float64, device=ctx.device) \
                if saved is None else saved.to(ctx.device)  # fmt: skip
        if self.kind == "constrained":
            self.train_data, self.val = validation_split(
                data, settings.val_fraction, derive_seed(seed, "val") % 2**32
            )
            self.dense_fit = class_recall(teacher_forward, teacher, *self.val, c)
        if self.kind == "ceag":
            self.dense_fit = class_loss_accuracy(teacher_forward, teacher, data.x_train,
                                                 data.y_train, c, prepare=data.prepare)  # fmt: skip

    def retraining(self, model, forward, batch_size: int):
        """(training data, objective) of a step's retraining; objective None: plain CE."""
        p = self.settings
        if self.kind == "kd":
            return self.data, Distillation(self.teacher_forward, p.kd_weight, p.kd_temperature)
        if self.kind == "constrained":
            batches = -(-int(self.train_data.y_train.shape[0]) // batch_size)
            every = max(1, round(batches / UPDATES_PER_EPOCH))
            objective = Constrained(model, forward, self.val, self.dense_fit, self.multipliers,
                                    p.constraint_eps, p.multiplier_lr, every)  # fmt: skip
            return self.train_data, objective
        if self.kind == "ceag":
            objective = AccuracyGap(self.dense_fit, self.multipliers, p.ceag_tolerance,
                                    p.dual_lr, p.ceag_memory)  # fmt: skip
            return self.data, objective
        return self.data, None

    def state(self) -> dict:
        """What a step's state keeps of the mitigation (the multipliers, which carry over)."""
        return {} if self.multipliers is None else {"multipliers": self.multipliers.cpu().clone()}
