"""The kernels compile for real GPUs, as Triton's runtime would specialize them there.

Every launch the launchers make for a CUDA run (recorded under the interpreter) is compiled for
sm_80 (A100) and sm_90 (H100) down to machine code with the ptxas that Triton ships; no GPU is
needed. The checks are on what decides speed and what the interpreter cannot see: the build
itself, register spills, 128-bit loads in the streaming kernels, tensor-core instructions in
the GEMM, and the registers of the confusion kernel's tiles.
"""

from __future__ import annotations

import importlib

import pandas as pd
import pytest

from rdfast.kernels import HAS_TRITON
from rdfast.kernels._backend import interpreting

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_TRITON, reason="the kernels need triton (Linux)"),
    # Launches are recorded through the interpreter; with TRITON_INTERPRET=0 on a GPU the
    # other kernel tests compile and run the kernels for real instead.
    pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1"),
]

STREAMING = ("_saliency_kernel", "_histogram_kernel", "_equal_count_kernel", "_mask_kernel")


@pytest.fixture(scope="module")
def compiled():
    from benchmarks.aot import compile_in_subprocess, representative_launches

    launches = representative_launches()
    table = pd.DataFrame(compile_in_subprocess(launches, arches=(80, 90)))
    table.attrs["launches"] = launches
    return table


@pytest.fixture(scope="module")
def compiled_from_tests(recorded_launches, compiled):
    """The launches the other kernel tests made (recorded as they ran), beyond the
    representative ones, compiled the same way."""
    import json

    from benchmarks.aot import compile_in_subprocess

    seen = {json.dumps(launch, sort_keys=True) for launch in compiled.attrs["launches"]}
    extra = [x for x in recorded_launches if json.dumps(x, sort_keys=True) not in seen]
    table = pd.DataFrame(compile_in_subprocess(extra, arches=(80, 90)) if extra else [])
    table.attrs["launches"] = extra
    return table


def test_every_launch_of_the_kernel_tests_compiles_without_spills_or_fma(compiled_from_tests):
    """Not only the representative launches: every configuration the kernel tests ran under
    the interpreter (sizes, layouts, dtypes) builds for both architectures, without register
    spills and, in the score kernels, without fused multiply-adds."""
    launches = compiled_from_tests.attrs["launches"]
    if not launches:
        pytest.skip("run with the other kernel tests: none recorded")
    assert len(compiled_from_tests) == 2 * len(launches)
    assert (compiled_from_tests["spill_stores"] <= 8).all(), compiled_from_tests.loc[
        compiled_from_tests["spill_stores"].idxmax(), ["kernel", "arch", "constexprs"]
    ]
    scoring = compiled_from_tests[compiled_from_tests["kernel"].isin(STREAMING)]
    assert (scoring["fma_f32"] == 0).all()


def test_every_launch_compiles_for_both_architectures(compiled):
    launches = compiled.attrs["launches"]
    kernels = {launch["name"] for launch in launches}
    assert kernels == {*STREAMING, "_confusion_kernel", "_masked_matmul_kernel"}
    assert len(compiled) == 2 * len(launches)
    assert set(compiled["arch"]) == {"sm_80", "sm_90a"}
    # Every tie-handling variant of the mask pass and every score source is among them.
    masks = [launch["kwargs"] for launch in launches if launch["name"] == "_mask_kernel"]
    assert {m["TIES"] for m in masks} == {0, 1, 2}
    assert {m["SOURCE"] for m in masks} == {0, 1, 2, 3}


def test_no_register_spills(compiled):
    sm90 = compiled[compiled["arch"] == "sm_90a"]
    assert (sm90[["spill_stores", "spill_loads", "stack_frame"]] == 0).all().all()
    # On sm_80 ptxas parks one 4-byte value of the bf16 magnitude histogram in local memory
    # (72 registers, far from the limit); anything larger is a regression.
    assert compiled["spill_stores"].max() <= 8, compiled.loc[compiled["spill_stores"].idxmax()]


