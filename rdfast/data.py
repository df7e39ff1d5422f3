"""Datasets as device-resident tensors, and the registry that names them.

Add a dataset in one place: a function decorated with `@register_dataset` that returns
`(x_train, y_train, x_test, y_test, class_names)` as CPU tensors. Everything else (subsets,
normalisation, moving to the device, batching) is shared.

A dataset is named on the command line by a spec, `NAME` or `NAME:key=value,...`, e.g.
`synthetic:classes=20,sep=2` or `mnist:train=5000,test=1000`. Every dataset accepts
`train=N` and `test=N` (a stratified subset drawn with a fixed seed); some accept more.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rdfast.errors import BadInput

DEFAULT_DATA_ROOT = Path(os.environ.get("RDFAST_DATA", "~/.cache/rdfast/data")).expanduser()


@dataclass
class TensorData:
    """A classification dataset held as tensors on one device, normalised per channel."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.class_names,
        )

    def train_batches(self, batch_size: int, generator: torch.Generator):
        """Shuffled mini-batches by index: one seeded permutation per call (one epoch)."""
        n = self.x_train.shape[0]
        order = torch.randperm(n, generator=generator).to(self.x_train.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.x_train[idx], self.y_train[idx]


@dataclass
class Option:
    kind: type
    default: object
    help: str


@dataclass
class DatasetEntry:
    name: str
    description: str
    load: Callable[..., tuple]
    options: dict[str, Option] = field(default_factory=dict)
    # Files that must exist under the data root (relative paths); empty = nothing to read.
    files: tuple[str, ...] = ()

    def present(self, root: Path) -> bool:
        return all((Path(root) / f).exists() for f in self.files)


DATASETS: dict[str, DatasetEntry] = {}

COMMON_OPTIONS = {
    "train": Option(int, 0, "use a stratified subset of N training examples (0 = all)"),
    "test": Option(int, 0, "use a stratified subset of N test examples (0 = all)"),
}


def register_dataset(name: str, description: str, options=None, files=()):
    def wrap(fn):
        DATASETS[name] = DatasetEntry(name, description, fn, dict(options or {}), tuple(files))
        return fn

    return wrap


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """`'synthetic:classes=5,sep=2'` -> `('synthetic', {'classes': 5, 'sep': 2.0})`, validated."""
    name, _, rest = spec.partition(":")
    if name not in DATASETS:
        raise BadInput(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    entry = DATASETS[name]
    known = {**COMMON_OPTIONS, **entry.options}
    opts: dict[str, object] = {k: o.default for k, o in known.items()}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            raise BadInput(
                f"bad dataset option {item!r} for {name}; options: "
                + ", ".join(f"{k}=<{o.kind.__name__}>" for k, o in known.items())
            )
        try:
            opts[key] = known[key].kind(value)
        except ValueError:
            raise BadInput(
                f"dataset option {key} needs a {known[key].kind.__name__}, got {value!r}"
            ) from None
    for key in ("train", "test"):
        if int(opts[key]) < 0:
            raise BadInput(f"dataset option {key} must be >= 0, got {opts[key]}")
    return name, opts


def canonical_spec(spec: str) -> str:
    """One spelling per dataset configuration (defaults dropped, keys sorted): the cache key."""
    name, opts = parse_spec(spec)
    known = {**COMMON_OPTIONS, **DATASETS[name].options}
    changed = sorted((k, v) for k, v in opts.items() if v != known[k].default)
    return name + (":" + ",".join(f"{k}={v}" for k, v in changed) if changed else "")


def _stratified_subset(x, y, n, what):
    if n == 0 or n >= len(y):
        return x, y
    from sklearn.model_selection import train_test_split

    try:
        idx, _ = train_test_split(
            np.arange(len(y)), train_size=n, stratify=y.numpy(), random_state=0
        )
    except ValueError as e:
        raise BadInput(f"cannot draw a stratified {what} subset of {n}: {e}") from None
    idx = torch.from_numpy(np.sort(idx))
    return x[idx], y[idx]


def load_dataset(spec: str, root: Path | str | None = None) -> TensorData:
    """Load, subset and normalise a dataset on the CPU."""
    name, opts = parse_spec(spec)
    entry = DATASETS[name]
    root = Path(root).expanduser() if root is not None else DEFAULT_DATA_ROOT
    own = {k: v for k, v in opts.items() if k in entry.options}
    x_tr, y_tr, x_te, y_te, names = entry.load(root, **own)
    x_tr, y_tr = _stratified_subset(x_tr, y_tr, int(opts["train"]), "training")
    x_te, y_te = _stratified_subset(x_te, y_te, int(opts["test"]), "test")
    x_tr, x_te = x_tr.float(), x_te.float()
    # Per-channel statistics of the training split (channel = dim 1 for images, each
    # feature for vectors), applied to both splits.
    dims = [0] + list(range(2, x_tr.dim()))
    mean = x_tr.mean(dim=dims, keepdim=True)
    std = x_tr.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return TensorData(
        canonical_spec(spec),
        ((x_tr - mean) / std).contiguous(),
        y_tr.long(),
        ((x_te - mean) / std).contiguous(),
        y_te.long(),
        list(names),
    )


# --------------------------------------------------------------------------- datasets


@register_dataset(
    "digits", "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); offline"
)
def _digits(root):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # A fixed stratified split: 70 % train (1,257), 30 % test (540, 54 per class).
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    as_img = lambda a: torch.from_numpy(a.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # noqa: E731
    return (
        as_img(x_tr),
        torch.from_numpy(y_tr),
        as_img(x_te),
        torch.from_numpy(y_te),
        [str(i) for i in range(10)],
    )


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _torchvision_mnist(cls, folder, root):
    raw = Path(root) / folder / "raw"
    present = all((raw / f).exists() for f in _MNIST_FILES)
    try:
        train = cls(str(root), train=True, download=not present)
        test = cls(str(root), train=False, download=False)
    except Exception as e:  # torchvision raises RuntimeError / URLError / OSError here
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise BadInput(
            f"{folder} files not found in {raw} (expected {', '.join(_MNIST_FILES)}) "
            f"and download failed: {reason}"
        ) from None
    return (
        train.data.unsqueeze(1),
        train.targets,
        test.data.unsqueeze(1),
        test.targets,
        list(train.classes),
    )


def _offline() -> bool:
    return os.environ.get("RDFAST_OFFLINE", "") not in ("", "0")


@register_dataset(
    "mnist",
    "MNIST handwritten digits (60,000 / 10,000, 28x28) through torchvision",
    files=tuple(f"MNIST/raw/{f}" for f in _MNIST_FILES),
)
def _mnist(root):
    from torchvision.datasets import MNIST

    return _torchvision_mnist(_no_download(MNIST) if _offline() else MNIST, "MNIST", root)


@register_dataset(
    "fashion-mnist",
    "Fashion-MNIST clothing images (60,000 / 10,000, 28x28) through torchvision",
    files=tuple(f"FashionMNIST/raw/{f}" for f in _MNIST_FILES),
)
def _fashion_mnist(root):
    from torchvision.datasets import FashionMNIST

    return _torchvision_mnist(
        _no_download(FashionMNIST) if _offline() else FashionMNIST, "FashionMNIST", root
    )


def _no_download(cls):
    """The torchvision class with downloading replaced by an immediate, explained failure."""

    class Offline(cls):
        def download(self):
            if not self._check_exists():
                raise RuntimeError("RDFAST_OFFLINE is set")

    Offline.__name__ = cls.__name__
    return Offline


@register_dataset(
    "synthetic",
    "seeded Gaussian mixture: one isotropic Gaussian per class; difficulty set by sep",
    options={
        "classes": Option(int, 10, "number of classes"),
        "dim": Option(int, 32, "input dimension"),
        "n_train": Option(int, 2000, "training examples (balanced over classes)"),
        "n_test": Option(int, 1000, "test examples (balanced over classes)"),
        "sep": Option(float, 3.0, "typical distance between class means, in noise std units"),
        "seed": Option(int, 0, "seed of the data (fixed across model seeds)"),
    },
)
def _synthetic(root, classes, dim, n_train, n_test, sep, seed):
    if classes < 2 or dim < 1 or n_train < classes or n_test < classes or sep < 0:
        raise BadInput(
            "synthetic needs classes >= 2, dim >= 1, n_train and n_test >= classes, sep >= 0"
        )
    g = torch.Generator().manual_seed(seed)
    # E||mu_i - mu_j|| ~= sqrt(2 * dim) * scale, so this scale puts the means `sep` apart.
    means = torch.randn(classes, dim, generator=g) * (sep / (2 * dim) ** 0.5)

    def draw(n):
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
        return means[y] + torch.randn(n, dim, generator=g), y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return x_tr, y_tr, x_te, y_te, [str(i) for i in range(classes)]
