"""ResNet-20 training throughput on CIFAR-shaped data, batch 128: rdfast against a plain loop.

2,560 random 3 x 32 x 32 uint8 images (20 batches) held on the device. Peers, side by side:
- `plain_loop`: the same model and batch size, pre-normalized float tensors, no augmentation;
- `rdfast_train` with `augment=none` (same work as the plain loop) and `crop-flip` (what a
  CIFAR run does: per-batch normalization and augmentation on the device).
On CUDA, `rdfast_train_gpu_fast` adds bf16 autocast, channels_last and torch.compile.

    pytest benchmarks/test_resnet_throughput.py --benchmark-columns=median,min,rounds
"""

import pytest
import torch
from torch.nn import functional as F

from rdfast.config import train_settings
from rdfast.data import TensorData, channel_stats
from rdfast.models import build_model
from rdfast.training import train

N, BATCH = 2560, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (N,), generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


def data(images, augment, channels_last=False):
    x, y = images
    mean, std = channel_stats(x.cpu())
    return TensorData(
        "cifar-shaped",
        x,
        y,
        x[:256],
        y[:256],
        [str(i) for i in range(10)],
        mean.to(DEVICE),
        std.to(DEVICE),
        augment,
        channels_last,
    )


def model(channels_last=False):
    torch.manual_seed(0)
    m = build_model("resnet20", (3, 32, 32), 10, 1.0).to(DEVICE)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def record(benchmark):
    if benchmark.stats is None:  # --benchmark-disable: the case ran once, untimed
        return
    benchmark.extra_info["images_per_second"] = round(N / benchmark.stats.stats.median, 1)


@pytest.mark.benchmark(group="resnet20-train-epoch")
def test_plain_loop(benchmark, images):
    x, y = images
    d = data(images, "none")
    xf = d.prepare(x)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def epoch():
        net.train()
        perm = torch.randperm(N, device=DEVICE)
        for i in range(0, N, BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(net(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    record(benchmark)


@pytest.mark.benchmark(group="resnet20-train-epoch")
@pytest.mark.parametrize("augment", ["none", "crop-flip"])
def test_rdfast_train(benchmark, images, augment):
    d = data(images, augment)
    net = model()
    settings = train_settings("cifar10", "resnet20", epochs=1, batch_size=BATCH, precision="fp32")

    def epoch():
        train(net, d, settings, seed_parts=(0,))
        sync()

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    record(benchmark)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 + channels_last + compile pay on a GPU")
@pytest.mark.benchmark(group="resnet20-train-epoch")
def test_rdfast_train_gpu_fast(benchmark, images):
    d = data(images, "crop-flip", channels_last=True)
    net = model(channels_last=True)
    settings = train_settings("cifar10", "resnet20", epochs=1, batch_size=BATCH, precision="bf16")
    compiled = torch.compile(net)

    def epoch():
        train(net, d, settings, seed_parts=(0,), forward=compiled)
        sync()

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=2)
    record(benchmark)
