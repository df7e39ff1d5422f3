"""The dataset registry: what an entry returns (`Raw`) and how entries are named.

Kept apart from `rdfast.data` (loading, subsets, normalisation, batching) so that the
entries in `rdfast.data.builtin` can import it without importing `rdfast.data` back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

AUGMENTATIONS = ("none", "crop", "crop-flip")


@dataclass
class Raw:
    """What a dataset entry returns: CPU tensors as stored (uint8 images are kept uint8)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    augment: str = "none"  # training augmentation: none, crop (4-pixel pad), crop-flip


@dataclass
class Option:
    kind: type
    default: object
    help: str


@dataclass
class DatasetEntry:
    name: str
    description: str
    load: Callable[..., Raw]
    options: dict[str, Option] = field(default_factory=dict)
    # Files that must exist under the data root (relative paths); empty = nothing to read.
    files: tuple[str, ...] = ()
    positional: str | None = None  # an option given without `key=`, e.g. imagefolder's path

    def present(self, root: Path) -> bool:
        return all((Path(root) / f).exists() for f in self.files)


DATASETS: dict[str, DatasetEntry] = {}

COMMON_OPTIONS = {
    "train": Option(int, 0, "use a stratified subset of N training examples (0 = all)"),
    "test": Option(int, 0, "use a stratified subset of N test examples (0 = all)"),
}


def register_dataset(name: str, description: str, options=None, files=(), positional=None):
    def wrap(fn):
        DATASETS[name] = DatasetEntry(
            name, description, fn, dict(options or {}), tuple(files), positional
        )
        return fn

    return wrap
