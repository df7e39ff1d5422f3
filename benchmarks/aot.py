"""Compile the Triton kernels for a CUDA GPU on a machine that has none (a development
tool beside the benchmarks and tests that use it; not installed with the package).

The interpreter (`TRITON_INTERPRET=1`) checks what the kernels compute, not that they compile:
it runs programs the compiler rejects and says nothing of registers, spills, vector widths or
whether a `tl.dot` reaches the tensor cores. So the kernels are checked in two steps:

1. `record_launches()` notes every launch the launchers make under the interpreter: the
   kernel, its argument types and alignment, its constexprs and launch options.
2. `compile_launch()`, in a process without the interpreter, specializes each launch exactly as
   Triton's runtime would on a CUDA device (16-byte alignment and divisibility by 16 of the
   integer arguments included) and compiles it for a chosen architecture down to a cubin with
   the `ptxas` that Triton ships. `ptxas -v` then gives the registers, spills and shared memory
   that GPU would run with; the PTX shows the loads, atomics and matrix instructions.

`python -m benchmarks.aot LAUNCHES.json --arch 90`, from the repository root, prints one JSON
line per launch.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _describe(value, constexpr: bool):
    """A JSON-able stand-in of one launch argument, reduced to what specialization looks at:
    a tensor's dtype and 16-byte alignment; for a runtime integer, its width and whether it
    is 1 or a multiple of 16 (its value is then irrelevant: the launches dedupe on this)."""
    if isinstance(value, torch.Tensor):
        return {
            "tensor": str(value.dtype).removeprefix("torch."),
            "aligned": value.data_ptr() % 16 == 0,
        }
    if constexpr or value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if value == 1:
            return 1
        base = 32 if -(2**31) <= value < 2**31 else (2**40 if -(2**63) <= value < 2**63 else 2**64)
        return base if value % 16 == 0 else base + 1
    if isinstance(value, float):
        return 0.5  # fp32 arguments are never specialized
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def record_launches():
    """Collect the distinct launches made inside the block (the interpreter must be on).

    Yields a list that fills with {"module", "name", "args", "kwargs"} dicts; the kernels still
    run, so the launchers behave as usual.
    """
    from triton.runtime.interpreter import InterpretedFunction

    launches, seen = [], set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        launch = {
            "module": self.fn.__module__,
            "name": self.fn.__name__,
            "args": [_describe(a, n in constexprs) for a, n in zip(args, params)],
            # Launch options (num_warps, num_stages) are kept as given, like constexprs.
            "kwargs": {
                k: _describe(v, k in constexprs or k not in params) for k, v in kwargs.items()
            },
        }
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def representative_launches() -> list[dict]:
    """Record every kernel in the configurations a CUDA run uses (the interpreter must be on).

    The tensors are small, but keep what specialization looks at: dtypes, 16-byte alignment,
    element counts that are or are not multiples of 16, the class counts 10/100/1000.
    """
    from unittest import mock

    import rdfast.kernels as K

    masked_linear_module = importlib.import_module("rdfast.kernels.masked_linear")

    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    # The launcher widens bf16 tiles under the interpreter only; record the compiled path.
    with (
        record_launches() as launches,
        mock.patch.object(masked_linear_module, "interpreting", lambda: False),
    ):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w, g = randn(4096, dtype=dtype), randn(4096, dtype=dtype)
            for strategy in ("mp", "gp", "up"):
                for form in K.SALIENCY_FORMS:
                    K.saliency(w, g, strategy=strategy, form=form, eps=5e-4, backend="triton")
            if dtype != torch.float16:  # fp16 selection compiles like bf16
                # Selection straight from weights and gradients, every tie-handling variant:
                # integer-valued weights put many equal scores at the threshold.
                ws = [(randn(4096) * 4).round().to(dtype), (randn(2048) * 4).round().to(dtype)]
                gs = [torch.ones_like(x) for x in ws]
                masks = [torch.ones_like(x, dtype=torch.bool) for x in ws]
                for strategy in ("mp", "gp", "up"):
                    K.prune_lowest_fused(
                        ws, gs, masks, 3000, strategy=strategy, eps=5e-4, backend="triton"
                    )
            for c in (10, 100, 1000):
                logits = randn(64, c, dtype=dtype)
                K.confusion_matrix(
                    logits, torch.randint(0, c, (64,), generator=gen), c, backend="triton"
                )
            x = randn(64, 128, dtype=dtype).requires_grad_()  # dx, dw and y: all three GEMMs
            weight = randn(64, 128, dtype=dtype).requires_grad_()
            keep = torch.rand(64, 128, generator=gen) > 0.5
            K.masked_linear(
                x, weight, keep, randn(64, dtype=dtype), backend="triton"
            ).sum().backward()
        _fp32_gemms_and_layouts(K, randn, gen, x, weight, keep)
    return launches


def _fp32_gemms_and_layouts(K, randn, gen, x, weight, keep) -> None:
    """The launches beside the per-dtype ones: fp32 GEMMs with TF32 and exact, strided
    selection inputs, ragged lengths, given scores and predicted labels."""
    # fp32 GEMMs with TF32 allowed and without (exact), then the ragged and given-score
    # paths.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = allow
            K.masked_linear(
                x.detach().float().requires_grad_(),
                weight.detach().float().requires_grad_(),
                keep,
                backend="triton",
            ).sum().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    # Strided layouts: channels_last conv weights with their masks (memory order), a
    # transposed score tensor with a contiguous mask (logical indices), tie ranks.
    conv = (randn(64, 16, 3, 3) * 4).round().contiguous(memory_format=torch.channels_last)
    keep_conv = torch.ones_like(conv, dtype=torch.bool)
    K.prune_lowest_fused(
        [conv], [conv], [keep_conv], 5000, strategy="up", eps=5e-4, backend="triton"
    )
    flipped = (randn(128, 64) * 4).round().t()
    K.prune_lowest([flipped], [torch.ones(64, 128, dtype=torch.bool)], 3000, backend="triton")
    K.saliency(randn(4099), strategy="mp", backend="triton")
    scores = [randn(4096).abs(), randn(4099).abs()]
    K.kth_smallest(scores, 1000, backend="triton")
    K.prune_lowest(
        scores, [torch.ones_like(s, dtype=torch.bool) for s in scores], 1000, backend="triton"
    )
    K.confusion_matrix(
        torch.randint(0, 10, (64,), generator=gen),
        torch.randint(0, 10, (64,), generator=gen),
        10,
        backend="triton",
    )


class _Pointer:
    """A tensor as specialization sees it: a dtype and an address that is or is not aligned."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype = dtype
        self._address = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._address


