"""`rdfast export`: a records-only copy of the complete runs, which analyze reads like the runs
folder, and to which later exports add runs (seeds run apart analyze as one)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from rdfast.cli.main import cli
from tests.conftest import run_args

TABLES = ("alpha_groups.csv", "alpha_paired.csv", "class_groups.csv")


def _run(out, seeds):
    res = CliRunner().invoke(cli, run_args(out, seeds=seeds, extra=("--strategy", "mp,rp")))
    assert res.exit_code == 0, res.output


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Seeds 0-1 in one runs folder, and the same seeds run apart in two others."""
    root = tmp_path_factory.mktemp("export")
    _run(root / "both", "0-1")
    _run(root / "s0", "0")
    _run(root / "s1", "1")
    return root


def _step_records(runs_dir):
    """Every step file's records, read by pandas alone."""
    files = sorted(runs_dir.glob("runs/*/step-*.parquet"))
    df = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
    return df.sort_values(["run_id", "step", "class"]).reset_index(drop=True)


def _analyze(folder, out):
    res = _invoke("analyze", folder, "-o", out, "--format", "csv")
    assert res.exit_code == 0, res.output
    return {name: pd.read_csv(out / name) for name in TABLES}


def test_export_holds_the_records_and_analyzes_as_the_runs(folders, tmp_path):
    dest = tmp_path / "export"
    res = _invoke("export", folders / "both", dest)
    assert res.exit_code == 0, res.output
    assert "4 run(s) added, 0 already there, 4 in all" in res.output
    # Only records, confusion matrices and manifests: no models, no predictions.
    kept = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert [p for p in kept if not p.startswith("runs/")] == [
        ".rdfast-output.json", "confusion.parquet", "records.parquet"
    ]  # fmt: skip
    assert {p.split("/")[-1] for p in kept if p.startswith("runs/")} == {"manifest.json"}
    exported = pd.read_parquet(dest / "records.parquet")
    pd.testing.assert_frame_equal(exported, _step_records(folders / "both"))
    for run in (dest / "runs").iterdir():
        original = folders / "both" / "runs" / run.name / "manifest.json"
        assert json.loads((run / "manifest.json").read_text()) == json.loads(original.read_text())
    # Confusion matrices: their row sums are each class's support in the records.
    cm = pd.read_parquet(dest / "confusion.parquet")
    support = cm.groupby(["run_id", "step", "true"])["count"].sum().rename("support")
    joined = exported.set_index(["run_id", "step", "class"])["support"]
    joined.index = support.index
    np.testing.assert_array_equal(support.to_numpy(), joined.to_numpy())

    a, b = _analyze(folders / "both", tmp_path / "a"), _analyze(dest, tmp_path / "b")
    for name in TABLES:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)
    status = _invoke("status", dest)
    assert status.exit_code == 0
    assert status.output.count("complete   2/2") == 4, status.output
    # A second export of the same runs adds nothing and changes no byte.
    before = (dest / "records.parquet").read_bytes()
    res = _invoke("export", folders / "both", dest)
    assert "0 run(s) added, 4 already there, 4 in all" in res.output
    assert (dest / "records.parquet").read_bytes() == before


def test_seeds_exported_apart_analyze_as_one_folder(folders, tmp_path):
    """Seed 0 and seed 1 run in different folders (another machine, another day), exported
    into one folder (the second from an export of its own): the tables of both seeds run
    together."""
    dest, other = tmp_path / "export", tmp_path / "export-s1"
    assert _invoke("export", folders / "s0", dest).exit_code == 0
    assert _invoke("export", folders / "s1", other).exit_code == 0
    res = _invoke("export", other, dest)
    assert res.exit_code == 0, res.output
    assert "2 run(s) added, 0 already there, 4 in all" in res.output
    together = _analyze(folders / "both", tmp_path / "a")
    merged = _analyze(dest, tmp_path / "b")
    for name in TABLES:
        pd.testing.assert_frame_equal(together[name], merged[name], check_exact=True)


def test_other_records_for_a_run_are_refused_and_nothing_written(folders, tmp_path):
    dest = tmp_path / "export"
    assert _invoke("export", folders / "s0", dest).exit_code == 0
    records = pd.read_parquet(dest / "records.parquet")
    records.loc[records.index[-1], "correct"] -= 1  # one class, one step: another number
    records.to_parquet(dest / "records.parquet", index=False)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    res = _invoke("export", folders / "both", dest)
    assert res.exit_code == 2
    assert "other records" in res.output and res.output.count("\n") == 1
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before


def test_incomplete_runs_are_left_out(folders, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(folders / "s0", runs)
    manifest = next(runs.glob("runs/*/manifest.json"))
    m = json.loads(manifest.read_text())
    m["status"] = "running"
    manifest.write_text(json.dumps(m))
    res = CliRunner().invoke(cli, ["export", str(runs), str(tmp_path / "export")])
    assert res.exit_code == 0, res.output
    assert "1 run(s) added" in res.output
    assert f"1 run(s) not complete, left out: {manifest.parent.name}" in res.output
    exported = pd.read_parquet(tmp_path / "export" / "records.parquet")
    assert manifest.parent.name not in set(exported["run_id"])


@pytest.mark.parametrize("case", ["user folder", "a file", "no runs"])
def test_bad_destinations_exit_2(folders, tmp_path, case):
    runs, dest = folders / "s0", tmp_path / "dest"
    if case == "user folder":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    elif case == "a file":
        dest.write_text("mine")
    else:
        runs = tmp_path / "empty"
        runs.mkdir()
    res = _invoke("export", runs, dest)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("rdfast: error: ") and res.output.count("\n") == 1
    if case == "user folder":
        assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]
    elif case == "a file":
        assert dest.read_text() == "mine"
    else:
        assert not dest.exists()


def test_runs_never_write_into_an_export(folders, tmp_path):
    dest = tmp_path / "export"
    assert _invoke("export", folders / "s0", dest).exit_code == 0
    before = (dest / "records.parquet").read_bytes()
    res = CliRunner().invoke(cli, run_args(dest, seeds="1"))
    assert res.exit_code == 2 and "is an rdfast export" in res.output
    assert (dest / "records.parquet").read_bytes() == before
    assert not (dest / "dense").exists()
