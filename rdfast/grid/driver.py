"""`rdfast grid`: a whole study, from its spec, on this machine or a Ray cluster.

The driver expands the spec (`grid.spec`), skips the runs OUT already holds complete, and
hands the rest to an executor (`grid.executors`): a dense model first (or its checkpoint from
OUT), then its runs, each given the dense model's files; where the executor has a worker limit,
a trained model's runs before the next model's training. Every result comes back to the
driver, which alone writes OUT, in the layout `rdfast run` writes (so `analyze`, `report` and
`status` read it as they are), each file atomically and a run's manifest last. Killing the
driver loses the tasks in flight; a rerun of the same command finishes the grid. A run that
fails (NaN loss, bad input found on its worker, a worker that died more than `retries`
times) is recorded in its manifest with the reason, and the others go on.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from rdfast.errors import BadInput, DamagedFile
from rdfast.grid import spec as grid_spec
from rdfast.grid import tasks as grid_tasks
from rdfast.grid.executors import Task, TaskLost, default_workers, make_executor
from rdfast.runs import manifests, store
from rdfast.runs.lifecycle import new_manifest, now


@dataclass
class GridResult:
    name: str
    out: Path
    runs: int
    already: int  # complete before this command
    complete: int  # complete now
    dense_trained: int
    failed: list = field(default_factory=list)  # (run id, label, reason)
    seconds: float = 0.0
    executor: str = ""
    exported: int = 0  # runs left out: an export holds them (--skip-exported)


def run_grid(
    spec,
    out,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    retries: int = 3,
    progress: bool | None = None,
    log=None,
    skip_exported=None,
) -> GridResult:
    """Make every run of the spec that OUT lacks (and the export `skip_exported`, when
    given, does not hold: a study continued where its finished part was kept as an export).
    Bad input is a BadInput before anything is written (the spec, the executor, a Ray
    address that does not answer)."""
    grid = grid_spec.load(spec)
    out = store.check_out(out)
    skip = set()
    if skip_exported is not None:
        from rdfast.runs.export import exported_runs

        skip = exported_runs(skip_exported) & set(grid.runs)
    grid_spec.check_data(grid)
    if retries < 0:
        raise BadInput(f"--retries must be >= 0, got {retries}")
    if workers is not None and workers < 1:
        raise BadInput(f"--workers must be >= 1, got {workers}")
    if executor == "local" and workers is None:
        workers = grid_spec_workers(grid)
    if executor == "ray" and address is not None and workers is not None:
        raise BadInput("--workers sizes a local Ray instance; a cluster has its own CPUs")
    busy = store.lock_holder(store.grid_lock(out))
    if busy:
        raise BadInput(f"another rdfast grid is writing {out} ({busy})")
    ex = make_executor(executor, workers=workers, address=address, retries=retries)
    try:
        with store.locked(store.grid_lock(out), wait=False) as held:
            if not held:
                raise BadInput(f"another rdfast grid is writing {out}")
            return Driver(grid, out, ex, progress, log, skip).run()
    finally:
        ex.close()


def grid_spec_workers(grid) -> int:
    """Local workers by default: as many of the grid's largest tasks as this machine holds."""
    cpus = max((j.resources["num_cpus"] for j in grid.runs.values()), default=1.0)
    return default_workers(cpus)


