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
