import os
import sys

# Triton kernels run on CPU tensors through the interpreter; it must be on before
# rdfast.kernels is imported. A GPU run sets TRITON_INTERPRET=0 to compile them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    # The real MNIST / Fashion-MNIST idx files, read-only, beside the repository.
    assert (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists(), SHARED_DATA
    return SHARED_DATA


# A run small enough for a unit test: one seed, two ratios, a few epochs.
TINY = [
    "--seeds",
    "0",
    "--ratios",
    "2,4",
    "--epochs",
    "3",
    "--finetune-epochs",
    "1",
    "--no-progress",
]


def process_args(out, **kw):
    """`rdfast run` as a separate Python process, with `run_args`'s arguments."""
    return [sys.executable, "-m", "rdfast.cli.main", *run_args(out, **kw)]


def run_args(out, *, seeds="0", ratios="2,4", epochs="3", finetune="1", extra=()):
    """`rdfast run` arguments for a small run into `out`."""
    return [
        "run",
        "--seeds",
        seeds,
        "--ratios",
        ratios,
        "--epochs",
        epochs,
        "--finetune-epochs",
        finetune,
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
