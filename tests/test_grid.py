"""`rdfast grid`: a small digits grid through the local pool and through Ray gives, bit for bit,
the records of the same runs made one by one with `rdfast run`; a worker killed mid-run is
retried and its run recorded once; a driver killed mid-grid and restarted finishes with the
same records; a run that fails is recorded with its reason while the others go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from rdfast.cli.main import cli
from rdfast.runs import store

ray = pytest.importorskip("ray")

# Four seeds x two strategies of a small digits mlp: 8 runs on 4 dense models.
SPEC = """
name = "tiny"
seeds = "0-3"
strategy = ["mp", "up"]
ratios = [2, 4]
epochs = 3
finetune_epochs = 1

[[grid]]
dataset = "digits"
width = 0.5
"""
RUNS = [(seed, strategy) for seed in range(4) for strategy in ("mp", "up")]
TIMING = ["seconds"]  # wall times: the one column that differs between identical runs

# A model registered by a module the spec imports: LeNet-300-100, whose process kills itself
# the first time it trains with pruned weights (mid-way through a pruning run), leaving a
# flag so the retry goes through. Its numbers are the mlp's (same layers, same seeded init).
KILLER = """
import os, signal
from pathlib import Path
import torch
from rdfast.models import MODELS, register_model

FLAG = Path({flag!r})

class KillOnce(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        pruned = any(bool((m.weight == 0).any()) for m in self.inner.modules()
                     if isinstance(m, torch.nn.Linear))
        if self.training and pruned and not FLAG.exists():
            FLAG.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)

@register_model({model!r}, "mlp that kills its process once, mid-run")
def build(input_shape, num_classes, width):
    return KillOnce(MODELS["mlp"].build(input_shape, num_classes, width))