def _value(desc):
    if isinstance(desc, dict):
        return _Pointer(getattr(torch, desc["tensor"]), desc["aligned"])
    return desc


def _ptxas_usage(ptx: str, arch: int, ptx_arch: str) -> dict:
    """Registers, spill bytes and static shared memory that ptxas reports for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [
                ptxas.path,
                f"-arch={ptx_arch}",
                "-v",
                str(src),
                "-o",
                str(Path(tmp) / "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    info = done.stdout + done.stderr

    def number(pattern):
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
        "shared_static": number(r"(\d+) bytes smem"),
    }


def _ptx_features(ptx: str) -> dict:
    """Counts of the PTX instructions that decide a kernel's speed."""
    return {
        "ld_global_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
        "ld_global": len(re.findall(r"ld\.global\.", ptx)),
        "st_global_v4": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.", ptx)),
        "atom_global": len(re.findall(r"\b(?:atom|red)\.(?:\w+\.)*global\.", ptx)),
        # e.g. atom.relaxed.sys.shared.add.u32: memory-order and scope qualifiers come first.
        "atom_shared": len(re.findall(r"\b(?:atom|red)\.(?:\w+\.)*shared\.", ptx)),
        # fp32 fused multiply-adds (contracted a*b + c): rounding differs from torch's.
        "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "mma": len(re.findall(r"\bmma\.sync\.", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
    }


def compile_launch(launch: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for sm_<arch>; its resource use and PTX features.

    Must run without the interpreter (the kernels are then `JITFunction`s).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    if not isinstance(fn, JITFunction):
        raise RuntimeError("compile_launch needs the compiler: unset TRITON_INTERPRET")
    args = [_value(a) for a in launch["args"]]
    kwargs = {k: _value(v) for k, v in launch["kwargs"].items()}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The same binding and packing the runtime does before it compiles for a device.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    kernel = compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    ptx = kernel.asm["ptx"]
    ptx_arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    constants = {
        name: launch["kwargs"][name]
        for name in fn.arg_names
        if name in launch["kwargs"] and fn.params[fn.arg_names.index(name)].is_constexpr
    }
    return {
        "kernel": launch["name"],
        "arch": ptx_arch,
        "args": launch["args"],
        "dtypes": sorted({a["tensor"] for a in launch["args"] if isinstance(a, dict)}),
        "constexprs": constants,
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "shared": kernel.metadata.shared,
        **_ptxas_usage(ptx, arch, ptx_arch),
        **_ptx_features(ptx),
    }


def compile_in_subprocess(launches: list[dict], arches=(80, 90)) -> list[dict]:
    """`compile_launch` for every recorded launch and architecture, run by this module in a
    fresh process without the interpreter (the recording process has it on, so its kernels
    cannot be compiled); one result per (launch, architecture)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        path.write_text(json.dumps(launches))
        cmd = [sys.executable, "-m", "benchmarks.aot", str(path)]
        for arch in arches:
            cmd += ["--arch", str(arch)]
        done = subprocess.run(
            cmd,
            env=dict(os.environ, TRITON_INTERPRET="0"),
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],  # where `benchmarks` imports from
        )
    if done.returncode:
        raise RuntimeError(f"compiling the kernels failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines()]


def _compile_one(job):
    launch, arch = job
    return compile_launch(launch, arch)


def main(argv=None) -> None:
    import argparse
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches", type=Path, help="JSON list written from record_launches()")
    parser.add_argument("--arch", type=int, action="append", help="e.g. 80, 90 (repeatable)")
    ns = parser.parse_args(argv)
    jobs = [
        (launch, arch) for launch in json.loads(ns.launches.read_text()) for arch in ns.arch or [90]
    ]
    # Compiling is CPU-bound Python plus a ptxas process: one worker per core.
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(_compile_one, jobs, chunksize=4):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
