"""Masked linear layers.

CPU: torch CSR inference (`SparseLinear`) against the dense `F.linear` at sparsities from 50 %
to 99 %, to find where the sparse path starts to pay. GPU (when one is present): the Triton
`masked_linear` forward against `F.linear(x, w * mask)` for batch 1 to 4096.

    pytest benchmarks/test_masked_linear.py --benchmark-columns=median,min,rounds
"""

import pytest
import torch
from torch.nn import functional as F

from rdfast.kernels import SparseLinear, masked_linear

IN, OUT = 4096, 4096
SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
BATCHES_CPU = [1, 64, 512]
BATCHES_GPU = [1, 16, 128, 1024, 4096]


def layer(sparsity, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen)
    mask = torch.rand(OUT, IN, generator=gen) >= sparsity
    return (
        (w * mask).to(device, dtype),
        mask.to(device),
        torch.randn(OUT, generator=gen).to(device, dtype),
    )


@pytest.mark.parametrize("batch", BATCHES_CPU)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_cpu_inference(benchmark, kind, sparsity, batch):
    benchmark.group = f"cpu-linear-{IN}x{OUT}-batch{batch}"
    w, _, b = layer(sparsity)
    x = torch.randn(batch, IN)
    if kind == "dense":
        fn = lambda: F.linear(x, w, b)  # noqa: E731
    else:
        sparse = SparseLinear(w, b)
        fn = lambda: sparse(x)  # noqa: E731
        torch.testing.assert_close(fn(), F.linear(x, w, b), rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=5, iterations=3 if batch < 512 else 1, warmup_rounds=1)
    benchmark.extra_info["sparsity"] = sparsity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a GPU")
@pytest.mark.parametrize("batch", BATCHES_GPU)
@pytest.mark.parametrize("kind", ["triton_masked_linear", "torch_linear_w_times_mask"])
def test_gpu_masked_linear(benchmark, kind, batch):
    benchmark.group = f"gpu-masked-linear-{IN}x{OUT}-batch{batch}-bf16"
    w, mask, b = layer(0.9, "cuda", torch.bfloat16)
    x = torch.randn(batch, IN, device="cuda", dtype=torch.bfloat16)
    if kind == "triton_masked_linear":
        fn = lambda: masked_linear(x, w, mask, b)  # noqa: E731
    else:
        fn = lambda: F.linear(x, w * mask, b)  # noqa: E731

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
