"""The calibration draw that gradient-based scores measure on, and a model left as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rdfast.data import TensorData
from rdfast.seeding import generator


def _batches(data: TensorData, batch_size: int, gen: torch.Generator) -> Iterator:
    while True:  # more batches than one epoch holds: continue with a fresh permutation
        yield from data.train_batches(batch_size, gen)


def calibration_batches(data: TensorData, batches: int, batch_size: int, seed_parts: tuple):
    """The first `batches` training batches of the generator of `seed_parts`: the same draw
    every time it is asked for (gp/up's mean gradient, the class gradients, cs's importance)."""
    stream = _batches(data, batch_size, generator(*seed_parts))
    return (next(stream) for _ in range(batches))


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Forward passes in train mode move batch-norm running statistics: they are put back on
    leaving, so measuring leaves the model as it was."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


# The classes' per-weight sums are held at once when they fit this many bytes (classes x
# weights x 4: ResNet-20 with ten classes 11 MB, a 25e6-weight model with 1,000 classes
# 100 GB): one forward pass of each calibration batch then serves every class, where one
# class at a time runs each batch (and draws it) once per class: 1.5-1.6x the time of a cs
# or taylor-max pruning step of ResNet-20 with ten classes (benchmarks/README.md). Beyond the
# budget, one class at a time.
CLASS_SUMS_MEMORY = 1 << 30


def fits_at_once(params, classes: int, memory: int | None = None) -> bool:
    """Whether `classes` float32 copies of `params` fit in `memory` bytes (None: the module's
    CLASS_SUMS_MEMORY, read at the call)."""
    budget = CLASS_SUMS_MEMORY if memory is None else memory
    return classes * sum(p.numel() for p in params) * 4 <= budget


def class_sums(model: nn.Module, draw, classes, params, term, memory: int | None = None):
    """Yield (c, the sum over the calibration batches, in their order, of term(c, logits,
    y)) for each class of `classes`: a list of tensors aligned with `params`, None for a class
    that added nothing. `draw()` gives the batches again. Each batch runs whole, one forward
    pass in train mode (batch-norm statistics of the whole batch, as the mean gradient sees
    them), its graph kept for the classes' backward passes (`term` passes retain_graph=True);
    all classes from one pass where their sums fit `memory` (`fits_at_once`), else one class
    a pass. The arithmetic is the same either way: a forward pass in train mode does not
    depend on the running statistics it moves, and they are put back afterwards."""
    size = len(classes) if fits_at_once(params, len(classes), memory) else 1
    for i in range(0, len(classes), size):
        part = classes[i : i + size]
        sums = dict.fromkeys(part)
        with preserved_buffers(model):
            model.train()
            for x, y in draw():
                with torch.enable_grad():  # consumed lazily, perhaps inside no_grad
                    logits = model(x)
                    for c in part:
                        add = term(c, logits, y)
                        if add is None:
                            continue
                        if sums[c] is None:
                            sums[c] = list(add)
                        else:
                            for s, a in zip(sums[c], add):
                                s.add_(a)
        yield from sums.items()
