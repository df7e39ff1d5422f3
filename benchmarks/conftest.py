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