"""


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """A folder on every worker's path holding the killer models, and a task folder of its
    own (the env is set before Ray starts, so its workers inherit it)."""
    root = tmp_path_factory.mktemp("plugins")
    for name in ("ray", "local"):
        text = KILLER.format(flag=str(root / f"{name}.flag"), model=f"kill-{name}")
        (root / f"kill_{name}.py").write_text(text)
    tasks = root / "tasks"
    tasks.mkdir()
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RDFAST_TASK_DIR")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), saved["PYTHONPATH"]]))
    os.environ["RDFAST_TASK_DIR"] = str(tasks)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local_ray(plugins):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory):
    """The grid's runs made one `rdfast run` at a time, with the grid's one thread per task."""
    out = tmp_path_factory.mktemp("one-by-one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed, strategy in RUNS:
            args = ["run", "--dataset", "digits", "--width", "0.5", "--seeds", str(seed),
                    "--strategy", strategy, "--ratios", "2,4", "--epochs", "3",
                    "--finetune-epochs", "1", "--no-progress", "--out", str(out)]  # fmt: skip
            res = CliRunner().invoke(cli, args)
            assert res.exit_code == 0, res.output
    finally:
        torch.set_num_threads(threads)
    df = records(out)
    df.attrs["out"] = out
    return df


def records(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "records.parquet").drop(columns=TIMING)
    return df.sort_values(["run_id", "step", "class"]).reset_index(drop=True)


def confusion(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "confusion.parquet")
    return df.sort_values(["run_id", "step", "true", "pred"]).reset_index(drop=True)


def write_spec(tmp_path, text=SPEC, name="grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def grid(*args) -> object:
    return CliRunner().invoke(cli, ["grid", *map(str, args), "--no-progress"])


def test_local_pool_gives_the_records_of_rdfast_run(tmp_path, one_by_one, plugins):
    out = tmp_path / "out"
    res = grid(write_spec(tmp_path), "--out", out, "--executor", "local", "--workers", "2")
    assert res.exit_code == 0, res.output
    assert "8/8 runs complete (8 made now" in res.output
    got = records(out)
    assert sorted(got["run_id"].unique()) == sorted(one_by_one["run_id"].unique())
    pd.testing.assert_frame_equal(got, one_by_one, check_exact=True)
    # Confusion matrices and manifests as `rdfast run` writes them: status and report read it.
    status = CliRunner().invoke(cli, ["status", str(out)])
    assert status.exit_code == 0 and "8 complete" in status.output
    # Resume: nothing left to do, nothing rewritten.
    before = (out / "records.parquet").read_bytes()
    again = grid(write_spec(tmp_path), "--out", out, "--workers", "2")
    assert again.exit_code == 0 and "(0 made now, 8 already there" in again.output
    assert (out / "records.parquet").read_bytes() == before


@pytest.mark.slow
def test_ray_gives_the_records_of_rdfast_run(tmp_path, one_by_one, local_ray):
    out = tmp_path / "out"
    res = grid(write_spec(tmp_path), "--out", out, "--executor", "ray")
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(records(out), one_by_one, check_exact=True)
    pd.testing.assert_frame_equal(confusion(out), confusion(one_by_one.attrs["out"]))


def _killed_grid(tmp_path, executor, one_by_one, plugins, extra=()):
    flag = plugins / f"{executor}.flag"
    assert not flag.exists()
    text = SPEC.replace("width = 0.5", f'width = 0.5\nmodel = "kill-{executor}"')
    text = f'imports = ["kill_{executor}"]\n' + text
    out = tmp_path / "out"
    res = grid(write_spec(tmp_path, text), "--out", out, "--executor", executor, *extra)
    assert res.exit_code == 0, res.output
    assert flag.exists(), "no worker was killed: the test tested nothing"
    got = records(out)
    assert not got.duplicated(["run_id", "step", "class"]).any()
    assert got["run_id"].nunique() == len(RUNS)
    # The killed run was made again in full: its numbers are those of the uninterrupted mlp.
    numbers = [c for c in got.columns if c not in ("run_id", "dense_id", "model")]
    key = ["seed", "strategy", "step", "class"]
    a = got[numbers].sort_values(key).reset_index(drop=True)
    b = one_by_one[numbers].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    # The dead worker's folder was removed by a later task.
    assert not list((plugins / "tasks").iterdir())


@pytest.mark.slow
def test_ray_retries_a_killed_worker_and_records_its_run_once(
    tmp_path, one_by_one, plugins, local_ray
):
    _killed_grid(tmp_path, "ray", one_by_one, plugins)


@pytest.mark.slow
def test_local_pool_retries_a_killed_worker_and_records_its_run_once(tmp_path, one_by_one, plugins):
    _killed_grid(tmp_path, "local", one_by_one, plugins, extra=("--workers", "2"))


@pytest.mark.slow
def test_driver_killed_mid_grid_and_restarted_gives_the_same_records(tmp_path, one_by_one):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    cmd = [sys.executable, "-m", "rdfast.cli.main", "grid", str(spec), "--out", str(out),
           "--executor", "ray", "--workers", "2", "--no-progress"]  # fmt: skip
    # A process group of its own: the kill takes the driver and the Ray instance it started,
    # as the loss of the driver's machine would.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not any(_complete(out)) and time.monotonic() < deadline:
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(_complete(out))
    assert 1 <= done < len(RUNS), f"killed with {done} runs complete: not mid-grid"
    res = grid(spec, "--out", out, "--executor", "ray", "--workers", "2")
    assert res.exit_code == 0, res.output
    assert f"({len(RUNS) - done} made now, {done} already there" in res.output
    pd.testing.assert_frame_equal(records(out), one_by_one, check_exact=True)


def _complete(out: Path) -> list:
    found = []
    for m in store.manifests(out):
        try:
            if store.read_json(m).get("status") == "complete":
                found.append(m)
        except store.DamagedFile:  # being written
            pass
    return found


def test_a_failing_subgrid_is_recorded_and_the_others_go_on(tmp_path, plugins):
    # Sub-grid 2's dense training diverges (lr 1e12); sub-grid 3's data are not where it
    # says, which only the worker, loading them, finds out.
    text = """
seeds = "0"
strategy = "mp"
ratios = [2]
epochs = 2
finetune_epochs = 1
dataset = "digits"

[[grid]]
width = 0.5

[[grid]]
lr = 1e12

