"""The fused saliency kernel against its torch reference."""

import pytest
import torch

from rdfast.kernels import saliency
from rdfast.kernels.saliency import saliency_ref
from tests.kernels.conftest import DEVICE

FORMS = [("mp", "taylor"), ("gp", "taylor"), ("up", "taylor"), ("gp", "sum"), ("up", "sum")]


@pytest.mark.parametrize("strategy,form", FORMS)
@pytest.mark.parametrize("shape", [(0,), (1,), (6,), (42, 3), (123,), (431, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(strategy, form, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    out = saliency(w, g, strategy=strategy, form=form, eps=5e-4, backend="triton")
    ref = saliency_ref(w, g, strategy, form, 5e-4)
    assert out.dtype == torch.float32 and out.shape == w.shape
    # fp32 arithmetic on the same inputs; a fused multiply-add may differ in the last bit.
    torch.testing.assert_close(out, ref, rtol=2e-7, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf = NaN, on purpose
def test_special_values():
    w = torch.tensor([-0.0, 0.0, float("inf"), -2.0, 1.0])
    g = torch.tensor([1.0, -1.0, 1.0, float("inf"), 0.0])
    for strategy, form in FORMS:
        a = saliency(w, g, strategy=strategy, form=form, eps=0.1, backend="triton")
        b = saliency_ref(w, g, strategy, form, 0.1)
        torch.testing.assert_close(a, b, equal_nan=True)


def test_validation():
    w = torch.ones(3)
    with pytest.raises(ValueError, match="needs the gradient"):
        saliency(w, strategy="gp")
    with pytest.raises(ValueError, match="form"):
        saliency(w, w, strategy="gp", form="bogus")
    with pytest.raises(ValueError, match="shape"):
        saliency(w, torch.ones(4), strategy="up")
    with pytest.raises(ValueError, match="mp, gp or up"):
        saliency(w, strategy="rp")
    with pytest.raises(ValueError, match="floating-point"):
        saliency(torch.ones(3, dtype=torch.int64), strategy="mp")
    assert saliency(w.half(), w.half(), strategy="up", eps=0.5).dtype == torch.float32
