"""Resource use of every Triton kernel as compiled for sm_80 and sm_90, without a GPU.

    python -m benchmarks.compiled_kernels

records the launches a CUDA run makes (under the interpreter), compiles each for both
architectures with Triton's ptxas, appends one row per (launch, architecture) to
results/compiled_kernels.csv and prints the summary table of benchmarks/README.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # recording runs the kernels on CPU tensors

import pandas as pd  # noqa: E402
import triton  # noqa: E402

from benchmarks.aot import compile_in_subprocess, representative_launches  # noqa: E402
from benchmarks.conftest import RESULTS, commit  # noqa: E402
from rdfast.report.tables import markdown  # noqa: E402


def summary(table: pd.DataFrame) -> pd.DataFrame:
    def dtype(d):
        # bf16 reaches the kernels as its int16 bit patterns (exact widening), so an int16
        # operand is a bf16 input.
        if "int16" in d:
            return "bfloat16"
        return next((x for x in d if x.startswith(("float", "bfloat"))), d[0])

    t = table.assign(
        dtype=table["dtypes"].map(dtype),
        tensor_core=(table["mma"] + table["wgmma"]) > 0,
        vector_loads=table["ld_global_v4"] > 0,
    )
    return (
        t.groupby(["kernel", "arch", "dtype"])
        .agg(
            launches=("registers", "size"),
            registers_min=("registers", "min"),
            registers_max=("registers", "max"),
            spill_bytes_max=("spill_stores", "max"),
            shared_max=("shared", "max"),
            with_v4_loads=("vector_loads", "sum"),
            on_tensor_cores=("tensor_core", "sum"),
            fma_f32_max=("fma_f32", "max"),
        )
        .reset_index()
    )


def main() -> None:
    table = pd.DataFrame(compile_in_subprocess(representative_launches()))
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = table.assign(
        date=stamp,
        commit=commit(),
        device=f"none: ptxas from triton {triton.__version__}",
        args=table["args"].map(json.dumps),
        constexprs=table["constexprs"].map(json.dumps),
        dtypes=table["dtypes"].map(",".join),
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "compiled_kernels.csv"
    rows.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(markdown(summary(table).set_index("kernel"), index_name="kernel"))
    print(f"\n{len(table)} compilations; rows appended to {out}")


if __name__ == "__main__":
    main()