[[grid]]
dataset = "mnist"
data_root = "NOWHERE"
"""
    text = text.replace("NOWHERE", str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    spec = write_spec(tmp_path, text)
    res = grid(spec, "--out", out, "--workers", "2")
    assert res.exit_code == 1, res.output
    assert "1/3 runs complete" in res.output and "2 failed" in res.output
    status = CliRunner().invoke(cli, ["grid", "status", str(spec), "--out", str(out)])
    assert status.exit_code == 1
    lines = status.output
    assert "dense training failed: training loss became" in lines
    assert "dense model: " in lines and "nowhere" in lines
    assert "1 complete" in lines and "2 failed" in lines
    plain = CliRunner().invoke(cli, ["status", str(out)])  # `rdfast status` reads them too
    assert plain.exit_code == 1 and "2 failed" in plain.output


def test_status_counts_what_is_left(tmp_path, plugins):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    text = SPEC.replace('seeds = "0-3"', 'seeds = "0"')
    small = write_spec(tmp_path, text, "small.toml")
    assert grid(small, "--out", out, "--workers", "2").exit_code == 0
    res = CliRunner().invoke(cli, ["grid", "status", str(spec), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "8 runs, 6 to do, 2 complete; no driver running" in res.output
    plan = CliRunner().invoke(cli, ["grid", str(spec), "--out", str(out), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    # 4 dense models of 3 epochs, 8 runs of 2 ratios x 1 fine-tuning epoch.
    assert "1 points, 4 dense models, 8 runs (2 complete" in plan.output
    assert "28 training epochs in all" in plan.output


def test_a_second_driver_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "out"
    with store.locked(store.grid_lock(out), wait=True):
        res = grid(write_spec(tmp_path), "--out", out)
    assert res.exit_code == 2
    assert "another rdfast grid is writing" in res.output
    assert not (out / "runs").exists()


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, read from /proc (Linux)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_workers_die_with_a_killed_driver(tmp_path):
    """kill -9 of a local grid's driver leaves no worker, nor the resource tracker, behind."""
    spec = write_spec(tmp_path, SPEC.replace("epochs = 3", "epochs = 400"))
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "rdfast.cli.main", "grid", str(spec), "--out", out,
           "--executor", "local", "--workers", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(children) < 3 and time.monotonic() < deadline:  # 2 workers + the tracker
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.2)
            children = _descendants(proc.pid)
        assert len(children) >= 3, children
        time.sleep(2)  # the workers past their start-up, into training
        children = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "processes left behind the driver"
    finally:
        for p in children:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()


def test_analyze_and_report_take_the_runs_of_one_spec_from_a_shared_out(tmp_path):
    """Two specs into one --out (seed 0 with mp and up; seeds 0-1 with mp): analyze --spec
    reads each spec's own runs, the shared mp run of seed 0 in both."""
    out = tmp_path / "out"
    first = write_spec(tmp_path, SPEC.replace('seeds = "0-3"', 'seeds = "0"'), "first.toml")
    second = SPEC.replace('seeds = "0-3"', 'seeds = "0-1"').replace('["mp", "up"]', '"mp"')
    second = write_spec(tmp_path, second, "second.toml")
    for spec in (first, second):
        res = grid(spec, "--out", out, "--workers", "1")
        assert res.exit_code == 0, res.output
    # The second finds a run of the first beside its own: its next command reads its own.
    assert f"next: rdfast analyze {out} --spec {second}" in res.output

    def analyzed(*args):
        dest = tmp_path / f"tables{len(list(tmp_path.glob('tables*')))}"
        res = CliRunner().invoke(cli, ["analyze", str(out), "-o", str(dest), *map(str, args)])
        assert res.exit_code == 0, res.output
        runs = pd.read_csv(dest / "alpha_runs.csv").drop_duplicates("run_id")
        return sorted(zip(runs["seed"], runs["strategy"]))

    assert analyzed() == [(0, "mp"), (0, "up"), (1, "mp")]
    assert analyzed("--spec", first) == [(0, "mp"), (0, "up")]
    assert analyzed("--spec", second) == [(0, "mp"), (1, "mp")]
    report = CliRunner().invoke(cli, ["report", str(out), "-o", str(tmp_path / "r"), "--spec",
                                      str(first)])  # fmt: skip
    assert report.exit_code == 0, report.output
    assert "2 runs" in (tmp_path / "r" / "report.md").read_text()
    other = write_spec(tmp_path, SPEC.replace('seeds = "0-3"', 'seeds = "7"'), "other.toml")
    res = CliRunner().invoke(cli, ["analyze", str(out), "--spec", str(other)])
    assert res.exit_code == 2 and "none of the 2 runs of the spec" in res.output


