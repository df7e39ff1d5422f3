"""Confusion matrix of N x C logits: rdfast against torchmetrics and argmax + bincount.

On the CPU rdfast's path is argmax + bincount itself (the Triton kernel needs a GPU); the
figures place it against torchmetrics' MulticlassConfusionMatrix, which users would pick.
On a GPU the same suite times the Triton kernel and reports GB/s over the logits.

    pytest benchmarks/test_confusion.py --benchmark-columns=median,min,rounds
"""

import pytest
import torch

from benchmarks.conftest import bandwidth_info
from rdfast.kernels import confusion_matrix

SHAPES = {"1e6x100": (10**6, 100), "1e5x1000": (10**5, 1000)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=list(SHAPES))
def logits(request):
    n, c = SHAPES[request.param]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=gen).to(DEVICE)
    y = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    return request.param, x, y, c


def bincount(x, y, c):
    return torch.bincount(y * c + x.argmax(1), minlength=c * c).view(c, c)


def rdfast_auto(x, y, c):
    return confusion_matrix(x, y, c)


def torchmetrics_cm(x, y, c):
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(x, y, num_classes=c)


CASES = {"rdfast": rdfast_auto, "argmax_bincount": bincount, "torchmetrics": torchmetrics_cm}


@pytest.mark.parametrize("case", list(CASES))
def test_confusion(benchmark, logits, case):
    name, x, y, c = logits
    benchmark.group = f"confusion-{name}"
    fn = CASES[case]
    expected = bincount(x, y, c)
    assert torch.equal(fn(x, y, c).long(), expected)

    def run():
        out = fn(x, y, c)
        sync()
        return out

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    # Bytes read: the logits and the int64 targets; the C x C counts are noise beside them.
    bandwidth_info(benchmark, x.numel() * x.element_size() + y.numel() * y.element_size())
