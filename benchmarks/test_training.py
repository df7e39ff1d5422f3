"""One MNIST epoch of LeNet-300-100, batch 128: rdfast's loop against the loops users write.

Peers, side by side in one run:
- `plain_loop`: a plain PyTorch loop over device-resident tensors (the floor to match);
- `per_sample_dataloader`: torchvision's MNIST with per-sample ToTensor + Normalize through a
  DataLoader -- the data path of OpenLTH's training loop.

Run: pytest benchmarks/test_training.py --benchmark-columns=median,min,rounds
"""

import pytest
import torch
from torch.nn import functional as F

from benchmarks.conftest import SHARED_DATA
from rdfast.config import train_settings
from rdfast.data import load_dataset
from rdfast.models import build_model
from rdfast.training import train

BATCH = 128


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", SHARED_DATA)


def fresh_model():
    torch.manual_seed(0)
    return build_model("mlp", (1, 28, 28), 10, 1.0)


@pytest.mark.benchmark(group="mnist-epoch")
def test_rdfast_epoch(benchmark, mnist):
    settings = train_settings("mnist", epochs=1, batch_size=BATCH)
    model = fresh_model()
    benchmark.pedantic(
        lambda: train(model, mnist, settings, seed_parts=(0,)), rounds=5, warmup_rounds=1
    )


@pytest.mark.benchmark(group="mnist-epoch")
def test_plain_loop(benchmark, mnist):
    model = fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = mnist.prepare(mnist.x_train), mnist.y_train  # normalized once, up front

    def epoch():
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="mnist-epoch")
def test_per_sample_dataloader(benchmark):
    from torchvision import datasets, transforms

    ds = datasets.MNIST(
        str(SHARED_DATA),
        train=True,
        download=False,
        transform=transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        ),
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True)
    model = fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def epoch():
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    benchmark.pedantic(epoch, rounds=2, warmup_rounds=0)