class _OneWorker:
    """An executor of one worker that runs each task in this process when asked for results,
    keeping the order tasks were handed to it."""

    name, capacity = "one worker", 1

    def __init__(self, capacity=1):
        self.capacity, self.order, self._running = capacity, [], {}

    @property
    def in_flight(self):
        return len(self._running)

    def running(self):
        return list(self._running.values())

    def dense_source(self, task, result):
        return result

    def submit(self, task):
        kind, job = task.tag
        self.order.append((kind, job.seed))
        self._running[id(task)] = task

    def results(self, timeout):
        done = [(t, t.fn(*t.args)) for t in list(self._running.values())[:1]]
        self._running.pop(id(done[0][0]))
        return done

    def close(self):
        pass


@pytest.mark.parametrize("capacity", [1, None])
def test_a_trained_models_runs_go_before_the_next_training(tmp_path, capacity):
    """With a worker limit (the local pool), each dense model's runs are handed out before
    the next dense model's training: seeds complete one after another. Without one (a Ray
    cluster schedules its own), every training is handed out at once."""
    from rdfast.grid import spec as grid_spec
    from rdfast.grid.driver import Driver

    text = SPEC.replace('seeds = "0-3"', 'seeds = "0-2"')
    ex = _OneWorker(capacity)
    threads = torch.get_num_threads()
    try:
        result = Driver(grid_spec.load(write_spec(tmp_path, text)), tmp_path / "out", ex,
                        progress=False, log=None).run()  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert result.complete == 6
    if capacity == 1:
        assert ex.order == [("dense", 0), ("run", 0), ("run", 0), ("dense", 1), ("run", 1),
                            ("run", 1), ("dense", 2), ("run", 2), ("run", 2)]  # fmt: skip
    else:
        assert [k for k, _ in ex.order[:3]] == ["dense"] * 3
    # A second driver finds every run complete and hands out nothing.
    again = _OneWorker(capacity)
    Driver(grid_spec.load(write_spec(tmp_path, text)), tmp_path / "out", again,
           progress=False, log=None).run()  # fmt: skip
    assert again.order == []


def test_a_grid_continued_elsewhere_leaves_out_the_exported_runs(tmp_path):
    """Seed 0 made in one folder and exported; the grid of seeds 0-1 in a new folder with
    --skip-exported makes seed 1 alone (one dense model), and its export joins the first."""
    small = write_spec(tmp_path, SPEC.replace('seeds = "0-3"', 'seeds = "0"'), "small.toml")
    both = write_spec(tmp_path, SPEC.replace('seeds = "0-3"', 'seeds = "0-1"'), "both.toml")
    first, later, kept = tmp_path / "first", tmp_path / "later", tmp_path / "kept"
    assert grid(small, "--out", first, "--workers", "1").exit_code == 0
    assert CliRunner().invoke(cli, ["export", str(first), str(kept)]).exit_code == 0
    bad = grid(both, "--out", later, "--skip-exported", first)  # a runs folder, not an export
    assert bad.exit_code == 2 and "is not an rdfast export" in bad.output
    assert not later.exists()
    res = grid(both, "--out", later, "--workers", "1", "--skip-exported", kept)
    assert res.exit_code == 0, res.output
    assert "2/4 runs complete (2 made now, 0 already there; 1 dense models trained)" in res.output
    assert "2 held by the export, left out" in res.output
    made = pd.read_parquet(later / "records.parquet")
    assert set(made["seed"]) == {1}
    assert CliRunner().invoke(cli, ["export", str(later), str(kept)]).exit_code == 0
    held = pd.read_parquet(kept / "records.parquet")
    assert held["run_id"].nunique() == 4 and set(held["seed"]) == {0, 1}