def _arg_names(kernel: str) -> list[str]:
    for module in ("saliency", "selection.triton_path"):
        fn = getattr(importlib.import_module(f"rdfast.kernels.{module}"), kernel, None)
        if fn is not None:
            return fn.arg_names
    raise KeyError(kernel)


def test_score_kernels_do_not_contract_into_fma(compiled):
    """torch rounds -w*g and eps*w*w separately; an FMA would move the last bit (and with it
    the threshold on ties), so the score-computing kernels are built without contraction."""
    scoring = compiled[compiled["kernel"].isin(STREAMING)]
    fused = scoring[scoring["constexprs"].map(lambda c: c.get("SOURCE", c.get("STRATEGY")) == 3)]
    assert len(fused)
    assert (scoring["fma_f32"] == 0).all(), scoring.loc[scoring["fma_f32"] > 0, "kernel"]


def test_logical_layouts_compile_without_spills(compiled):
    logical = compiled[compiled["constexprs"].map(lambda c: bool(c.get("LOGICAL")))]
    assert set(logical["kernel"]) >= {"_histogram_kernel", "_mask_kernel"}
    assert (logical[["spill_stores", "spill_loads"]] <= 8).all().all()


def test_streaming_kernels_load_128_bits_at_a_time(compiled):
    streaming = compiled[compiled["kernel"].isin(STREAMING)]
    streaming = streaming[~streaming["constexprs"].map(lambda c: bool(c.get("LOGICAL")))]
    names = {k: _arg_names(k) for k in STREAMING}

    def aligned(row) -> bool:
        """Inputs 16-byte aligned and a length that is a multiple of 16 elements."""
        args = dict(zip(names[row["kernel"]], row["args"]))
        inputs = [args[k] for k in ("s_ptr", "w_ptr", "g_ptr", "m_ptr") if k in args]
        return all(a["aligned"] for a in inputs) and args["n"] % 16 == 0

    is_aligned = streaming.apply(aligned, axis=1)
    assert is_aligned.mean() > 0.8 and not is_aligned.all()
    ok = streaming[is_aligned]
    assert (ok["ld_global_v4"] > 0).all(), ok[ok["ld_global_v4"] == 0]
    # A ragged length falls back to 32-bit loads (the mask may change at any element).
    ragged = streaming[~is_aligned]
    assert (ragged["ld_global_v4"] == 0).all()


def test_selection_histograms_count_in_shared_memory(compiled):
    # tl.histogram privatizes the 2^11 bins per program in shared memory; global memory sees
    # one atomic flush per program, not one atomic per weight.
    hist = compiled[compiled["kernel"] == "_histogram_kernel"]
    assert (hist["atom_shared"] > 0).all()
    assert (hist["shared"] >= 4 * 2**10).all()


def test_low_precision_and_tf32_gemms_run_on_tensor_cores(compiled):
    gemm = compiled[compiled["kernel"] == "_masked_matmul_kernel"]
    precision = gemm["constexprs"].map(lambda c: c["PRECISION"])
    fast = gemm[precision == "tf32"]
    assert {d for ds in fast["dtypes"] for d in ds} >= {"bfloat16", "float16", "float32"}
    assert (fast.loc[fast["arch"] == "sm_90a", "wgmma"] > 0).all()
    assert (fast.loc[fast["arch"] == "sm_80", "mma"] > 0).all()
    # Exact fp32 ("ieee") is FMA code by definition: no tensor-core instruction at all.
    exact = gemm[precision == "ieee"]
    assert len(exact) and (exact[["mma", "wgmma"]] == 0).all().all()


def test_confusion_tiles_keep_registers_for_occupancy(compiled):
    confusion = compiled[compiled["kernel"] == "_confusion_kernel"]
    classes = {c["BLOCK_C"] for c in confusion["constexprs"]}
    assert classes == {16, 128, 256}
    # <= 128 registers leaves room for 4 programs of 4 warps per SM (65536 registers).
    assert confusion["registers"].max() <= 128
