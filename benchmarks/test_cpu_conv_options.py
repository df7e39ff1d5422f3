"""What the CPU gives ResNet-20 on real CIFAR-10: the plain eager loop against each speed
option alone, and rdfast's loop, side by side in one run; then evaluation of the 10,000 test
images.

Training: one epoch over 2,560 real training images (20 batches of 128), SGD with momentum
and weight decay, the data held as tensors. Options, each alone on top of the plain loop:
- `channels_last`: model and batches in channels_last (oneDNN's NHWC convolutions);
- `compile`: the model through `torch.compile` (inductor's C++ backend), compiled in warm-up;
- `fused_sgd`: `torch.optim.SGD(fused=True)` instead of the default foreach step;
- `bf16_autocast`: bf16 autocast, only where the CPU has native bf16 (AVX512_BF16 or AMX):
  emulated bf16 is many times slower (15x measured on AVX2);
- `rdfast_train`: `rdfast.training.train` as a CIFAR run calls it (crop + flip on the device).
Evaluation: `rdfast.training.evaluate` (inference mode) at the batch rdfast uses on the CPU
(256) and others, contiguous and channels_last.
The roof: every case records the floating-point work it did per second (ResNet-20's FLOPs a
training or test image, counted by `torch.utils.flop_counter`), and `test_fp32_peak` the
machine's fp32 rate on a large matrix product in the same run: no loop can be more than
peak / achieved times faster in fp32, whatever options it takes.

    RDFAST_DATA=../shared/data pytest benchmarks/test_cpu_conv_options.py \
        --benchmark-columns=median,min,rounds
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from benchmarks.conftest import SHARED_DATA
from rdfast.config import train_settings
from rdfast.data import load_dataset
from rdfast.models import build_model
from rdfast.training import evaluate, train

N, BATCH = 2560, 128
DATA_ROOT = Path(os.environ.get("RDFAST_DATA", SHARED_DATA))


def native_bf16() -> bool:
    """AVX512_BF16 or AMX on this CPU (Linux): bf16 autocast then runs on hardware."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.fixture(scope="module")
def cifar():
    if not (DATA_ROOT / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found under {DATA_ROOT} (set RDFAST_DATA)")
    return load_dataset(f"cifar10:train={N}", DATA_ROOT)


def model(channels_last=False):
    torch.manual_seed(0)
    m = build_model("resnet20", (3, 32, 32), 10, 1.0)
    return m.to(memory_format=torch.channels_last) if channels_last else m


@functools.cache
def flops_per_image(train_step: bool) -> float:
    """ResNet-20's floating-point operations for one image: forward alone, or forward and
    backward (about 3x: the backward computes the gradients of inputs and weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    net, x = model(), torch.randn(8, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        if train_step:
            out.sum().backward()
    return counter.get_total_flops() / x.shape[0]


def record(benchmark, images: int, train_step: bool):
    if benchmark.stats is None:  # --benchmark-disable: the case ran once, untimed
        return
    rate = images / benchmark.stats.stats.median
    benchmark.extra_info["images_per_second"] = round(rate, 1)
    benchmark.extra_info["gflop_per_second"] = round(rate * flops_per_image(train_step) / 1e9, 1)
    benchmark.extra_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()


def plain_epoch(cifar, channels_last=False, compiled=False, fused=False, bf16=False):
    """The plain eager loop with one option: pre-normalized floats, no augmentation."""
    x = cifar.prepare(cifar.x_train)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = cifar.y_train
    net = model(channels_last)
    forward = torch.compile(net) if compiled else net
    kw = {"fused": True} if fused else {}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **kw)

    def epoch():
        net.train()
        perm = torch.randperm(N)
        for i in range(0, N, BATCH):
            idx = perm[i : i + BATCH]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


OPTIONS = {
    "plain": {},
    "channels_last": {"channels_last": True},
    "compile": {"compiled": True},
    "fused_sgd": {"fused": True},
    "bf16_autocast": {"bf16": True},
}


@pytest.mark.benchmark(group="resnet20-cifar10-cpu-train")
@pytest.mark.parametrize("option", list(OPTIONS))
def test_train_option(benchmark, cifar, option):
    if option == "bf16_autocast" and not native_bf16():
        pytest.skip("no native bf16 on this CPU (AVX512_BF16/AMX): emulated bf16 is slower")
    epoch = plain_epoch(cifar, **OPTIONS[option])
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    record(benchmark, N, train_step=True)


@pytest.mark.benchmark(group="resnet20-cifar10-cpu-train")
def test_rdfast_train(benchmark, cifar):
    net = model()
    settings = train_settings("cifar10", "resnet20", epochs=1, batch_size=BATCH, precision="fp32")

    def epoch():
        train(net, cifar, settings, seed_parts=(0,))

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    record(benchmark, N, train_step=True)


@pytest.mark.benchmark(group="resnet20-cifar10-cpu-eval")
@pytest.mark.parametrize("batch, channels_last", [(256, False), (1024, False), (256, True)])
def test_evaluate_test_set(benchmark, cifar, batch, channels_last):
    """The 10,000 test images, as every step of a run evaluates them."""
    net = model(channels_last)
    data = cifar
    if channels_last:
        import dataclasses

        data = dataclasses.replace(cifar, channels_last=True)

    def run():
        evaluate(net, data, batch, "fp32")

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    record(benchmark, int(cifar.y_test.shape[0]), train_step=False)


@pytest.mark.benchmark(group="resnet20-cifar10-cpu-peak")
def test_fp32_peak(benchmark):
    """The machine's fp32 rate on a 2,048 x 2,048 matrix product (oneDNN/MKL at its best:
    large, square, cache-blocked), the roof over every loop above."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=10, warmup_rounds=2)
    if benchmark.stats is not None:
        flop = 2 * 2048**3
        benchmark.extra_info["gflop_per_second"] = round(flop / benchmark.stats.stats.min / 1e9, 1)
