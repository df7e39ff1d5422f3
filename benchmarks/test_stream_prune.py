"""Streamed magnitude pruning of a sharded safetensors checkpoint against the I/O floor and
the peers (CPU), side by side in one run.

Every case runs once in a fresh process (`benchmarks/stream_cases.py`): its own seconds (the
work, imports excluded) and peak RSS go into extra_info; pytest-benchmark's own time is the
whole process. The checkpoint is written once per session (4 GB at 1e9 weights, under
$RDFAST_BENCH_DIR or the pytest temporary folder); outputs are deleted after each case.

    pytest benchmarks/test_stream_prune.py --benchmark-columns=median,rounds
    RDFAST_BENCH_STREAM_WEIGHTS=1e8 pytest benchmarks/test_stream_prune.py   # smaller
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.conftest import ROOT

WEIGHTS = float(os.environ.get("RDFAST_BENCH_STREAM_WEIGHTS", "1e9"))
# global_unstructured needs ~4.5 GB per 1e8 weights beyond the model (measured on the
# selection benchmark): 1e9 would need ~45 GB on a 24 GB machine, so it gets a fifth.
PEER_WEIGHTS = {"torch_global_unstructured": WEIGHTS / 5}
# (case, ratios, cache[, dtype]): "warm" reads the checkpoint from the page cache (4 GB fit in this
# machine's 24 GB: the floor is then a memory copy), "cold" evicts it first (a checkpoint
# larger than memory is read from disk on every pass).
CASES = [
    ("io_floor", "2", "warm"),
    ("rdfast", "2", "warm"),
    ("io_floor", "2", "cold"),
    ("rdfast", "2", "cold"),
    ("io_floor", "2,4,8", "warm"),
    ("rdfast", "2,4,8", "warm"),
    ("torch_kthvalue", "2,4,8", "warm"),
    ("numpy_sort", "2,4,8", "warm"),
    ("torch_global_unstructured", "2,4,8", "warm"),
    # Checkpoints of large models are mostly bf16: the same weights, half the bytes.
    ("io_floor", "2,4,8", "warm", "bfloat16"),
    ("rdfast", "2,4,8", "warm", "bfloat16"),
]
CASES = [c if len(c) == 4 else (*c, "float32") for c in CASES]


def run_case(*args) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.stream_cases", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    base = Path(os.environ.get("RDFAST_BENCH_DIR") or tmp_path_factory.mktemp("stream"))
    made = {}
    wanted = {(PEER_WEIGHTS.get(c[0], WEIGHTS), c[3]) for c in CASES}
    for weights, dtype in sorted(wanted):
        folder = base / f"ckpt-{weights:g}-{dtype}"
        if not folder.exists():
            run_case("write", folder, weights, dtype)
        made[weights, dtype] = folder
    yield made
    if not os.environ.get("RDFAST_BENCH_DIR"):
        for folder in made.values():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("case, ratios, cache, dtype", CASES, ids=["-".join(c) for c in CASES])
def test_stream_prune(benchmark, checkpoints, tmp_path, case, ratios, cache, dtype):
    weights = PEER_WEIGHTS.get(case, WEIGHTS)
    ckpt = checkpoints[weights, dtype]
    out = tmp_path / "out"
    benchmark.group = f"stream-prune-t{ratios}-{cache}-{dtype}"
    result = {}

    def once():
        shutil.rmtree(out, ignore_errors=True)
        result.update(run_case(case, ckpt, out, ratios, cache))

    benchmark.pedantic(once, rounds=1, warmup_rounds=0)
    shutil.rmtree(out, ignore_errors=True)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    benchmark.extra_info.update(
        result, weights=weights, dtype=dtype, checkpoint_gb=round(size / 1e9, 2)
    )
