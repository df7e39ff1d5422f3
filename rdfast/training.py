"""Training loop over device-resident tensors, with pruning masks held fixed.

Pruned weights stay exactly zero: their gradients are multiplied by the mask before every
optimizer step, so the momentum buffer and the weight-decay term (eps * 0) never move them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rdfast.config import TrainSettings
from rdfast.data import TensorData
from rdfast.errors import RunFailed
from rdfast.kernels import confusion_matrix, masked_linear
from rdfast.mitigations import CrossEntropy
from rdfast.seeding import generator


def lr_at(epoch: int, lr: float, epochs: int, schedule: str) -> float:
    """Learning rate for `epoch` (0-based): cosine to 0, or x0.1 at 50 % and 75 % of the epochs."""
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return lr * 0.1 ** sum(epoch >= m for m in (epochs // 2, (3 * epochs) // 4))


def train(
    model: nn.Module,
    data: TensorData,
    settings: TrainSettings,
    *,
    lr: float | None = None,
    epochs: int | None = None,
    masks: dict[nn.Parameter, torch.Tensor] | None = None,
    seed_parts: tuple = (),
    on_epoch_end: Callable[[int, torch.optim.Optimizer], None] | None = None,
    progress=None,
    forward: Callable | None = None,
    resume: dict | None = None,
    start_epoch: int = 0,
    objective=None,
) -> dict:
    """Train in place. Epoch e shuffles with a generator derived from `seed_parts + (e,)`.

    `forward` replaces `model(x)` (a torch.compile'd model, say); `settings.precision` bf16
    runs forward and loss under bf16 autocast. `resume` = {"epoch", "optimizer"} continues a
    run whose model state is already loaded, at that epoch: with the data order derived per
    epoch, the result is the uninterrupted one bit for bit. `on_epoch_end(epoch, optimizer)`
    sees the number of finished epochs. `start_epoch` begins a fresh optimizer at that epoch of
    the schedule (rewound weights retrained to the end, as OpenLTH does). `objective`
    (rdfast.mitigations): what is minimized, `objective.loss(logits, x, y)`, and what it
    updates after each optimizer step; plain cross-entropy by default. Returns {"seconds",
    "images_per_second", "last_loss"}; raises RunFailed on a NaN/inf loss.
    """
    forward = model if forward is None else forward
    objective = CrossEntropy() if objective is None else objective
    device = data.x_train.device
    lr = settings.lr if lr is None else lr
    epochs = settings.epochs if epochs is None else epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    first_epoch = start_epoch
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        first_epoch = int(resume["epoch"])
    masked = [(p, m.to(p.dtype)) for p, m in (masks or {}).items()]
    masked_params, mask_values = [p for p, _ in masked], [m for _, m in masked]
    model.train()
    start, seen, last = time.perf_counter(), 0, float("nan")
    for epoch in range(first_epoch, epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, lr, epochs, settings.schedule)
        # Summed on the device and read once per epoch: no host sync per step.
        loss_sum = torch.zeros((), device=device)
        for x, y in data.train_batches(settings.batch_size, generator(*seed_parts, epoch)):
            with autocast(device, settings.precision):
                loss = objective.loss(forward(x), x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masked:
                torch._foreach_mul_([p.grad for p in masked_params], mask_values)
            opt.step()
            objective.after_step()
            loss_sum += loss.detach() * y.shape[0]
            seen += y.shape[0]
        last = float(loss_sum) / data.x_train.shape[0]
        if not math.isfinite(last):
            raise RunFailed(f"training loss became {last} in epoch {epoch + 1} (lr {lr:g})")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, opt)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last:.4f}", refresh=False)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "images_per_second": seen / seconds if seconds > 0 else float("nan"),
        "last_loss": last,
    }


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TensorData,
    batch_size: int = 4096,
    precision: str = "fp32",
    forward: Callable | None = None,
) -> dict:
    """Test-set confusion matrix (int64, true x predicted), mean cross-entropy and each test
    example's predicted class (`prediction_dtype`; torch.argmax's rule), from which the
    matrix is counted."""
    model.eval()
    forward = model if forward is None else forward
    c = data.num_classes
    device = data.x_test.device
    cm = torch.zeros(c, c, dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    predictions = []
    start = time.perf_counter()
    for x, y in data.test_batches(batch_size):
        with autocast(device, precision):
            logits = forward(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        # One argmax (torch's rule, which the confusion kernel also follows) serves the
        # predictions and the matrix, counted from the labels.
        pred = logits.argmax(dim=1)
        cm += confusion_matrix(pred, y, c)
        predictions.append(pred)
    n = data.x_test.shape[0]
    seconds = time.perf_counter() - start
    pred = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)
    return {
        "confusion": cm.cpu().numpy(),
        "loss": float(loss) / n,
        "predictions": pred.cpu().numpy().astype(prediction_dtype(c)),
        "eval_images_per_second": n / seconds if seconds > 0 else float("nan"),
    }


def prediction_dtype(num_classes: int):
    """The smallest integer type of a class index: 2 bytes per test example up to 32,767
    classes (10,000 MNIST examples: 20 kB a step)."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


@contextmanager
def masked_linear_layers(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Within the block, each masked nn.Linear runs through the masked-linear kernel: the
    mask is applied inside the GEMM tiles and pruned weights get exactly zero gradient."""
    patched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in masks:
            mask = masks[name]

            def forward(x, module=module, mask=mask):
                return masked_linear(x, module.weight, mask, module.bias, backend="triton")

            module.forward = forward
            patched.append(module)
    try:
        yield patched
    finally:
        for module in patched:
            del module.forward