class Driver:
    def __init__(self, grid, out: Path, executor, progress, log, skip=frozenset()):
        self.grid, self.out, self.ex = grid, Path(out), executor
        self.skip = set(skip)  # run ids made elsewhere (held by an export)
        self.log = log or (lambda msg: tqdm.write(msg))
        self.progress = progress
        self.failed: list = []
        self.dense_trained = 0
        self._waiting: dict[str, list] = {}  # dense id -> its runs to submit when it is ready
        # Tasks not yet handed to the executor: runs of trained models, dense trainings.
        self._queued: dict[str, deque] = {"run": deque(), "dense": deque()}
        self._state_written = 0.0

    # ------------------------------------------------------------------ the loop
    def run(self) -> GridResult:
        start = time.perf_counter()
        grid = self.grid
        here = [r for r in grid.runs.values() if r.run_id not in self.skip]
        todo = [r for r in here if not manifests.finished(self.out, r.run_id)]
        already = len(here) - len(todo)
        for folder in [*self.out.glob("runs/*"), *self.out.glob("dense/*")]:
            store.clear_temporaries(folder)  # writes of a driver killed mid-install
        for r in todo:
            self._waiting.setdefault(r.dense_id, []).append(r)
        quiet = None if self.progress is None else not self.progress
        self.bar = tqdm(
            total=len(here), initial=already, desc=f"grid {grid.name}", unit="run",
            disable=quiet, dynamic_ncols=True,
        )  # fmt: skip
        try:
            for dense_id in list(self._waiting):
                self._start_dense(grid.dense[dense_id])
            self._pump()
            self._write_state()
            while self.ex.in_flight or self._held():
                for task, result in self.ex.results(timeout=1.0):
                    self._done(task, result)
                self._pump()
                self._postfix()
                self._write_state()
        finally:
            self.bar.close()
            self._write_state(final=True)
            store.consolidate(self.out)  # also after a driver killed before it consolidated
        complete = sum(manifests.finished(self.out, r) for r in grid.runs if r not in self.skip)
        return GridResult(
            grid.name, self.out, len(grid.runs), already, complete, self.dense_trained,
            self.failed, time.perf_counter() - start, self.ex.name, len(self.skip),
        )  # fmt: skip

    def _held(self) -> int:
        return len(self._queued["run"]) + len(self._queued["dense"])

    def _pump(self) -> None:
        """Hand the executor tasks while it has a free worker (every task at once where it
        sets no limit: a Ray cluster schedules its own), the runs of trained models before
        the next model's training: whole seeds complete one after another, so a grid
        stopped part-way leaves complete runs behind (with every dense model trained first,
        claim4's 70 kept two workers busy for an hour before its first run)."""
        limit = self.ex.capacity
        while self._held() and (limit is None or self.ex.in_flight < limit):
            self.ex.submit((self._queued["run"] or self._queued["dense"]).popleft())

    def _postfix(self) -> None:
        """Runs in flight (running, or queued on the executor), dense models training."""
        kinds = [t.tag[0] for t in self.ex.running()]
        text = f"{kinds.count('run')} runs in flight, {len(self.failed)} failed"
        if "dense" in kinds:
            text = f"{kinds.count('dense')} dense training, " + text
        self.bar.set_postfix_str(text, refresh=False)

    # ------------------------------------------------------------------ dense models
    def _start_dense(self, job) -> None:
        files = self._dense_on_disk(job)
        if files is not None:
            self._release(job.dense_id, self.ex.dense_source(None, _dense_result(job, files)))
            return
        task = Task(grid_tasks.train_dense, (job, self.grid.imports), job.resources, ("dense", job))
        self._queued["dense"].append(task)

    def _dense_on_disk(self, job) -> dict | None:
        """The files of the dense model of `job` if OUT holds it intact."""
        path = store.dense_checkpoint(self.out, job.dense_id)
        if not path.exists():
            return None
        try:
            ckpt = store.checked_bytes(path)
        except DamagedFile as e:
            self.log(f"dense checkpoint {e}: training it again")
            return None
        folder = path.parent
        files = {f"dense/{job.dense_id}/checkpoint.pt": ckpt}
        for name in ("checkpoint.pt.sha256", "settings.json"):
            if (folder / name).exists():
                files[f"dense/{job.dense_id}/{name}"] = (folder / name).read_bytes()
        return files

    def _release(self, dense_id: str, source) -> None:
        """The runs waiting for a dense model, submitted with what reaches it."""
        for run in self._waiting.pop(dense_id, []):
            args = (run, source, self.grid.imports)
            task = Task(grid_tasks.prune_run, args, run.resources, ("run", run))
            self._queued["run"].append(task)

    # ------------------------------------------------------------------ results
    def _done(self, task: Task, result) -> None:
        kind, job = task.tag
        if isinstance(result, TaskLost):
            result = {"files": {}, "error": f"task lost: {result.reason}", "status": "failed"}
        if kind == "dense":
            self._dense_done(task, job, result)
        else:
            self._run_done(job, result)

    def _dense_done(self, task: Task, job, result: dict) -> None:
        if result.get("error"):
            for run in self._waiting.pop(job.dense_id, []):
                self._record_failure(run, result["error"])
                self.bar.update(1)
            return
        self._install(f"dense/{job.dense_id}/", result["files"], manifest=None)
        self.dense_trained += 1
        self._release(job.dense_id, self.ex.dense_source(task, result))

    def _run_done(self, run, result: dict) -> None:
        if result["files"]:
            self._install(f"runs/{run.run_id}/", result["files"], manifest="manifest.json")
            if result.get("status") == "failed":
                self.failed.append((run.run_id, run.label, result.get("error") or "failed"))
                self.log(f"run {run.run_id} ({run.label}) failed: {result.get('error')}")
        else:
            self._record_failure(run, result.get("error") or "no result")
        self.bar.update(1)

    def _record_failure(self, run, reason: str) -> None:
        """A run that made no files: its manifest says why (`rdfast status` shows it); any
        steps an earlier command recorded are left for a rerun to resume."""
        path = store.manifest_path(store.run_dir(self.out, run.run_id))
        manifest = new_manifest(run.run_id, run.data_name, run.exp, run.seed, run.settings)
        manifest.update(status="failed", error=reason, updated=now(), grid=self.grid.name)
        store.write_json(path, manifest)
        self.failed.append((run.run_id, run.label, reason))
        self.log(f"run {run.run_id} ({run.label}) failed: {reason}")

    def _install(self, prefix: str, files: dict[str, bytes], manifest: str | None) -> None:
        """A task's folder written into OUT under its lock, the manifest (which marks a run
        complete) last; an earlier partial run's step files are replaced, not mixed in."""
        folder = self.out / prefix
        for rel in files:
            if not rel.startswith(prefix) or ".." in Path(rel).parts:
                raise RuntimeError(f"a task returned {rel!r}, outside {prefix}")
        with store.locked(store.lock_path(folder), wait=True):
            store.clear_temporaries(folder, lock_held=True)  # a driver killed mid-write
            if manifest is not None:
                store.remove(folder / manifest)
                for f in store.step_files_of(folder):
                    store.remove(f)
            last = [r for r in files if Path(r).name == manifest]
            for rel in [r for r in files if r not in last] + last:
                data = files[rel]
                store.atomic_write(self.out / rel, lambda f, d=data: f.write(d))

    def _write_state(self, final: bool = False) -> None:
        """grid.json: the spec and the runs in flight, for `rdfast grid status` (at most
        twice a second; a grid of 2,000 runs rewrites some 60 kB)."""
        clock = time.perf_counter()
        if not final and clock - self._state_written < 0.5:
            return
        self._state_written = clock
        running = sorted(t.tag[1].run_id for t in self.ex.running() if t.tag[0] == "run")
        store.write_json(
            store.grid_state(self.out),
            {
                "name": self.grid.name,
                "spec": self.grid.source,
                "executor": self.ex.name,
                "driver": f"pid {os.getpid()} on {socket.gethostname()}",
                "in_flight": [] if final else running,
                "updated": now(),
            },
        )


