"""On-disk layout of an experiment directory, atomic writes and stable hashing.

    OUT/
      dense/<key>/checkpoint.pt      trained dense model + rewind point + its evaluation
      runs/<key>/manifest.json       settings, versions, device, status of one run
      runs/<key>/step-<i>.pt         latest state after pruning step i (model, masks)
      runs/<key>/step-<i>.parquet    records of step i (one row per class)
      runs/<key>/step-<i>.npy        confusion matrix of step i (true x predicted)
      runs/<key>/step-<i>.pred.npy   each test example's predicted class at step i
      runs/<key>/labels.npy          the test labels those predictions are of
      records.parquet / confusion.parquet   all runs, consolidated after each command
      pruned/<run>/t<t>/             `rdfast prune --save`: a pruned model, shaped like its
                                     input checkpoint, and its bit-packed masks
      grid.json                      `rdfast grid`: its spec and the runs in flight
      dense/<key>/.lock, runs/<key>/.lock, .consolidate.lock, .grid.lock   held while
                                     being written (.grid.lock: by a grid's driver)

Every file is written to a temporary name in the same directory and renamed into place, so
a killed process leaves either the old file or the new one, never half of one. Every file is
checked when it is read back (Parquet and JSON by parsing, checkpoints by the sha256 written
beside them in `<name>.sha256`); a file that fails raises `DamagedFile` naming it, and the
engine recomputes what it held (everything in OUT can be recomputed bit for bit). Several
processes may share one OUT (a grid split over seeds or strategies, or identical commands
sharing the work): a run is written by one process at a time, a dense model is trained once
while the others wait for it, and consolidations take turns. The locks are `flock` locks,
which the kernel drops when their process dies, so a killed run never leaves one behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rdfast import outdir
from rdfast.errors import BadInput, DamagedFile

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one process per OUT
    fcntl = None

RECORDS_VERSION = 1


# --------------------------------------------------------------------------- paths
# Every file in OUT is named here (the layout in the module docstring).


def dense_checkpoint(out: Path, key_hash: str) -> Path:
    return Path(out) / "dense" / key_hash / "checkpoint.pt"


def dense_partial(checkpoint: Path) -> Path:
    """The interrupted training's state, beside its checkpoint-to-be."""
    return Path(checkpoint).with_name("partial.pt")


def dense_settings(checkpoint: Path) -> Path:
    return Path(checkpoint).with_name("settings.json")


def pruned_model(out: Path, run_id: str, t: float) -> Path:
    """The pruned model of step t of a `rdfast prune` run (its shards and masks)."""
    return Path(out) / "pruned" / run_id / f"t{t:g}"


def grid_lock(out: Path) -> Path:
    """Held by the one `rdfast grid` driver writing OUT."""
    return Path(out) / ".grid.lock"


def grid_state(out: Path) -> Path:
    """The running grid driver's spec and runs in flight (read by `rdfast grid status`)."""
    return Path(out) / "grid.json"


def run_dir(out: Path, run_id: str) -> Path:
    return Path(out) / "runs" / run_id


def manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / "manifest.json"


def manifests(out: Path) -> list[Path]:
    return sorted(Path(out).glob("runs/*/manifest.json"))


def lock_path(folder: Path) -> Path:
    """The lock of a run folder or a dense-model folder."""
    return Path(folder) / ".lock"


def step_path(run_dir: Path, i: int, kind: str) -> Path:
    """Step i of a run: "parquet" (records), "npy" (confusion matrix), "pt" (state)."""
    return Path(run_dir) / f"step-{i}.{kind}"


def labels_path(run_dir: Path) -> Path:
    """The test labels a run's predictions (`step-<i>.pred.npy`) are of."""
    return Path(run_dir) / "labels.npy"


def step_files_of(run_dir: Path) -> list[Path]:
    """Every file of every step of a run (records, matrices, predictions, states and their
    checksums) and the labels of its predictions."""
    return sorted([*Path(run_dir).glob("step-*"), *Path(run_dir).glob("labels.npy")])


def step_records_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob("runs/*/step-*.parquet"))


def records_path(out: Path) -> Path:
    return Path(out) / "records.parquet"


def confusion_path(out: Path) -> Path:
    return Path(out) / "confusion.parquet"


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process's umask (setting it is the only way) and put it back


