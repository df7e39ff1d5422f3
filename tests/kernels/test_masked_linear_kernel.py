"""Masked linear forward and backward against autograd on F.linear(x, w * mask)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rdfast.kernels import SparseLinear, masked_linear, sparsify_for_inference
from tests.kernels.conftest import DEVICE

SHAPES = [(1, 1, 1), (5, 7, 3), (70, 33, 65), (2, 130, 17), (129, 16, 64)]


def reference(x, w, mask, bias, dtype):
    """Forward and gradients of F.linear(x, w * mask, b) computed in `dtype`."""
    x, w = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    y = F.linear(x, w * mask.to(dtype), b)
    return x, w, b, y


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [True, False])
def test_forward_backward(m, k, n, dtype, has_bias):
    gen = torch.Generator().manual_seed(m * k + n)
    x0 = torch.randn(m, k, generator=gen).to(DEVICE)
    w0 = torch.randn(n, k, generator=gen).to(DEVICE)
    b0 = torch.randn(n, generator=gen).to(DEVICE) if has_bias else None
    mask = (torch.rand(n, k, generator=gen) < 0.5).to(DEVICE)
    dy = torch.randn(m, n, generator=gen).to(DEVICE)

    x, w, b, y = reference(x0, w0, mask, b0, dtype)
    out = masked_linear(x, w, mask, b, backend="triton")
    out.backward(dy.to(dtype))
    got = [out, x.grad, w.grad] + ([b.grad] if has_bias else [])

    x32, w32, b32, y32 = reference(x0, w0, mask, b0, torch.float32)
    y32.backward(dy)
    ref32 = [y32, x32.grad, w32.grad] + ([b32.grad] if has_bias else [])
    xl, wl, bl, yl = reference(x0, w0, mask, b0, dtype)
    yl.backward(dy.to(dtype))
    lowp = [yl, xl.grad, wl.grad] + ([bl.grad] if has_bias else [])

    # Exactly zero gradient for every pruned weight.
    assert torch.all(w.grad[~mask] == 0)
    for g, r32, lp in zip(got, ref32, lowp):
        assert g.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g, r32, rtol=1e-4, atol=1e-4)
        else:  # flash-attention's rule: no worse than twice torch's own low-precision error
            err = (g.float() - r32).abs().max()
            torch_err = (lp.float() - r32).abs().max()
            assert err <= 2 * torch_err + 1e-2, (err, torch_err)


def test_leading_dimensions_and_validation():
    x = torch.randn(2, 3, 8, device=DEVICE)
    w = torch.randn(5, 8, device=DEVICE)
    mask = torch.rand(5, 8, device=DEVICE) < 0.5
    out = masked_linear(x, w, mask, backend="triton")
    torch.testing.assert_close(out, F.linear(x, w * mask), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        masked_linear(torch.randn(2, 7), w, mask)
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_linear(x, w, mask.float())


def test_sparse_inference_equals_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    with torch.no_grad():
        model[0].weight[torch.rand(30, 20) < 0.95] = 0
    x = torch.randn(9, 20)
    dense = model(x)
    assert sparsify_for_inference(model, 0.9) == ["0"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-6)