def _dense_result(job, files: dict) -> dict:
    return {"kind": "dense", "id": job.dense_id, "files": files, "error": None, "log": []}


# --------------------------------------------------------------------------- status


def grid_status(spec, out) -> dict:
    """Every run of the spec: complete, failed (with the reason), in flight (a driver is
    running it now), part-way (steps recorded, rerun to finish) or to do."""
    import pandas as pd

    grid = grid_spec.load(spec)
    grid_spec.check_data(grid)
    out = Path(out)
    driver = store.lock_holder(store.grid_lock(out)) if out.is_dir() else None
    in_flight = set()
    if driver and store.grid_state(out).exists():
        in_flight = set(store.read_json(store.grid_state(out)).get("in_flight", []))
    rows = []
    for run in grid.runs.values():
        path = store.manifest_path(store.run_dir(out, run.run_id))
        m = store.read_json(path) if path.exists() else {}
        status, error = m.get("status"), m.get("error") or ""
        if run.run_id in in_flight:
            status = "in flight"
        elif status in ("complete", "failed"):
            pass
        elif store.step_files(store.run_dir(out, run.run_id)):
            status = "part-way"
        else:
            status = "to do"
        rows.append({"run_id": run.run_id, "run": run.label, "where": run.where,
                     "status": status, "error": error})  # fmt: skip
    table = pd.DataFrame(rows, columns=["run_id", "run", "where", "status", "error"])
    return {"name": grid.name, "driver": driver, "table": table}


def run_epochs(exp) -> int:
    """Training epochs of one pruning run: fine-tuning after every step, or retraining from
    the rewind epoch to the end of the schedule."""
    p, tr = exp.prune, exp.train
    per_step = tr.epochs - p.rewind_epoch if p.retrain == "rewind" else p.finetune_epochs
    return len(p.ratios) * per_step


def grid_plan(spec, out) -> dict:
    """What a grid would run, per (sub-grid, dataset, model, width): dense models, runs,
    training epochs (the cost: multiply by the seconds one epoch takes there). Reads OUT to
    count the runs already complete; writes nothing."""
    import pandas as pd

    grid = grid_spec.load(spec)
    grid_spec.check_data(grid)

    def row(where, e, dense, runs, epochs):
        return {"where": where, "dataset": e.dataset, "model": e.model, "width": e.width,
                "dense": dense, "runs": runs, "epochs": epochs}  # fmt: skip

    rows = [row(_where(grid, j), j.exp, 1, 0, j.exp.train.epochs) for j in grid.dense.values()]
    rows += [row(r.where, r.exp, 0, 1, run_epochs(r.exp)) for r in grid.runs.values()]
    keys = ["where", "dataset", "model", "width"]
    table = pd.DataFrame(rows).groupby(keys, sort=False, as_index=False).sum()
    complete = sum(manifests.finished(out, r) for r in grid.runs) if Path(out).is_dir() else 0
    return {
        "name": grid.name, "table": table, "points": grid.points, "dense": len(grid.dense),
        "runs": len(grid.runs), "complete": complete, "out": out,
        "epochs": int(table["epochs"].sum()),
    }  # fmt: skip


def _where(grid, dense_job) -> str:
    """The sub-grid of a dense model's first run."""
    return next(r.where for r in grid.runs.values() if r.dense_id == dense_job.dense_id)
