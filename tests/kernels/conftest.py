import pytest
import torch

from rdfast.kernels._backend import interpreting

# The Triton path runs where it can: on a GPU, or on the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def recorded_launches():
    """Every distinct kernel launch of the session under the interpreter, filled as the tests
    run: test_compiled.py compiles them for sm_80 and sm_90 after the other kernel tests."""
    if not interpreting():
        yield []
        return
    from benchmarks.aot import record_launches

    with record_launches() as launches:
        yield launches


def pytest_collection_modifyitems(session, config, items):
    """The compile checks run after every other kernel test, so they see all the launches."""
    compiled = [i for i in items if i.nodeid.startswith("tests/kernels/test_compiled.py")]
    if not compiled:
        return
    rest = [i for i in items if i not in compiled]
    kernel_positions = [n for n, i in enumerate(rest) if i.nodeid.startswith("tests/kernels/")]
    at = kernel_positions[-1] + 1 if kernel_positions else len(rest)
    items[:] = rest[:at] + compiled + rest[at:]
