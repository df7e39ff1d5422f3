import pytest
import torch

from rdfast.kernels._backend import interpreting

# The Triton path runs where it can: on a GPU, or on the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
