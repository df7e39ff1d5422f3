"""Damaged, missing and foreign files in --out, and bad settings: the results equal the
undamaged reference bit for bit after a rerun, or one line names the path with exit code 2.

One small digits study (one seed, mp and rp, ratios 2 and 4) is the reference; each case
copies it, damages one file, reruns, and compares records and confusion matrices.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.runs import manifests, store
from tests.conftest import run_args

ARGS = dict(seeds="0", ratios="2,4", epochs="2", extra=("--strategy", "mp,rp"))
VOLATILE = ["seconds"]


def run(out, **kw):
    res = CliRunner().invoke(cli, run_args(out, **{**ARGS, **kw}))
    return res


def tables(out):
    records = store.load_records(out).drop(columns=VOLATILE)
    cms = {str(p.relative_to(out)): np.load(p) for p in sorted(out.glob("runs/*/step-*.npy"))}
    return records, cms


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    res = run(out)
    assert res.exit_code == 0, res.output
    return out


def assert_same(out, reference):
    a, cms_a = tables(out)
    b, cms_b = tables(reference)
    pd.testing.assert_frame_equal(a, b)
    assert cms_a.keys() == cms_b.keys()
    for k in cms_a:
        np.testing.assert_array_equal(cms_a[k], cms_b[k])


def copy_of(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


def damage(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garble":
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 16):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    elif how == "directory":
        path.unlink()
        path.mkdir()


STEP_FILES = ["step-1.parquet", "step-1.npy", "step-2.npy", "step-2.pt", "manifest.json"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_FILES)
@pytest.mark.parametrize("how", ["truncate", "garble", "empty", "delete", "directory"])
def test_damaged_run_files_are_recomputed_bit_for_bit(reference, tmp_path, name, how):
    out = copy_of(reference, tmp_path)
    victim = sorted(out.glob(f"runs/*/{name}"))[0]
    damage(victim, how)
    res = run(out)
    assert res.exit_code == 0, res.output
    assert_same(out, reference)
    # analyze and status read the repaired folder like the reference.
    assert CliRunner().invoke(cli, ["analyze", str(out)]).exit_code == 0
    status = CliRunner().invoke(cli, ["status", str(out)])
    assert status.exit_code == 0 and "interrupted" not in status.output


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "garble", "foreign"])
def test_damaged_or_foreign_dense_checkpoint_is_trained_again(reference, tmp_path, how):
    out = copy_of(reference, tmp_path)
    ckpt = next(out.glob("dense/*/checkpoint.pt"))
    if how == "foreign":  # another seed's dense model copied over this one
        other = tmp_path / "other"
        assert run(other, seeds="1").exit_code == 0
        foreign = next(other.glob("dense/*/checkpoint.pt"))
        shutil.copy(foreign, ckpt)
        shutil.copy(
            foreign.with_name("checkpoint.pt.sha256"), ckpt.with_name("checkpoint.pt.sha256")
        )
    else:
        damage(ckpt, how)
    for run_dir in out.glob("runs/*"):  # the runs must be recomputed from the dense model
        shutil.rmtree(run_dir)
    res = run(out)
    assert res.exit_code == 0, res.output
    assert "training it again" in res.output
    assert_same(out, reference)


def test_damaged_records_give_one_line_naming_the_file(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    victim = sorted(out.glob("runs/*/step-1.parquet"))[0]
    damage(victim, "truncate")
    for cmd in (["analyze", str(out)], ["report", str(out), "-o", str(tmp_path / "rep")]):
        res = CliRunner().invoke(cli, cmd)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "step-1.parquet" in lines[0], res.stderr
    assert not (tmp_path / "rep").exists()


def foreign_step(out):
    """Run A's step 1 (records, matrix, predictions) copied over run B's."""
    a, b = sorted(out.glob("runs/*/step-1.parquet"))[:2]
    for suffix in (".parquet", ".npy", ".pred.npy"):
        shutil.copyfile(a.with_name("step-1" + suffix), b.with_name("step-1" + suffix))
    return a.parent.name, b.parent.name


def test_a_foreign_step_file_is_named_by_every_reader(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    a, b = foreign_step(out)
    message = f"holds run {a} step 1, not run {b} step 1"
    for cmd in (["analyze", str(out)], ["report", str(out), "-o", str(tmp_path / "rep")]):
        res = CliRunner().invoke(cli, cmd)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], res.stderr
    res = CliRunner().invoke(cli, ["status", str(out)])
    assert res.exit_code == 1 and "damaged" in res.output and message in res.output, res.output
    # what a grid rerun asks before it skips a run: B is to be redone, A is complete
    assert manifests.finished(out, a) and not manifests.finished(out, b)


@pytest.mark.slow
def test_a_foreign_step_file_is_recomputed_bit_for_bit(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    a, b = foreign_step(out)
    res = run(out)
    assert res.exit_code == 0, res.output
    assert f"holds run {a} step 1, not run {b} step 1" in res.output
    assert_same(out, reference)


def test_consolidated_records_are_used_only_when_made_from_these_steps(reference, tmp_path):
    """Freshness by content: a records.parquet made from other step files (a concurrent
    writer's older view) is never read, whatever its modification time."""
    out = copy_of(reference, tmp_path)
    full = store.load_records(out)
    # A consolidated file that lacks the last step of one run, and is newer than every step.
    stale = full[~((full["run_id"] == full["run_id"].iloc[0]) & (full["step"] == 2))]
    store.write_parquet(out / "records.parquet", stale)
    got = store.load_records(out, prefer_consolidated=True)
    pd.testing.assert_frame_equal(got, full)
    store.consolidate(out)
    pd.testing.assert_frame_equal(store.load_records(out, prefer_consolidated=True), full)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--up-eps", "inf"], "--up-eps must be >= 0 and finite"),
        (["--lr", "inf"], "--lr must be > 0 and finite"),
        (["--weight-decay", "nan"], "--weight-decay must be >= 0 and finite"),
        (["--width", "inf"], "--width must be > 0 and below"),
        (["--ratios", "2,inf"], "every ratio must be"),
        (["--seeds", "99999999999999999999"], "--seeds must be distinct integers"),
    ],
)
def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [*run_args(out, **ARGS), *flags])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_cifar_files_are_read_without_running_code(tmp_path, monkeypatch):
    from rdfast.data import load_dataset
    from rdfast.errors import BadInput
    from tests.official_formats import write_cifar10

    monkeypatch.setenv("RDFAST_OFFLINE", "1")
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (shutil.copy, (str(folder / "batches.meta"), str(marker)))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.warns(UserWarning), pytest.raises(BadInput, match="data_batch_2: not a CIFAR"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def mnist_copy(shared_data, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (shared_data / "MNIST" / "raw").iterdir():
        if "images" in f.name:
            (raw / f.name).symlink_to(f)
        else:
            shutil.copy(f, raw / f.name)
    return raw


def test_malformed_mnist_files_are_caught(shared_data, tmp_path):
    from rdfast.data import load_dataset
    from rdfast.errors import BadInput, DataWarning

    raw = mnist_copy(shared_data, tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte"
    original = labels.read_bytes()
    # Labels shifted by one: a valid file, not the official one.
    labels.write_bytes(original[:8] + original[9:] + original[8:9])
    with pytest.warns(DataWarning, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist:train=100,test=100", tmp_path)
    # A label of 200.
    labels.write_bytes(original[:8] + bytes([200]) + original[9:])
    with pytest.warns(DataWarning), pytest.raises(BadInput, match="test label 200 outside"):
        load_dataset("mnist", tmp_path)
    # 9,000 labels for 10,000 images.
    labels.write_bytes(original[:4] + (9000).to_bytes(4, "big") + original[8 : 8 + 9000])
    with pytest.warns(DataWarning), pytest.raises(BadInput, match="10000 test inputs but 9000"):
        load_dataset("mnist", tmp_path)
    # A wrong magic number: the file is named.
    labels.write_bytes(b"\0\0\x08\x03" + original[4:])
    with pytest.raises(BadInput, match="t10k-labels-idx1-ubyte: not an idx labels file"):
        load_dataset("mnist", tmp_path)


def test_out_below_a_file_is_refused_and_results_are_readable_by_others(reference, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = run(afile / "sub")
    assert res.exit_code == 2 and "exists and is not a directory" in res.stderr
    assert afile.read_text() == "x"
    modes = {p.stat().st_mode & 0o777 for p in reference.rglob("*") if p.is_file()}
    assert all(m & 0o044 == 0o044 for m in modes), modes


def test_temporary_files_of_killed_writes_are_gone_after_a_rerun(reference, tmp_path):
    """What a write killed before its rename leaves (atomic_write's .NAME.*.tmp) in run and
    dense folders is removed by the next command, which still finds the results whole."""
    out = copy_of(reference, tmp_path)
    left = [next(out.glob("runs/*")) / ".step-1.pred.npy.x1y2.tmp",
            next(out.glob("dense/*")) / ".checkpoint.pt.sha256.a9b8.tmp"]  # fmt: skip
    for p in left:
        p.write_bytes(b"half a write")
    res = run(out)
    assert res.exit_code == 0, res.output
    assert not [p for p in left if p.exists()]
    assert not list(out.rglob("*.tmp"))
    assert_same(out, reference)
