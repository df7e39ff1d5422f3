"""Several processes on one output folder: locks, skipped runs, a dense model trained once."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading

import pandas as pd
import pytest
from click.testing import CliRunner

import rdfast.training as training_mod
from rdfast.cli.main import cli
from rdfast.runs import store
from rdfast.runs.engine import Engine
from rdfast.runs.manifests import status_table
from tests.conftest import process_args, run_args
from tests.test_engine import VOLATILE, experiment, table


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    assert store.lock_holder(lock) is None  # no file yet
    with store.locked(lock, wait=True) as held:
        assert held
        # flock conflicts between open file descriptions, even in one process.
        with store.locked(lock, wait=False) as second:
            assert second is False
        assert store.lock_holder(lock).startswith(f"pid {os.getpid()} on ")
    assert store.lock_holder(lock) is None
    with store.locked(lock, wait=False) as again:
        assert again


def test_lock_of_a_killed_process_is_released(tmp_path):
    lock = tmp_path / ".lock"
    code = (
        "import sys, time\n"
        "from rdfast.runs import store\n"
        f"with store.locked({str(lock)!r}, wait=True):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert store.lock_holder(lock) == f"pid {proc.pid} on {os.uname().nodename}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.lock_holder(lock) is None


def test_run_held_by_another_process_is_skipped_then_resumed(tmp_path):
    Engine(experiment(tmp_path / "ref"), progress=False).execute()
    reference = table(tmp_path / "ref")

    out = tmp_path / "shared"
    messages = []
    engine = Engine(experiment(out), progress=False, log=messages.append)
    engine.prepare()
    busy_id = engine.run_id(0, "gp")
    with store.locked(out / "runs" / busy_id / ".lock", wait=True):
        outcomes = engine.execute()
        status = {o.strategy: o.status for o in outcomes}
        assert status == {"mp": "complete", "gp": "busy", "up": "complete", "rp": "complete"}
        assert any(f"run {busy_id}" in m and "being written by pid" in m for m in messages)
        assert not list((out / "runs" / busy_id).glob("step-*"))  # nothing written to it
        assert busy_id not in set(store.load_records(out)["run_id"])
    outcomes = Engine(experiment(out), progress=False).execute()
    assert all(o.status == "complete" for o in outcomes)
    pd.testing.assert_frame_equal(table(out), reference)


def test_dense_model_in_training_elsewhere_is_waited_for(tmp_path, monkeypatch):
    # A finished dense model to hand over, as the other process would write it.
    Engine(experiment(tmp_path / "ref", strategies=("mp",)), progress=False).execute()
    reference = table(tmp_path / "ref")
    out = tmp_path / "shared"
    engine = Engine(experiment(out, strategies=("mp",)), progress=False)
    engine.prepare()
    dense_dir = store.stable_hash(engine.dense_key(0))
    held, release = threading.Event(), threading.Event()

    def other_process():
        with store.locked(out / "dense" / dense_dir / ".lock", wait=True):
            held.set()
            release.wait(30)
            shutil.copytree(
                tmp_path / "ref" / "dense" / dense_dir,
                out / "dense" / dense_dir,
                ignore=shutil.ignore_patterns(".lock"),
                dirs_exist_ok=True,
            )

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait(30)
    real_train = training_mod.train

    def spy(*args, **kw):
        assert kw.get("seed_parts")[1] != "dense", "trained the dense model a second time"
        return real_train(*args, **kw)

    messages = []

    def log(msg):
        messages.append(msg)
        if "waiting for pid" in msg:
            release.set()  # the other process finishes only once this one waits

    monkeypatch.setattr(training_mod, "train", spy)
    engine.log = log
    try:
        engine.execute()
    finally:
        release.set()
        thread.join()
    assert any(m.startswith("dense seed 0: waiting for pid") for m in messages)
    pd.testing.assert_frame_equal(table(out), reference)


def test_seed_whose_dense_model_trains_elsewhere_goes_last(tmp_path):
    exp = dict(strategies=("mp",), seeds=(0, 1))
    Engine(experiment(tmp_path / "ref", **exp), progress=False).execute()
    reference = table(tmp_path / "ref")
    out = tmp_path / "shared"
    engine = Engine(experiment(out, **exp), progress=False)
    engine.prepare()
    lock = out / "dense" / store.stable_hash(engine.dense_key(0)) / ".lock"
    held, release = threading.Event(), threading.Event()
    seed1_done_first = []

    def other_process():  # trains seed 0 and dies before saving it
        with store.locked(lock, wait=True):
            held.set()
            release.wait(60)

    def log(msg):
        if msg.startswith("dense seed 0: waiting"):
            recs = store.load_records(out)
            seed1_done_first.append(set(recs["seed"]) == {1} and recs["step"].max() == 3)
            release.set()

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait(30)
    engine.log = log
    try:
        outcomes = engine.execute()
    finally:
        release.set()
        thread.join()
    assert seed1_done_first == [True]  # seed 1 ran while seed 0's model was elsewhere
    assert [o.seed for o in outcomes] == [1, 0]
    pd.testing.assert_frame_equal(table(out), reference)  # then seed 0 trained here


def test_runs_left_of_a_seed_wait_when_its_dense_model_starts_elsewhere(tmp_path):
    """The other process takes (seed 0, mp) and then starts training seed 0's model: this one
    skips that run, finds the model in training before (seed 0, gp), does seed 1 first."""
    exp = dict(strategies=("mp", "gp"), seeds=(0, 1))
    out = tmp_path / "shared"
    engine = Engine(experiment(out, **exp), progress=False)
    engine.prepare()
    dense_lock = out / "dense" / store.stable_hash(engine.dense_key(0)) / ".lock"
    other = contextlib.ExitStack()

    def log(msg):
        if "(seed 0, mp) is being written" in msg:
            other.enter_context(store.locked(dense_lock, wait=True))  # its dense training
        if msg.startswith("dense seed 0: waiting"):
            other.close()  # it stops; this process trains the model itself

    engine.log = log
    with store.locked(out / "runs" / engine.run_id(0, "mp") / ".lock", wait=True):
        outcomes = engine.execute()
    other.close()
    assert [(o.seed, o.strategy, o.status) for o in outcomes] == [
        (0, "mp", "busy"),
        (1, "mp", "complete"),
        (1, "gp", "complete"),
        (0, "gp", "complete"),
    ]


def test_status_tells_interrupted_from_running(tmp_path):
    out = tmp_path / "o"
    Engine(experiment(out, strategies=("mp",)), progress=False).execute()
    (manifest,) = out.glob("runs/*/manifest.json")
    m = store.read_json(manifest)
    store.write_json(manifest, {**m, "status": "running"})  # as a killed process leaves it
    assert status_table(out)["status"].tolist() == ["interrupted"]
    with store.locked(manifest.parent / ".lock", wait=True):
        assert status_table(out)["status"].tolist() == ["running"]


@pytest.mark.slow
def test_identical_commands_in_parallel_share_the_work(tmp_path):
    """Two processes, one command, one folder: the records of a single process, each dense
    model trained once, nothing left half-written."""
    small = dict(seeds="0,1", ratios="2,4,8", epochs="4", finetune="2")
    ref, out = tmp_path / "ref", tmp_path / "shared"
    subprocess.run(process_args(ref, **small), check=True, capture_output=True)
    procs = [
        subprocess.Popen(
            process_args(out, **small), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trained = [line for log in logs for line in log.splitlines() if " img/s training" in line]
    assert sorted(line.split(":")[0] for line in trained) == ["dense seed 0", "dense seed 1"]
    a = pd.read_parquet(ref / "records.parquet").drop(columns=VOLATILE)
    b = pd.read_parquet(out / "records.parquet").drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(a, b)
    assert not list(out.rglob("*.tmp"))
    assert all(store.lock_holder(p) is None for p in out.rglob(".lock"))


def test_cli_leaves_a_busy_run_to_its_writer(tmp_path):
    def args(out):
        return run_args(out, extra=("--strategy", "mp,gp"))

    assert CliRunner().invoke(cli, args(tmp_path / "first")).exit_code == 0
    ids = {
        store.read_json(m)["settings"]["strategy"]: m.parent.name
        for m in (tmp_path / "first").glob("runs/*/manifest.json")
    }
    out = tmp_path / "second"
    with store.locked(out / "runs" / ids["gp"] / ".lock", wait=True):
        res = CliRunner().invoke(cli, args(out))
    assert res.exit_code == 0, res.output
    assert "note: 1 run(s) still being written by another process" in res.stdout
    assert f"busy: seed 0 gp ({ids['gp']}): being written by pid {os.getpid()}" in res.stdout
    assert "(1/2 runs complete; 1 still being written by another process)" in res.stdout
    # Finished by its writer before this command's summary: counted complete, tables whole.
    third = tmp_path / "third"
    shutil.copytree(tmp_path / "first" / "runs" / ids["gp"], third / "runs" / ids["gp"])
    with store.locked(third / "runs" / ids["gp"] / ".lock", wait=True):
        res = CliRunner().invoke(cli, args(third))
    assert res.exit_code == 0, res.output
    assert "note:" not in res.stdout and "busy:" not in res.stdout
    assert "(2/2 runs complete)" in res.stdout
    first = pd.read_parquet(tmp_path / "first" / "records.parquet").drop(columns=VOLATILE)
    whole = pd.read_parquet(third / "records.parquet").drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(first, whole)
