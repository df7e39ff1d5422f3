"""Backend resolution."""

import pytest
import torch

from rdfast.kernels._backend import pick


def test_auto_is_torch_on_cpu_and_triton_needs_the_interpreter(monkeypatch):
    x = torch.ones(2)
    assert pick("auto", x) == "torch"
    assert pick("torch", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pick("triton", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pick("triton", x)
    with pytest.raises(ValueError, match="backend must be one of"):
        pick("cuda", x)


def test_rdfast_kernels_torch_forces_the_references(monkeypatch):
    class FakeCuda:
        is_cuda = True

    assert pick("auto", FakeCuda()) == "triton"
    monkeypatch.setenv("RDFAST_KERNELS", "torch")
    assert pick("auto", FakeCuda()) == "torch"
