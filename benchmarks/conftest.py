"""Shared benchmark plumbing: every run of a suite appends its figures to results/<suite>.csv.

Each row carries the device, the commit and the date, because an absolute time holds only
for the machine it was taken on; compare rows of one run (side by side) by their ratio.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu {platform.machine()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"


def peak_bandwidth_gbs() -> float | None:
    """The GPU's theoretical memory bandwidth: 2 transfers per clock (DDR) x bus width.
    memory_clock_rate is in kHz, memory_bus_width in bits. None on the CPU."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8 / 1e9


def bandwidth_info(benchmark, bytes_moved: int) -> None:
    """GB/s of a bandwidth-bound case, and its share of the GPU's peak when there is one."""
    if benchmark.stats is None:  # --benchmark-disable: the case ran once, untimed
        return
    gbs = bytes_moved / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["bytes_moved"] = bytes_moved
    benchmark.extra_info["gb_per_s"] = round(gbs, 2)
    peak = peak_bandwidth_gbs()
    if peak:
        benchmark.extra_info["pct_of_peak"] = round(100 * gbs / peak, 1)


def commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks or session.config.getoption("benchmark_disable"):
        return
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = {}
    for b in bs.benchmarks:
        if not b:
            continue
        suite = Path(b.fullname.split("::")[0]).stem.removeprefix("test_")
        rows.setdefault(suite, []).append(
            {
                "date": stamp,
                "commit": commit(),
                "device": device_name(),
                "group": b.group,
                "name": b.name,
                "rounds": b.stats.rounds,
                "median_s": f"{b.stats.median:.6f}",
                "min_s": f"{b.stats.min:.6f}",
                **{k: v for k, v in b.extra_info.items()},
            }
        )
    RESULTS.mkdir(exist_ok=True)
    for suite, items in rows.items():
        path = RESULTS / f"{suite}.csv"
        fields = list(dict.fromkeys(k for r in items for k in r))
        new = not path.exists()
        if not new:
            with path.open() as f:
                old_fields = next(csv.reader(f), [])
            fields = list(dict.fromkeys([*old_fields, *fields]))
            if fields != old_fields:  # columns grew: rewrite with the wider header
                with path.open() as f:
                    old = list(csv.DictReader(f))
                items = old + items
                new = True
        with path.open("w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerows(items)
