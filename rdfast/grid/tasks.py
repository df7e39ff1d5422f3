"""What a grid's workers do: train one dense model, or make one pruning run, in a folder of the
worker's own, and return its files (path relative to OUT -> bytes) for the driver to write.

No filesystem is shared: the dense model reaches a run as the files of its folder (a Ray
object, or the pool's pickled argument), the run is made by the same `Engine` and
`PruningRun` as `rdfast run` makes it, under the same run id, and its folder comes back
whole. A task never raises for what a run can fail of (bad input found only here, a NaN
loss): it returns the reason, which the driver records. A worker that dies leaves its folder
behind; the next task on that machine removes the folders of processes that are gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rdfast.errors import BadInput, RunFailed
from rdfast.runs import store

PREFIX = "rdfast-task-"


def train_dense(job, imports: tuple[str, ...]) -> dict:
    """The dense model of `job` (a grid.spec.DenseJob), as the files of its OUT folder."""
    from rdfast.runs.engine import Engine

    log: list[str] = []
    with _workspace(job.threads, imports) as tmp:
        try:
            engine = Engine(replace(job.exp, out=tmp), progress=False, log=log.append)
            engine.prepare()
            key = store.stable_hash(engine.dense_key(job.seed))
            if key != job.dense_id:
                raise RunFailed(f"this worker computes the dense id {key}, not {job.dense_id}")
            engine.dense(job.seed)
        except RunFailed as e:  # "dense training failed: ..."
            return _failed("dense", job.dense_id, str(e), log)
        except Exception as e:  # bad input found here, a bug, an environment fault
            return _failed("dense", job.dense_id, f"dense model: {_reason(e)}", log)
        folder = store.dense_checkpoint(tmp, job.dense_id).parent
        keep = ("checkpoint.pt", "checkpoint.pt.sha256", "settings.json")
        files = _files(tmp, [folder / name for name in keep])
    return {"kind": "dense", "id": job.dense_id, "files": files, "error": None, "log": log}


def prune_run(job, dense: dict, imports: tuple[str, ...]) -> dict:
    """The run of `job` (a grid.spec.RunJob) from its dense model's files, as the files of
    its OUT folder: manifest, records, confusion matrices and latest state."""
    from rdfast.runs.engine import Engine

    log: list[str] = []
    if dense.get("error"):
        return _failed("run", job.run_id, dense["error"], log)
    with _workspace(job.threads, imports) as tmp:
        for rel, data in dense["files"].items():
            store.atomic_write(tmp / rel, lambda f, d=data: f.write(d))
        try:
            engine = Engine(replace(job.exp, out=tmp), progress=False, log=log.append)
            engine.prepare()
            run_id = engine.run_id(job.seed, job.strategy)
            if run_id != job.run_id:
                raise RunFailed(f"this worker computes the run id {run_id}, not {job.run_id}")
            with tqdm(disable=True) as bar:
                outcome = engine.run_one(job.seed, job.strategy, bar)
        except Exception as e:  # a failure of the run is recorded by the run itself
            return _failed("run", job.run_id, _reason(e), log)
        folder = store.run_dir(tmp, job.run_id)
        files = _files(tmp, [p for p in folder.iterdir() if not p.name.startswith(".")])
    return {
        "kind": "run",
        "id": job.run_id,
        "files": files,
        "status": outcome.status,
        "error": outcome.error,
        "log": log,
    }


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, (BadInput, RunFailed)) else f"{type(e).__name__}: {e}"


def _failed(kind: str, ident: str, error: str, log: list) -> dict:
    return {"kind": kind, "id": ident, "files": {}, "status": "failed", "error": error, "log": log}


def _files(root: Path, paths) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(paths) if p.is_file()}


@contextlib.contextmanager
def _workspace(threads: int, imports):
    """A fresh folder for one task, with the task's torch threads and the spec's imports."""
    from rdfast.grid.spec import import_modules

    torch.set_num_threads(threads)
    import_modules(imports, "grid task")
    base = Path(os.environ.get("RDFAST_TASK_DIR") or tempfile.gettempdir())
    _remove_orphans(base)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(base: Path) -> None:
    """Task folders of processes that no longer exist (killed workers)."""
    for folder in base.glob(f"{PREFIX}*"):
        try:
            pid = int(folder.name[len(PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue
