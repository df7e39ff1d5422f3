"""Which implementation runs: Triton for CUDA tensors, torch otherwise.

`backend="triton"` also runs on CPU tensors when Triton's interpreter is on
(`TRITON_INTERPRET=1` set before `rdfast.kernels` is imported): that is how the kernels are
tested on machines without a GPU. `RDFAST_KERNELS=torch` makes `auto` choose the torch
references on CUDA too (to rule the kernels out when a result looks wrong).

`RDFAST_CUDA_PATH=1` (with `TRITON_INTERPRET=1`) runs on the CPU what a CUDA run runs:
`auto` resolves to the Triton kernels for CPU tensors too, and the engine puts conv nets in
channels_last. Comparing such a run with a plain CPU run checks the CUDA code path, layouts
included, on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is a Linux-only dependency; everything has a torch path without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_path() -> bool:
    """Whether the CPU is to take the code path of a CUDA run (see the module docstring)."""
    if os.environ.get("RDFAST_CUDA_PATH", "0") in ("", "0"):
        return False
    if not HAS_TRITON or not interpreting():
        raise RuntimeError("RDFAST_CUDA_PATH=1 needs triton and TRITON_INTERPRET=1")
    return True


def pick(backend: str, *tensors: torch.Tensor) -> str:
    """Resolve `backend` for these tensors to "triton" or "torch", or raise a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        forced_torch = os.environ.get("RDFAST_KERNELS", "auto") == "torch"
        if forced_torch:
            return "torch"
        return "triton" if (on_cuda and HAS_TRITON) or cuda_path() else "torch"
    if backend == "torch":
        return "torch"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing rdfast.kernels"
        )
    return "triton"


def grid_size(n: int, block: int, device: torch.device) -> int:
    """Programs for a persistent loop: enough to fill the GPU, never more than the blocks."""
    blocks = max(1, -(-n // block))
    if device.type != "cuda":
        return min(blocks, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(blocks, 4 * sms)


def constant(value: int):
    """A named integer a kernel compares its constexpr flags with. Triton kernels may read
    only globals made `tl.constexpr`; launchers pass `code(c)`, the plain int."""
    return tl.constexpr(value) if HAS_TRITON else value


def code(c) -> int:
    """The int of a `constant`, as a launch argument."""
    return int(getattr(c, "value", c))
