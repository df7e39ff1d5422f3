"""The GPU measuring script stays runnable while no GPU is at hand: its dry run (CPU, Triton
through the interpreter, tiny sizes) produces a row for every part and no error row."""

import csv
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_script_dry_run(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--skip",
            "tests",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "gpu.csv").open()))
    groups = {r["group"].split("-")[0] for r in rows}
    assert {"select", "confusion", "masked", "resnet20", "rdfast", "total"} <= groups, groups
    assert not [r for r in rows if r["case"] == "error"], rows
    assert all(r["device"] and r["commit"] and r["date"] for r in rows)
    run = next(r for r in rows if r["group"].startswith("rdfast-run"))
    assert run["returncode"] == "0" and run["runs_complete"] == "2/2"
