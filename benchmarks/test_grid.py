"""A 16-run digits grid three ways on this machine, side by side: one task at a time, a pool of
2 workers, and Ray tasks on a Ray instance the command starts (2 CPUs).

The grid: digits, LeNet-300-100, seeds 0-3 x mp, gp, up, rp, t up to 64, the digits presets
(30 dense epochs, 4 fine-tuning epochs per step): 4 dense models and 16 runs, 20 tasks of one
thread each. Every case runs the whole `rdfast grid` command in-process from an empty OUT:
worker start-up (spawned pools import torch; Ray starts its processes) is part of it. Also
timed: `rdfast run` of the same runs in one process with one thread, the engine without the
grid around it, and Ray's start-up and shutdown alone, so that

    Ray's overhead per task = (ray - local x2) / 20 tasks, start-up included.

Every case makes the same records (one thread per task throughout).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import torch

from rdfast.commands import run_experiment
from rdfast.grid.driver import run_grid

SPEC = """
name = "digits-16"
dataset = "digits"
seeds = "0-3"
strategy = "all"

[resources]
num_cpus = 1
"""
TASKS = 20  # 4 dense models + 16 runs


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "digits-16.toml"
    path.write_text(SPEC)
    return path


def _grid(spec: Path, **kw):
    with tempfile.TemporaryDirectory() as d:
        result = run_grid(spec, Path(d) / "out", progress=False, log=lambda m: None, **kw)
        assert result.complete == 16 and not result.failed


@pytest.mark.benchmark(group="grid-16-runs")
def test_rdfast_run_one_process(benchmark):
    def once():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with tempfile.TemporaryDirectory() as d:
                r = run_experiment(out=Path(d), device="cpu", seeds="0-3", progress=False)
                assert r.complete == 16
        finally:
            torch.set_num_threads(threads)

    benchmark.pedantic(once, rounds=2, warmup_rounds=0)


@pytest.mark.benchmark(group="grid-16-runs")
def test_grid_local_1_worker(benchmark, spec):
    benchmark.pedantic(lambda: _grid(spec, executor="local", workers=1), rounds=2)


@pytest.mark.benchmark(group="grid-16-runs")
def test_grid_local_2_workers(benchmark, spec):
    benchmark.pedantic(lambda: _grid(spec, executor="local", workers=2), rounds=2)


@pytest.mark.benchmark(group="grid-16-runs")
def test_grid_ray_2_cpus(benchmark, spec):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()  # the command starts (and stops) its own instance
    benchmark.pedantic(lambda: _grid(spec, executor="ray", workers=2), rounds=2)


@pytest.mark.benchmark(group="grid-16-runs")
def test_ray_start_and_stop_alone(benchmark):
    ray = pytest.importorskip("ray")

    def once():
        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        ray.get(ray.remote(lambda: None).remote())  # one worker started and used
        ray.shutdown()
        return time.perf_counter() - start

    benchmark.pedantic(once, rounds=2)