def check_out(out: Path) -> Path:
    """`out` as a folder this process may write (it need not exist yet), or BadInput."""
    out = Path(out)
    if outdir.owner(out) == "export":  # its records.parquet would be rewritten from no steps
        raise BadInput(
            f"--out {out} is an rdfast export (records without models): runs go into a runs "
            "folder, which `rdfast export` then adds to it"
        )
    for p in (out, *out.absolute().parents):
        if p.exists():
            if not p.is_dir():
                raise BadInput(f"--out {out}: {p} exists and is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise BadInput(f"--out {out}: {p} is not writable")
            break
    return out


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write(fileobj)` to a temporary file, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Crc32:
    """A file's checksum as its outputs record it ("crc32:<8 hex digits>"), fed block by
    block like hashlib's objects. CRC-32 catches the damage a checksum is for (truncation,
    flipped bytes: 1 in 2^32 escapes) at 3.7 GB/s on these CPUs where sha256 runs at 1.6: on
    the 6 GB that three ratios of a 2 GB checkpoint write, 1.6 s against 3.8. Inputs, which
    name what was pruned, keep their sha256."""

    def __init__(self):
        self.value = 0

    def update(self, block) -> None:
        self.value = zlib.crc32(block, self.value)

    def hexdigest(self) -> str:
        return f"crc32:{self.value:08x}"


def checksum_file(path: Path) -> str:
    c = Crc32()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            c.update(block)
    return c.hexdigest()


def file_digests(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """Every file under `folder` (relative POSIX path -> its checksum, `Crc32`), sorted;
    `known` checksums (computed while writing) are taken as they are."""
    known = known or {}
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file():
            out[rel] = known.get(rel) or checksum_file(p)
    return out


def folder_problem(folder: Path, digests) -> str | None:
    """None if every file of `digests` is in `folder` with its checksum, else what is wrong."""
    folder = Path(folder)
    if not isinstance(digests, dict):
        return f"{folder.name}: its file checksums are missing or unreadable"
    for rel, digest in digests.items():
        path = folder / rel
        if not path.is_file():
            return f"{folder.name}/{rel} is missing"
        if checksum_file(path) != digest:
            return f"{folder.name}/{rel} differs from its checksum"
    return None


SAVED_RECORD = "files.json"  # in a saved pruned model's folder: its files' checksums


def saved_problem(folder: Path) -> str | None:
    """None if the pruned model saved in `folder` is whole, else what is not."""
    try:
        record = json.loads((Path(folder) / SAVED_RECORD).read_text())
    except (OSError, ValueError):
        return f"{Path(folder).name}/{SAVED_RECORD} is missing or unreadable"
    return folder_problem(folder, record.get("files") if isinstance(record, dict) else None)


def clear_temporaries(folder: Path, *, lock_held: bool = False) -> None:
    """Remove the temporary files of writes a killed process left in `folder` (atomic_write's
    `.NAME.*.tmp`). Unless the caller holds the folder's lock (`lock_held`), only when no
    other process holds it, for that one may be writing them right now."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if lock_held:
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        return
    with locked(lock_path(folder), wait=False) as held:
        if held:
            clear_temporaries(folder, lock_held=True)


@contextlib.contextmanager
def locked(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on the file `path` (created if missing) inside the block.

    Yields True once it is held; with `wait=False`, yields False at once (and holds nothing)
    when another process has it. The holder's pid and host are written into the file for
    `lock_holder`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_holder(path: Path) -> str | None:
    """ "pid N on HOST" while another process holds the lock on `path`, else None."""
    path = Path(path)
    if fcntl is None or not path.exists():
        return None
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().decode(errors="replace").strip() or "another process"
    return None


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DamagedFile(path, f"unreadable JSON ({type(e).__name__})") from None


def read_parquet(path: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, **kw)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DamagedFile(path, f"unreadable Parquet ({type(e).__name__})") from None


def read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DamagedFile(path, f"unreadable array ({type(e).__name__})") from None


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda f: df.to_parquet(f, index=False))


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _digest_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def save_torch(path: Path, obj: Any) -> None:
    """The checkpoint, then its sha256 beside it (a kill between the two leaves a digest that
    does not match: the checkpoint is then taken for damaged and recomputed)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
    digest = hashlib.sha256(data).hexdigest().encode()
    atomic_write(_digest_path(path), lambda f: f.write(digest))


def checked_bytes(path: Path) -> bytes:
    """The bytes of a file written by `save_torch`, checked against its sha256."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DamagedFile(path, f"unreadable ({e.strerror or type(e).__name__})") from None
    digest = _digest_path(path)
    if not digest.exists():
        raise DamagedFile(path, "no checksum beside it")
    if hashlib.sha256(data).hexdigest() != digest.read_text().strip():
        raise DamagedFile(path, "checksum mismatch (truncated or changed)")
    return data


def load_torch(path: Path) -> Any:
    """A checkpoint written by `save_torch`, checked against its sha256 first."""
    data = checked_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # the bytes match what was written: an incompatible checkpoint
        raise DamagedFile(path, f"cannot be loaded ({type(e).__name__})") from None


def remove(path: Path) -> None:
    """A file and its checksum, if present; a directory where a file belongs, too."""
    for p in (Path(path), _digest_path(path)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def step_files(run_dir: Path) -> dict[int, Path]:
    """Recorded steps of a run: step index -> its records file."""
    out = {}
    for p in Path(run_dir).glob("step-*.parquet"):
        out[int(p.stem.split("-")[1])] = p
    return out


def check_owner(path: Path, df: pd.DataFrame) -> None:
    """A step's records name the run and step they are of (every row's run_id and step
    columns): a file copied from another run or another step is DamagedFile, repaired like
    other damage, never counted as this run's."""
    run, step = Path(path).parent.name, int(Path(path).name.split(".")[0].split("-")[1])
    ids = set(df["run_id"].astype(str)) if "run_id" in df else set()
    steps = set(df["step"].astype(int)) if "step" in df else set()
    if ids != {run} or steps != {step}:
        their_runs = ",".join(sorted(ids)) or "?"
        their_steps = ",".join(map(str, sorted(steps))) or "?"
        theirs = f"run {their_runs} step {their_steps}"
        raise DamagedFile(path, f"holds {theirs}, not run {run} step {step}")


def owner_problem(path: Path) -> str | None:
    """Why a step's records are not this run's step (or cannot be read), or None."""
    try:
        check_owner(path, read_parquet(path, columns=["run_id", "step"]))
    except DamagedFile as e:
        return e.why
    return None


def sources_digest(files) -> str:
    """Content fingerprint of a set of step files: their names and the sha256 of their bytes."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(f"{Path(p).parent.name}/{Path(p).name}:".encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


SOURCES_KEY = b"rdfast_sources"


def load_records(out_dir: Path, prefer_consolidated: bool = False) -> pd.DataFrame:
    """All per-class records under `out_dir`, completed steps of unfinished runs included.

    With `prefer_consolidated`, OUT/records.parquet is read instead of the per-step files when
    it was made from exactly the step files there are now, byte for byte (the fingerprint it
    carries; never the modification times, which a concurrent writer can leave older than
    the steps it already read).
    """
    files = step_records_files(out_dir)
    merged = records_path(out_dir)
    if not files:
        return read_parquet(merged) if prefer_consolidated and merged.exists() else pd.DataFrame()
    if prefer_consolidated and merged.exists():
        try:
            meta = pq.read_schema(merged).metadata or {}
        except (OSError, ValueError):
            meta = {}
        if meta.get(SOURCES_KEY, b"").decode() == sources_digest(files):
            return read_parquet(merged)
    frames = []
    for p in files:
        frames.append(read_parquet(p))
        check_owner(p, frames[-1])
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["run_id", "step", "class"], kind="stable").reset_index(drop=True)


def load_confusion(out_dir: Path) -> pd.DataFrame:
    """Confusion matrices in long form: run_id, step, t_target, true, pred, count; from
    OUT/confusion.parquet where there are no step files (an export)."""
    files = step_records_files(out_dir)
    if not files:
        merged = confusion_path(out_dir)
        return read_parquet(merged) if merged.exists() else pd.DataFrame()
    frames = []
    for rec in files:
        npy = rec.with_suffix(".npy")
        if not npy.exists():
            continue
        meta = read_parquet(rec, columns=["run_id", "step", "t_target"])
        check_owner(rec, meta)
        meta = meta.iloc[0]
        cm = read_npy(npy)
        c = cm.shape[0]
        frames.append(
            pd.DataFrame(
                {
                    "run_id": meta["run_id"],
                    "step": int(meta["step"]),
                    "t_target": float(meta["t_target"]),
                    "true": np.repeat(np.arange(c), c),
                    "pred": np.tile(np.arange(c), c),
                    "count": cm.reshape(-1),
                }
            )
        )
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def consolidate(out_dir: Path) -> Path | None:
    """Rewrite OUT/records.parquet and OUT/confusion.parquet from the per-step files; the
    records carry the fingerprint of the step files they were made from."""
    out_dir = Path(out_dir)
    # One at a time: the last to take the lock reads the most complete set of steps.
    with locked(out_dir / ".consolidate.lock", wait=True):
        for stale in out_dir.glob(".*.tmp"):  # a consolidation killed mid-write
            stale.unlink(missing_ok=True)
        files = step_records_files(out_dir)
        digest = sources_digest(files)
        records = load_records(out_dir)
        if records.empty:
            return None
        table = pa.Table.from_pandas(records, preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), SOURCES_KEY: digest.encode()}
        )
        atomic_write(records_path(out_dir), lambda f: pq.write_table(table, f))
        write_parquet(confusion_path(out_dir), load_confusion(out_dir))
    return records_path(out_dir)
