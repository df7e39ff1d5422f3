"""Datasets as device-resident tensors, named by specs: subsets, normalisation,
augmentation, moving to the device and batching, shared by every dataset.

A dataset is named on the command line by a spec, `NAME` or `NAME:key=value,...`, e.g.
`synthetic:classes=20,sep=2`, `mnist:train=5000,test=1000`, `imagefolder:/data/pets,size=64`.
Every dataset accepts `train=N` and `test=N` (a stratified subset drawn with a fixed seed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rdfast.data.registry import COMMON_OPTIONS, DATASETS, Raw
from rdfast.errors import BadInput

DEFAULT_DATA_ROOT = Path(os.environ.get("RDFAST_DATA", "~/.cache/rdfast/data")).expanduser()


@dataclass
class TensorData:
    """A classification dataset on one device. Inputs stay as stored (uint8 images take a
    quarter of the memory) and are normalised per channel batch by batch."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    mean: torch.Tensor  # per channel, broadcastable to a batch
    std: torch.Tensor
    augment: str = "none"
    channels_last: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> TensorData:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
            fields[k] = fields[k].to(device)
        return TensorData(**fields)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_batches(self, batch_size: int, generator: torch.Generator):
        """Shuffled, augmented, normalised mini-batches: one seeded permutation per call.

        All random numbers come from the CPU generator, so a seed gives the same batches on
        every device."""
        n = self.x_train.shape[0]
        order = torch.randperm(n, generator=generator).to(self.x_train.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = self.x_train[idx]
            if self.augment != "none":
                x = augment_batch(x, generator, flip=self.augment == "crop-flip")
            yield self.prepare(x), self.y_train[idx]

    def test_batches(self, batch_size: int):
        for start in range(0, self.x_test.shape[0], batch_size):
            end = start + batch_size
            yield self.prepare(self.x_test[start:end]), self.y_test[start:end]


def augment_batch(x: torch.Tensor, generator: torch.Generator, flip: bool, pad: int = 4):
    """Random crop after zero-padding by `pad` pixels, and a horizontal flip with p = 1/2,
    for a whole N x C x H x W batch at once on its device."""
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """`'synthetic:classes=5,sep=2'` -> `('synthetic', {'classes': 5, 'sep': 2.0, ...})`."""
    name, _, rest = spec.partition(":")
    if name not in DATASETS:
        raise BadInput(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    entry = DATASETS[name]
    known = {**COMMON_OPTIONS, **entry.options}
    opts: dict[str, object] = {k: o.default for k, o in known.items()}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if (
            not eq
            and entry.positional
            and opts[entry.positional] == known[entry.positional].default
        ):
            key, value = entry.positional, item
        elif not eq or key not in known:
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
    if entry.positional and not opts[entry.positional]:
        raise BadInput(f"{name} needs a {entry.positional}: {name}:<{entry.positional}>")
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


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (channel = dim 1; every feature for vectors), shaped to
    broadcast over a batch. uint8 images go through exact 256-bin value histograms per channel
    rather than a float copy of the whole set."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if x.dtype == torch.uint8:
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        counts = torch.stack([torch.bincount(c, minlength=256) for c in per_channel]).double()
        values = torch.arange(256, dtype=torch.float64)
        total = counts.sum(1)
        mean = (counts * values).sum(1) / total
        var = (counts * (values - mean[:, None]) ** 2).sum(1) / (total - 1).clamp_min(1)
        return mean.float().view(shape), var.sqrt().float().clamp_min(1e-6).view(shape)
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dim=dims).view(shape), x.std(dim=dims).clamp_min(1e-6).view(shape)


def load_dataset(spec: str, root: Path | str | None = None) -> TensorData:
    """Load, subset and compute normalisation statistics of a dataset, on the CPU."""
    name, opts = parse_spec(spec)
    entry = DATASETS[name]
    root = Path(root).expanduser() if root is not None else DEFAULT_DATA_ROOT
    own = {k: v for k, v in opts.items() if k in entry.options}
    raw = entry.load(root, **own)
    _check_labels(name, raw)
    x_tr, y_tr = _stratified_subset(raw.x_train, raw.y_train, int(opts["train"]), "training")
    x_te, y_te = _stratified_subset(raw.x_test, raw.y_test, int(opts["test"]), "test")
    if not x_tr.is_floating_point() and x_tr.dtype != torch.uint8:
        x_tr, x_te = x_tr.float(), x_te.float()
    mean, std = channel_stats(x_tr)
    return TensorData(
        canonical_spec(spec),
        x_tr.contiguous(),
        y_tr.long(),
        x_te.contiguous(),
        y_te.long(),
        list(raw.class_names),
        mean,
        std,
        raw.augment,
    )


def normalize(data: TensorData, spec: str, model=None) -> tuple[TensorData, dict]:
    """`data` normalized as `spec` says (`rdfast.config.NORMALIZE_HELP`), and the manifest's
    record of it: the spec and the per-channel mean and std on the [0, 1] pixel scale (the
    stored scale for inputs that are not uint8 images)."""
    scale = 255.0 if data.x_train.dtype == torch.uint8 else 1.0
    channels = data.mean.numel()
    spec = (spec or "dataset").strip()
    if spec == "dataset":  # as loaded: bit for bit the statistics every earlier run used
        record = {"normalize": spec, "mean": _rounded(data.mean / scale),
                  "std": _rounded(data.std / scale)}  # fmt: skip
        return data, record
    if spec == "none":
        mean, std = torch.zeros(channels), torch.ones(channels)
    elif spec == "model":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "mean" not in cfg or "std" not in cfg:
            raise BadInput("--normalize model needs a timm: model with a pretrained mean/std")
        mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    else:
        mean, std = _parse_mean_std(spec, channels)
    if mean.numel() == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    if mean.numel() != channels or std.numel() != channels:
        raise BadInput(
            f"--normalize {spec}: {mean.numel()} mean and {std.numel()} std values for "
            f"{channels} input channels of {data.name}"
        )
    shape = data.mean.shape
    fields = {k: getattr(data, k) for k in data.__dataclass_fields__}
    fields["mean"] = (mean.float() * scale).reshape(shape).to(data.mean.device)
    fields["std"] = (std.float() * scale).reshape(shape).to(data.std.device)
    record = {"normalize": spec, "mean": _rounded(mean), "std": _rounded(std)}
    return TensorData(**fields), record


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values.flatten()]


def _parse_mean_std(spec: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = spec.split("/")
    if len(parts) != 2:
        raise BadInput(
            f"--normalize {spec}: give dataset, none, model or MEAN/STD (comma lists, e.g. "
            "0.5,0.5,0.5/0.25,0.25,0.25)"
        )
    try:
        mean, std = ([float(v) for v in p.split(",")] for p in parts)
    except ValueError:
        raise BadInput(f"--normalize {spec}: MEAN and STD must be numbers") from None
    if not all(math.isfinite(v) for v in mean) or not all(0 < v < math.inf for v in std):
        raise BadInput(f"--normalize {spec}: means must be finite and stds > 0")
    if len(mean) != len(std):
        raise BadInput(f"--normalize {spec}: {len(mean)} means but {len(std)} stds")
    return torch.tensor(mean), torch.tensor(std)


def _check_labels(name: str, raw: Raw) -> None:
    """As many labels as inputs, every label a class: checked before anything trains."""
    c = len(raw.class_names)
    for split, x, y in (("training", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if len(x) != len(y):
            raise BadInput(f"{name}: {len(x)} {split} inputs but {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= c):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise BadInput(f"{name}: {split} label {bad} outside the {c} classes 0..{c - 1}")
