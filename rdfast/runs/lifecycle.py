"""The lifecycle of one run, written once for `rdfast run` and `rdfast prune --dataset`:
take the run's lock (or report it busy), clear what a killed writer left, find the steps
still to do, then mark the manifest running, do them, and mark it complete or failed.

Each command supplies what differs as a `RunSteps`: how its manifest starts, which steps
remain, and how to do them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

import rdfast
from rdfast.errors import RunFailed
from rdfast.runs import store


@dataclass
class RunOutcome:
    run_id: str
    seed: int
    strategy: str
    status: str
    error: str | None = None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.cache
def _git_commit() -> str | None:
    try:
        here = Path(rdfast.__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    return {
        "versions": {
            "rdfast": rdfast.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "python": platform.python_version(),
        },
        "device": device_name(device),
        "git_commit": _git_commit(),
        "platform": platform.platform(),
    }


def new_manifest(run_id: str, data_name: str, exp, seed: int, settings: dict) -> dict:
    """The manifest a run of `exp` starts with (its status is added as it goes)."""
    return {
        "run_id": run_id,
        "dataset": data_name,
        "model": exp.model,
        "width": exp.width,
        "seed": seed,
        "settings": {**settings, "train": asdict(exp.train)},
        "normalize": exp.normalize,
        "created": now(),
    }


def load_manifest(path: Path, log) -> dict | None:
    """A run's recorded manifest; None when missing or damaged (then removed, one line)."""
    if not path.exists():
        return None
    try:
        manifest = store.read_json(path)
    except store.DamagedFile as e:
        log(f"run {path.parent.name}: {e}: writing it again")
        store.remove(path)
        return None
    return manifest if isinstance(manifest, dict) else None


class RunSteps(Protocol):
    """What a command tells the lifecycle about one of its runs."""

    run_id: str
    seed: int
    strategy: str
    folder: Path  # OUT/runs/<run_id>
    n_steps: int  # the ratios: what the progress bar counts

    def new_manifest(self) -> dict:
        """The manifest the run starts with when none is recorded."""

    def remaining(self) -> int:
        """Check the recorded steps (the caller holds the lock) and return how many are
        still to do; 0 when the run is complete."""

    def work(self, bar) -> dict:
        """Do the remaining steps, updating `bar` per step; return what the manifest
        records of them. Raises RunFailed."""


def run_steps(run: RunSteps, bar, device, log: Callable[[str], None],
              warn: Callable[[str], None] | None = None) -> RunOutcome:  # fmt: skip
    """The run, unless another process is writing it (then "busy"). `log` takes progress
    lines, `warn` the line a failed run leaves (default: `log`)."""
    lock = store.lock_path(run.folder)
    with store.locked(lock, wait=False) as held:
        if held:
            return _locked(run, bar, device, log, warn or log)
    holder = store.lock_holder(lock) or "another process"
    log(f"run {run.run_id} (seed {run.seed}, {run.strategy}) is being written by {holder}: skipped")
    bar.update(run.n_steps)
    return RunOutcome(run.run_id, run.seed, run.strategy, "busy", f"being written by {holder}")


def _locked(run: RunSteps, bar, device, log, warn) -> RunOutcome:
    def outcome(status, error=None):
        return RunOutcome(run.run_id, run.seed, run.strategy, status, error)

    store.clear_temporaries(run.folder, lock_held=True)  # writes a killed process left
    todo = run.remaining()
    bar.update(run.n_steps - min(todo, run.n_steps))
    path = store.manifest_path(run.folder)
    manifest = load_manifest(path, log) or run.new_manifest()
    if todo == 0:
        if manifest.get("status") != "complete":  # killed after its last step
            manifest.update(status="complete", error=None, updated=now())
            store.write_json(path, manifest)
        return outcome("complete")
    manifest.update(status="running", error=None, updated=now(), **environment(device))
    store.write_json(path, manifest)
    try:
        manifest.update(run.work(bar))
    except RunFailed as e:
        manifest.update(status="failed", error=str(e), updated=now())
        store.write_json(path, manifest)
        warn(f"run {run.run_id} (seed {run.seed}, {run.strategy}) failed: {e}")
        return outcome("failed", str(e))
    manifest.update(status="complete", updated=now())
    store.write_json(path, manifest)
    return outcome("complete")
