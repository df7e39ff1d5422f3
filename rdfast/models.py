"""Model registry and the definition of what is prunable.

Add a model in one place: a function decorated with `@register_model` that takes
`(input_shape, num_classes, width)` and returns an `nn.Module`. Prunable parameters are the
weights of every Linear and Conv layer, named by their module path (`fc1`, `conv2`, ...);
biases and normalisation layers are never pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rdfast.errors import BadInput

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ModelEntry:
    name: str
    description: str
    build: Callable[[tuple[int, ...], int, float], nn.Module]


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str):
    def wrap(fn):
        MODELS[name] = ModelEntry(name, description, fn)
        return fn

    return wrap


def scaled(n: int, width: float) -> int:
    return max(1, round(n * width))


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, width: float
) -> nn.Module:
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    if not width > 0:
        raise BadInput(f"--width must be > 0, got {width}")
    return MODELS[name].build(tuple(input_shape), num_classes, width)


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """Module path -> weight, in module order, for every Linear/Conv layer not excluded."""
    layers = {n: m.weight for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    unknown = [e for e in exclude if e not in layers]
    if unknown:
        raise BadInput(
            f"--exclude names no prunable layer: {', '.join(unknown)}; "
            f"prunable layers: {', '.join(layers)}"
        )
    kept = {n: w for n, w in layers.items() if n not in exclude}
    if not kept:
        raise BadInput("--exclude leaves no layer to prune")
    return kept


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; the lottery-ticket MNIST network), width-scaled."""

    def __init__(self, in_features: int, num_classes: int, width: float):
        super().__init__()
        h1, h2 = scaled(300, width), scaled(100, width)
        self.fc1 = nn.Linear(in_features, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@register_model("mlp", "LeNet-300-100: two hidden layers of 300*width and 100*width units")
def _mlp(input_shape, num_classes, width):
    in_features = 1
    for s in input_shape:
        in_features *= s
    return MLP(in_features, num_classes, width)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, channels scaled by width.

    conv1 5x5 (padding 2) -> pool -> conv2 5x5 -> pool -> fc 120 -> fc 84 -> classes.
    """

    def __init__(self, input_shape, num_classes, width):
        super().__init__()
        c, h, w = input_shape
        c1, c2 = scaled(6, width), scaled(16, width)
        self.conv1 = nn.Conv2d(c, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        oh, ow = h // 2 - 4, w // 2 - 4
        self.fc1 = nn.Linear(c2 * (oh // 2) * (ow // 2), scaled(120, width))
        self.fc2 = nn.Linear(scaled(120, width), scaled(84, width))
        self.fc3 = nn.Linear(scaled(84, width), num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@register_model(
    "lenet5", "LeNet-5: two 5x5 conv layers (6, 16 channels * width) and three fc layers"
)
def _lenet5(input_shape, num_classes, width):
    if len(input_shape) != 3 or min(input_shape[1:]) < 12:
        raise BadInput(
            f"lenet5 needs images of at least 12x12 pixels; this dataset's inputs are "
            f"{'x'.join(map(str, input_shape))} (use --model mlp)"
        )
    return LeNet5(input_shape, num_classes, width)
