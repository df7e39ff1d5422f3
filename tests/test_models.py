"""Every registered model: output shapes, widths and its prunable layers."""

import pytest
import torch
from torch import nn

from rdfast.config import preset
from rdfast.errors import BadInput
from rdfast.models import build_model, prunable_layers

# name -> (input shape, number of prunable layers, first, last)
EXPECTED = {
    "mlp": ((1, 28, 28), 3, "fc1", "fc3"),
    "lenet5": ((1, 28, 28), 5, "conv1", "fc3"),
    # 6n + 1 convs, 2 projection shortcuts, 1 classifier
    "resnet20": ((3, 32, 32), 19 + 2 + 1, "conv1", "fc"),
    "resnet32": ((3, 32, 32), 31 + 2 + 1, "conv1", "fc"),
    "resnet44": ((3, 32, 32), 43 + 2 + 1, "conv1", "fc"),
    "resnet56": ((3, 32, 32), 55 + 2 + 1, "conv1", "fc"),
    "resnet110": ((3, 32, 32), 109 + 2 + 1, "conv1", "fc"),
    "vgg11": ((3, 32, 32), 8 + 1, "features.0", "fc"),
    "vgg16": ((3, 32, 32), 13 + 1, "features.0", "fc"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("width", [0.25, 1.0])
def test_output_shape_and_prunable_layers(name, classes, width):
    shape, n_layers, first, last = EXPECTED[name]
    model = build_model(name, shape, classes, width)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    layers = prunable_layers(model)
    assert len(layers) == n_layers
    assert list(layers)[0] == first and list(layers)[-1] == last
    # Only Linear/Conv weights: no bias, no batch norm.
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], (nn.Linear, nn.Conv2d)) for n in layers)
    assert all(w is modules[n].weight for n, w in layers.items())


def test_width_scales_channels():
    small = build_model("resnet20", (3, 32, 32), 10, 0.25)
    full = build_model("resnet20", (3, 32, 32), 10, 1.0)
    assert small.conv1.out_channels == 4 and full.conv1.out_channels == 16
    assert full.fc.in_features == 64


def test_exclude_first_conv_and_classifier():
    model = build_model("resnet20", (3, 32, 32), 10, 0.25)
    layers = prunable_layers(model, ("conv1", "fc"))
    assert "conv1" not in layers and "fc" not in layers and len(layers) == 20


def test_torchvision_and_timm_models():
    tv = build_model("torchvision:resnet18", (3, 32, 32), 100, 1.0)
    assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert list(prunable_layers(tv))[-1] == "fc"
    tm = build_model("timm:resnet18", (1, 28, 28), 10, 1.0)  # timm adapts the input channels
    assert tm(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, shape, width, message",
    [
        ("timm:no_such_net", (3, 32, 32), 1.0, "timm:no_such_net"),
        ("torchvision:no_such_net", (3, 32, 32), 1.0, "not a torchvision model"),
        ("torchvision:resnet18", (1, 28, 28), 1.0, "takes 3-channel images"),
        ("timm:resnet18", (3, 32, 32), 0.5, "--width scales rdfast's own models"),
        ("keras:resnet", (3, 32, 32), 1.0, "unknown model library"),
        ("resnet20", (64,), 1.0, "resnet20 needs images"),
    ],
)
def test_bad_models(name, shape, width, message):
    with pytest.raises(BadInput, match=message):
        build_model(name, shape, 10, width)


def test_presets_per_dataset_and_family():
    assert preset("cifar100", "resnet20") == dict(
        epochs=160, lr=0.1, batch_size=128, weight_decay=5e-4, finetune_epochs=10
    )
    assert preset("cifar10", "vgg16")["epochs"] == 160
    assert preset("svhn", "resnet56")["epochs"] == 40
    assert preset("cifar10", "mlp")["epochs"] == 60  # the dataset's own preset
    assert preset("digits", "mlp")["epochs"] == 30
