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


def model_family(name: str) -> str:
    """Preset family: resnet, vgg, mlp, lenet5, timm or torchvision."""
    if ":" in name:
        return name.split(":", 1)[0]
    return name.rstrip("0123456789") if name.startswith(("resnet", "vgg")) else name


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, width: float
) -> nn.Module:
    check_model_name(name, width)
    library, _, arch = name.partition(":")
    if arch:
        return EXTERNAL[library](arch, tuple(input_shape), num_classes)
    return MODELS[name].build(tuple(input_shape), num_classes, width)


def check_model_name(name: str, width: float) -> None:
    """BadInput unless `name` is a registered model or a timm:/torchvision: name (whose
    architecture the library checks when it builds it) and `width` can scale it."""
    if not 0 < width < 1e4:  # inf and NaN too; 1e4 x 300 units is past any machine
        raise BadInput(f"--width must be > 0 and below 10000, got {width}")
    library, _, arch = name.partition(":")
    if arch:
        if library not in EXTERNAL:
            raise BadInput(f"unknown model library {library!r}; use timm:NAME or torchvision:NAME")
        if width != 1:
            raise BadInput(f"--width scales rdfast's own models; {name} has its own sizes")
    elif name not in MODELS:
        raise BadInput(
            f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}, timm:NAME or "
            "torchvision:NAME"
        )


def check_takes(model: nn.Module, data, name: str) -> None:
    """BadInput, with the reason, when `model` cannot take `data`'s inputs or answers with
    another number of classes: found before anything runs, not mid-run. `data` is a
    TensorData (two training examples go through the model)."""
    try:
        with torch.no_grad():
            logits = model.eval()(data.prepare(data.x_train[:2]))
    except RuntimeError as e:
        raise BadInput(
            f"model {name} cannot take inputs of shape {data.input_shape}: "
            f"{' '.join(str(e).split())[:160]}"
        ) from None
    if logits.ndim != 2 or logits.shape[1] != data.num_classes:
        raise BadInput(
            f"model {name} outputs {tuple(logits.shape[1:])} per example; the dataset "
            f"{data.name} has {data.num_classes} classes"
        )


def is_convolutional(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


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


# --------------------------------------------------------------------------- CIFAR ResNets


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm; a 1x1 conv + BN shortcut where the shape changes (the
    projection shortcut of OpenLTH's CIFAR ResNets, which the authors' pruning code uses)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016, section 4.2: depth 6n + 2, three stages of 16/32/64 channels * width."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, width: float):
        super().__init__()
        n = (depth - 2) // 6
        widths = [scaled(16, width), scaled(32, width), scaled(64, width)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _image_channels(name, input_shape):
    if len(input_shape) != 3:
        raise BadInput(f"{name} needs images; this dataset's inputs have shape {input_shape}")
    return input_shape[0]


for _depth in (20, 32, 44, 56, 110):

    def _resnet(input_shape, num_classes, width, depth=_depth):
        return CifarResNet(
            depth, _image_channels(f"resnet{depth}", input_shape), num_classes, width
        )

    register_model(f"resnet{_depth}", f"CIFAR ResNet-{_depth} (16/32/64 channels * width)")(_resnet)


# --------------------------------------------------------------------------- CIFAR VGG

VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 inputs (as in OpenLTH's cifar_vgg): the conv stack, global
    average pooling, one linear classifier."""

    def __init__(self, config, in_channels, num_classes, width):
        super().__init__()
        layers, c_in = [], in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = scaled(item, width)
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


for _name, _config in VGG_CONFIGS.items():

    def _vgg(input_shape, num_classes, width, name=_name, config=_config):
        return CifarVGG(config, _image_channels(name, input_shape), num_classes, width)

    register_model(_name, f"{_name.upper()} with batch norm, CIFAR variant, channels * width")(_vgg)


# --------------------------------------------------------------------------- other libraries


def _timm(arch, input_shape, num_classes):
    try:
        import timm
    except ImportError:
        raise BadInput("timm:NAME needs the timm package: pip install timm") from None
    try:
        return timm.create_model(
            arch,
            pretrained=False,
            num_classes=num_classes,
            in_chans=_image_channels(f"timm:{arch}", input_shape),
        )
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise BadInput(f"timm:{arch}: {' '.join(str(e).split())[:200]}") from None


def _torchvision(arch, input_shape, num_classes):
    import torchvision

    if arch not in torchvision.models.list_models():
        raise BadInput(f"torchvision:{arch} is not a torchvision model")
    channels = _image_channels(f"torchvision:{arch}", input_shape)
    if channels != 3:
        raise BadInput(f"torchvision:{arch} takes 3-channel images; this dataset has {channels}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


EXTERNAL = {"timm": _timm, "torchvision": _torchvision}
