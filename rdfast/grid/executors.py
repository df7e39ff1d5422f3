"""Where a grid's tasks run: a process pool on this machine, or a Ray cluster.

Both take a task (`grid.tasks.train_dense` or `prune_run` with its arguments), hand back
each result once, and retry a task whose worker died (`retries` times; Ray's own
`max_retries` on a cluster). A result is the task's dict, or a `TaskLost` naming why no
result came. The driver alone writes OUT.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from rdfast.errors import BadInput

EXECUTORS = ("local", "ray")


@dataclass
class Task:
    fn: Any  # tasks.train_dense or tasks.prune_run
    args: tuple
    resources: dict
    tag: Any  # the driver's: what the task is for
    attempts: int = 0
    handle: Any = field(default=None, repr=False)


@dataclass
class TaskLost:
    reason: str


class _Executor:
    """What the driver asks of every executor besides submit/results/close: the tasks it
    holds (handle -> Task in `_running`)."""

    _running: dict
    capacity: int | None = None  # tasks it runs at once; None: as many as it is given

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def running(self) -> list[Task]:
        return list(self._running.values())


class LocalExecutor(_Executor):
    """`--workers` processes of this machine (spawned: a forked torch can deadlock)."""

    name = "local"

    def __init__(self, workers: int, retries: int = 3):
        if workers < 1:
            raise BadInput(f"--workers must be >= 1, got {workers}")
        self.workers, self.retries = workers, retries
        self.capacity = workers
        self._pool = self._new_pool()
        self._running: dict[cf.Future, Task] = {}

    def _new_pool(self):
        ctx = multiprocessing.get_context("spawn")
        return cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=die_with_parent,
                                      initargs=(os.getpid(),))  # fmt: skip

    def dense_source(self, task: Task | None, result: dict) -> dict:
        """What a run task is given to reach its dense model: here, its files."""
        return result

    def submit(self, task: Task) -> None:
        task.attempts += 1
        future = self._pool.submit(task.fn, *task.args)
        task.handle = future
        self._running[future] = task

    def results(self, timeout: float) -> list[tuple[Task, dict | TaskLost]]:
        if not self._running:
            return []
        done, _ = cf.wait(self._running, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        out, broken = [], []
        for future in done:
            task = self._running.pop(future)
            try:
                out.append((task, future.result()))
            except cf.process.BrokenProcessPool:
                broken.append(task)
            except Exception as e:  # the task raised: not a worker's death, not retried
                out.append((task, TaskLost(f"{type(e).__name__}: {e}")))
        if broken:
            # A dead worker breaks the whole pool: every task it held fails with it. A new
            # pool takes them again, each charged one attempt (which one killed it is unknown).
            for future in list(self._running):
                broken.append(self._running.pop(future))
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            for task in broken:
                if task.attempts > self.retries:
                    out.append((task, TaskLost(f"its worker died {task.attempts} times")))
                else:
                    self.submit(task)
        return out

    def close(self) -> None:
        # Tasks still running when the driver stops (an error, Ctrl-C) would otherwise hold
        # the interpreter's exit until they finish: their work is lost either way.
        if self._running:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """A worker's first act: a driver killed with SIGKILL (which runs no cleanup) takes its
    workers along, on Linux through the parent-death signal; they would otherwise sit idle
    under PID 1 (~850 MB each), and keep the resource tracker alive, forever."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the driver died before the signal was asked for
        os._exit(1)


class RayExecutor(_Executor):
    """Ray tasks with the spec's num_cpus/num_gpus; retried by Ray when their worker dies.

    `address`: None starts a Ray instance on this machine (with `cpus` CPUs); `auto` or
    `HOST:PORT` joins a running cluster; `ray://HOST:PORT` goes through Ray Client. A Ray
    already initialized in this process (a test's, a notebook's) is used as it is.
    """

    name = "ray"

    def __init__(self, address: str | None, retries: int = 3, cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise BadInput(
                "--executor ray needs Ray: pip install 'rdfast[ray]' (or pip install ray)"
            ) from None
        self.ray, self.retries = ray, retries
        self._started = False
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                quiet = {"logging_level": logging.WARNING}  # not Ray's start-up INFO lines
                if address is None:
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except Exception as e:  # ConnectionError, RuntimeError, ValueError: Ray's words
                where = address or "a new local instance"
                raise BadInput(f"cannot start or reach Ray at {where}: {_first_line(e)}") from None
            self._started = True
        self._remote = {}
        self._running: dict[Any, Task] = {}

    def _fn(self, fn, resources: dict, retries: int):
        key = (fn.__name__, resources["num_cpus"], resources["num_gpus"])
        if key not in self._remote:
            self._remote[key] = self.ray.remote(fn).options(
                num_cpus=resources["num_cpus"],
                num_gpus=resources["num_gpus"],
                max_retries=retries,
            )
        return self._remote[key]

    def dense_source(self, task: Task | None, result: dict):
        """A run task reaches its dense model as a Ray object: the dense task's own result
        where it ran in this grid (no copy through the driver), else the files put once."""
        if task is not None:
            return task.handle
        return self.ray.put(result)

    def submit(self, task: Task) -> None:
        task.attempts += 1
        ref = self._fn(task.fn, task.resources, self.retries).remote(*task.args)
        task.handle = ref
        self._running[ref] = task

    def results(self, timeout: float) -> list[tuple[Task, dict | TaskLost]]:
        if not self._running:
            return []
        refs = list(self._running)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and every other one already done, in one call
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            task = self._running.pop(ref)
            try:
                out.append((task, self.ray.get(ref)))
            except Exception as e:  # retries spent, or the task raised
                out.append((task, TaskLost(_first_line(e))))
        return out

    def close(self) -> None:
        for ref in self._running:
            self.ray.cancel(ref, force=True)
        if self._started:
            self.ray.shutdown()


def make_executor(name: str, *, workers: int | None, address: str | None, retries: int):
    if name not in EXECUTORS:
        raise BadInput(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    if name == "local":
        if address is not None:
            raise BadInput("--address is for --executor ray")
        return LocalExecutor(workers or default_workers(), retries)
    return RayExecutor(address, retries, cpus=workers)


def default_workers(num_cpus: float = 1.0) -> int:
    """As many tasks of `num_cpus` as this machine's CPUs hold."""
    return max(1, int((os.cpu_count() or 1) // max(num_cpus, 1)))


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
    return text[:200]


def _check_reachable(address: str | None) -> None:
    """HOST:PORT and ray://HOST:PORT answered within 5 s, or BadInput naming the address
    (Ray's own connection attempt retries for a minute before it says so)."""
    if address is None or address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise BadInput(f"--address {address}: use auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise BadInput(f"cannot reach Ray at {address}: {e.strerror or e}") from None
