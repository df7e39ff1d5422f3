"""Global magnitude pruning of a safetensors checkpoint, streamed shard by shard.

Nothing but a chunk of weights is ever in memory. The thresholds of every ratio come at once
from histograms of the magnitudes' keys (their bit patterns with the sign cleared, which
order as the magnitudes do): one pass of 2^15 bins where every matched tensor is bf16 or
every one fp16 (16-bit keys), two passes of the 16/16-bit radix select
(`rdfast.kernels.selection.select_thresholds`) otherwise (fp32, or 16-bit types mixed, widened
exactly). One more read writes the pruned checkpoint of every ratio. Ties at a threshold go in
checkpoint order (shards in order, tensors in file order, then flat index), so the result is,
bit for bit, a stable sort of the concatenated magnitudes -- and the masks of the ratios nest.

    OUT/t2/, OUT/t4/, ...   one pruned model per ratio, a copy of the input: the shards (same
                            headers, pruned weights zero, w * 0), the index, and every other
                            file of the input folder (config, tokenizer, model card, ...)
    OUT/t<t>/prune.json     what was done to that folder: the input (path, sha256), the tensors,
                            the threshold and the weights kept, every file's checksum
    OUT/prune.json          the same for every ratio in OUT

A folder is written under OUT/.partial and moved into place when complete: a failed or killed
command leaves no pruned shard behind. A rerun with the same input and tensors skips every
folder whose files match their checksums and redoes the others; a rerun with another input or
other tensors is refused before anything is touched.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rdfast import __version__, outdir
from rdfast.errors import BadInput
from rdfast.kernels.selection import (
    NaNScoreError,
    count_true,
    float_of_key,
    keep_chunk,
    select_thresholds,
)
from rdfast.pruning.checkpoints import Checkpoint, Shard
from rdfast.pruning.strategies import target_remaining
from rdfast.runs import store

# 2^20 elements (4 MiB of fp32) a chunk: 1e9 weights are ~950 chunks a pass, so the per-chunk
# Python cost stays under a second, and a chunk's scores and keys stay a few MiB.
CHUNK = 1 << 20
COPY_BLOCK = 1 << 24  # bytes of an unpruned tensor copied at a time
RECORD = "prune.json"  # in OUT and in every OUT/t<t>/
INDEX = "model.safetensors.index.json"  # written for shards that came without an index


def matched_tensors(ckpt: Checkpoint, include: tuple[str, ...], exclude: tuple[str, ...]):
    """Names of the tensors to prune: floating tensors whose name matches an `include` glob
    (default: those with 2 or more dimensions), minus the `exclude` globs or module paths."""

    def excluded(name):
        module = name.rsplit(".", 1)[0]
        return any(fnmatch.fnmatchcase(name, p) or module == p for p in exclude)

    names = []
    for name, e in ckpt.entries.items():
        hit = any(fnmatch.fnmatchcase(name, p) for p in include) if include else len(e.shape) >= 2
        if hit and e.floating and e.numel and not excluded(name):
            names.append(name)
    if not names:
        what = f"--include {','.join(include)}" if include else "the default selection"
        raise BadInput(
            f"{what} matches no floating tensor of {ckpt.path}"
            + ("" if include else " with 2 or more dimensions")
        )
    return ckpt.ordered(names)


def f32_bits(w: torch.Tensor) -> torch.Tensor:
    """The int32 bits of w as fp32: a view for fp32 (of the map, nothing copied); fp16 and
    bf16 widen exactly first."""
    return (w if w.dtype == torch.float32 else w.float()).view(torch.int32)


def magnitude_keys(w: torch.Tensor) -> torch.Tensor:
    """The selection's int32 keys of |w|, straight from the bits: |w| is w with the sign bit
    cleared (-0.0 becomes +0.0, NaN stays above +inf), and the bits of a non-negative float
    order as the float does. One op where |w| and the general key take five."""
    return f32_bits(w) & 0x7FFFFFFF


class _Magnitudes:
    """A `ScoreSource` (`rdfast.kernels.selection`): the matched tensors as the 32-bit
    selection reads them, chunk by chunk from the maps:
    the int32 bits of their fp32 values (fp16/bf16 widened), scored by magnitude (`abs_bits`:
    the selection clears the sign bit, or reads the top digit off the high half)."""

    abs_bits = True

    def __init__(self, ckpt: Checkpoint, names: list[str], bar=None):
        self.ckpt, self.names, self.bar = ckpt, names, bar

    def pieces(self, masks=None):
        for i, shard, e, start, end in self.ckpt.chunks(self.names, CHUNK):
            yield f32_bits(shard.view(e, start, end)), None, [(i, start, end, None, 0)]
            shard.release(e, start, end)  # once the pass is done with the piece
            if self.bar is not None:
                self.bar.update(end - start)


class Keys32:
    """fp32 checkpoints (and 16-bit types mixed): int32 keys, the two-pass radix select."""

    passes = 3

    def thresholds(self, ckpt, names, ks, bar):
        try:
            return select_thresholds(_Magnitudes(ckpt, names, bar), ks, names)
        except NaNScoreError as e:
            raise BadInput(f"{ckpt.path}: {e}") from None

    def keys(self, w: torch.Tensor):
        return magnitude_keys(w), None

    def prune(self, w, keep, _, buffer: torch.Tensor) -> torch.Tensor:
        if w.dtype == torch.float32:
            # w * keep, as an in-memory prune zeroes (w * 0: -0.0 stays -0.0)
            return torch.mul(w, keep, out=buffer[: w.numel() * 4].view(torch.float32))
        return w * keep  # a 16-bit tensor among 32-bit ones: its own small allocation

    def value(self, T: int) -> float:
        return float(float_of_key(T))


class Keys16:
    """Every matched tensor bf16, or every one fp16: the 15 bits under the sign are the key.
    One histogram pass of 2^15 bins gives every threshold exactly (fp32 needs two), and the
    pruned bits are the kept bits or the sign alone (w * 0 = +-0.0) -- no widening anywhere."""

    passes = 2
    INF_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # the key of |inf|; above: NaN

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def thresholds(self, ckpt, names, ks, bar):
        hist = np.zeros(1 << 15, dtype=np.int64)
        for _, shard, e, start, end in ckpt.chunks(names, CHUNK):
            u = shard.view(e, start, end).view(torch.int16).numpy().view(np.uint16)
            # numpy's bincount: 1e6 keys in ~1.5 ms on this CPU, torch.bincount ~4
            hist += np.bincount(u & 0x7FFF, minlength=1 << 15)
            shard.release(e, start, end)
            bar.update(end - start)
        if hist[self.INF_KEY[self.dtype] + 1 :].any():
            self._name_nan(ckpt, names)
        cum = np.cumsum(hist)
        out = []
        for k in ks:
            T = int(np.searchsorted(cum, k, side="left"))
            out.append((T, int(k - (cum[T - 1] if T else 0))))
        return out

    def _name_nan(self, ckpt, names):
        for _, shard, e, start, end in ckpt.chunks(names, CHUNK):
            u = shard.view(e, start, end).view(torch.int16)
            if bool(((u & 0x7FFF) > self.INF_KEY[self.dtype]).any()):
                raise BadInput(f"{ckpt.path}: {e.name}: scores contain NaN")

    def keys(self, w: torch.Tensor):
        # numpy: on 2^20 16-bit values the key, compare and count take 0.09, 0.06 and 0.04
        # ms where torch's int16 ops take 0.14, 0.30 and 0.14 (2 threads, this CPU).
        u = w.view(torch.int16).numpy().view(np.uint16)
        return u & 0x7FFF, u

    def prune(self, w, keep, u, buffer: torch.Tensor) -> np.ndarray:
        """Kept bits, or the sign bit alone (w * 0 = +-0.0): u & (0x8000 | 0x7FFF * keep),
        0.25 ms for 2^20 values where torch.where takes 0.37."""
        out = buffer.numpy().view(np.uint16)[: u.size]
        np.multiply(keep, np.uint16(0x7FFF), out=out, casting="unsafe")
        np.bitwise_or(out, np.uint16(0x8000), out=out)
        return np.bitwise_and(u, out, out=out)

    def value(self, T: int) -> float:
        return float(torch.tensor([T], dtype=torch.int16).view(self.dtype)[0])


def keys_for(ckpt: Checkpoint, names: list[str]):
    dtypes = {ckpt.entries[n].dtype for n in names}
    if dtypes == {"BF16"}:
        return Keys16(torch.bfloat16)
    if dtypes == {"F16"}:
        return Keys16(torch.float16)
    return Keys32()


class Writer:
    """The files of one shard for every ratio, written and checksummed (`store.Crc32`) on
    threads of their own while the main thread computes the next chunks (zlib releases the
    GIL). Each file is written by one thread, in order; pruned chunks go through a ring of
    buffers, each reused once its last write is done."""

    DEPTH = 8  # ring buffers: two to three chunks of three ratios in flight
    THREADS = 2

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.files = [open(p, "wb") for p in paths]
        self.hashes = [store.Crc32() for _ in paths]
        self.ring = [torch.empty(CHUNK * 4, dtype=torch.uint8) for _ in range(self.DEPTH)]
        self.ring_writes: list = [None] * self.DEPTH
        self.turn = 0
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix="write")
                      for _ in range(min(self.THREADS, len(paths)))]  # fmt: skip
        self.pending: deque = deque()

    def _write(self, j: int, block) -> None:
        self.files[j].write(block)
        self.hashes[j].update(block)

    def submit(self, j: int, block, slot: int | None = None) -> None:
        """Write `block` to file j: ring buffer `slot`'s contents, or bytes nothing changes
        before `drain()`."""
        if isinstance(block, torch.Tensor):
            block = block.view(torch.uint8).numpy()
        elif isinstance(block, np.ndarray):
            block = block.view(np.uint8)
        future = self.pools[j % len(self.pools)].submit(self._write, j, block)
        self.pending.append(future)
        if slot is not None:
            self.ring_writes[slot] = future
        while len(self.pending) > 4 * self.DEPTH:  # done futures, forgotten
            self.pending.popleft().result()

    def buffer(self) -> tuple[int, torch.Tensor]:
        """(slot, the next ring buffer), once its previous write is done."""
        slot = self.turn
        if self.ring_writes[slot] is not None:
            self.ring_writes[slot].result()
        self.turn = (slot + 1) % self.DEPTH
        return slot, self.ring[slot]

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> dict[Path, str]:
        """Waits for every write; returns each file's checksum."""
        try:
            self.drain()
        finally:
            for pool in self.pools:
                pool.shutdown(wait=True)
            for f in self.files:
                f.close()
        return {p: h.hexdigest() for p, h in zip(self.paths, self.hashes)}


def _copy(shard: Shard, lo: int, hi: int, writer: Writer) -> None:
    for a in range(lo, hi, COPY_BLOCK):
        b = min(a + COPY_BLOCK, hi)
        block = shard.raw(a, b)
        for j in range(len(writer.files)):
            writer.submit(j, block)
        writer.drain()  # before the pages are released and the view let go
        block.release()
        shard.release_bytes(a, b)


def _write_shard(shard: Shard, matched: set, keys, thresholds, budgets, kept, paths, bar):
    """One shard of every ratio's checkpoint: header and unpruned bytes copied, the matched
    tensors written chunk by chunk, pruned. Returns each file's checksum."""
    writer = Writer(paths)
    try:
        for j in range(len(paths)):
            writer.submit(j, shard.header_bytes)
        pos = shard.data_start
        for e in shard.entries:
            _copy(shard, pos, shard.data_start + e.begin, writer)
            if e.name not in matched:
                _copy(shard, shard.data_start + e.begin, shard.data_start + e.end, writer)
            else:
                for start in range(0, e.numel, CHUNK):
                    end = min(start + CHUNK, e.numel)
                    w = shard.view(e, start, end)
                    ks, extra = keys.keys(w)
                    for j, (T, _) in enumerate(thresholds):
                        keep, budgets[j] = keep_chunk(ks, None, T, budgets[j])
                        kept[j][e.name] = kept[j].get(e.name, 0) + count_true(keep)
                        slot, buffer = writer.buffer()
                        writer.submit(j, keys.prune(w, keep, extra, buffer), slot)
                    # The pruned chunks are copies (in the ring, or w * keep): the mapped
                    # pages can go while they are written.
                    shard.release(e, start, end)
                    bar.update(end - start)
            pos = shard.data_start + e.end
        _copy(shard, pos, shard.path.stat().st_size, writer)
    finally:
        digests = writer.close()
    return digests


def _folder(t: float) -> str:
    return f"t{t:g}"


def _check_space(ckpt: Checkpoint, out: Path, n_ratios: int) -> None:
    need = n_ratios * sum(f.stat().st_size for f in ckpt.files())
    free = shutil.disk_usage(next(p for p in (out, *out.absolute().parents) if p.exists())).free
    if need > free:
        raise OSError(
            28, f"not enough space for {n_ratios} pruned checkpoints: {need / 1e9:.2f} GB "
            f"needed, {free / 1e9:.2f} GB free", str(out)
        )  # fmt: skip


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _intact(folder: Path, record: dict | None) -> str | None:
    """None if every file `record` lists is in `folder` with its checksum, else what is wrong."""
    if record is None:
        return f"{folder.name}/{RECORD} is missing or unreadable"
    return store.folder_problem(folder, record.get("files"))


def _earlier(out: Path) -> dict[str, dict | None]:
    """The pruned folders an earlier command left in OUT, with their records."""
    if not out.is_dir():
        return {}
    return {p.name: _read_record(p) for p in sorted(out.glob("t*")) if p.is_dir()}


def _refuse_foreign(out: Path, earlier: dict, sha256: str, names: list[str]) -> None:
    for name, record in earlier.items():
        if record is None:
            continue
        source = record.get("checkpoint") or {}
        if source.get("sha256") != sha256 or record.get("tensors") != names:
            what = "another checkpoint" if source.get("sha256") != sha256 else "other tensors"
            raise BadInput(
                f"--out {out} holds {name} pruned from {what} ({source.get('path')}); give "
                "another --out, or remove that folder"
            )


def _write_index(ckpt: Checkpoint, folder: Path) -> str:
    """The output's index: the input's copied, or one written for shards that had none."""
    if ckpt.index_file is not None:
        shutil.copyfile(ckpt.index_file, folder / ckpt.index_file.name)
        return "copied"
    if len(ckpt.shards) > 1:
        weight_map = {e.name: s.path.name for s in ckpt.shards for e in s.entries}
        size = sum(e.end - e.begin for s in ckpt.shards for e in s.entries)
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return f"written ({INDEX}: the input's shards had no index)"
    return "none (one file)"


def stream_prune(
    checkpoint: Path,
    ratios,
    out: Path,
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    progress: bool | None = None,
) -> dict:
    """Prune `checkpoint` to each ratio t (total / kept matched weights); returns the summary
    also written to OUT/prune.json."""
    started = time.perf_counter()
    ckpt = Checkpoint(checkpoint)
    if not ckpt.is_safetensors:
        raise BadInput(
            f"{checkpoint}: streamed pruning reads safetensors; give --model and --dataset to "
            "prune a torch state dict in memory"
        )
    names = matched_tensors(ckpt, include, exclude)
    total = sum(ckpt.entries[n].numel for n in names)
    remaining = {t: target_remaining(total, t) for t in ratios}
    for t in ratios:
        if remaining[t] < 1:
            raise BadInput(f"ratio t={t:g} leaves no weight of {total}")
        if remaining[t] >= total:
            raise BadInput(f"ratio t={t:g} prunes no weight of {total}: give t >= "
                           f"{total / (total - 0.5):.7g}")  # fmt: skip
    out = outdir.check(Path(out), "prune", flag="--out")
    earlier = _earlier(out)
    # The checkpoint's sha256 names the input in every record. A rerun needs it first, to
    # refuse another input before touching anything; a first run hashes on a thread of its
    # own (hashlib releases the GIL: 4 GB, ~3 s, overlap the passes instead of following them).
    hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    digest = hasher.submit(ckpt.sha256)
    hasher.shutdown(wait=False)
    if earlier:
        _refuse_foreign(out, earlier, digest.result(), names)
    for stale in out.glob(".*.tmp"):  # a write of a command killed before it finished
        stale.unlink()
    repaired = {}
    todo = []
    for t in ratios:
        name = _folder(t)
        if name in earlier:
            problem = _intact(out / name, earlier[name])
            if problem is None:
                continue
            repaired[name] = problem
        todo.append(t)
    source = {"path": str(Path(checkpoint).resolve())}
    if todo:
        _check_space(ckpt, out, len(todo))
        source["sha256"] = None  # filled once the hash is done
        _prune(ckpt, names, total, todo, remaining, out, progress, digest, source,
               include, exclude)  # fmt: skip
    summary = _summary(out, names, total, include, exclude, ratios)
    summary.update(
        seconds=time.perf_counter() - started,
        pruned=[float(t) for t in todo],
        already=[float(t) for t in ratios if t not in todo],
        repaired=repaired,
    )
    store.write_json(out / RECORD, summary)
    return summary


def _prune(ckpt, names, total, ratios, remaining, out, progress, digest, source, include,
           exclude) -> None:  # fmt: skip
    keys = keys_for(ckpt, names)
    staging = out / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    disable = None if progress is None else not progress
    with tqdm(total=keys.passes * total, desc="stream-prune", unit="w", unit_scale=True,
              disable=disable) as bar:  # fmt: skip
        thresholds = keys.thresholds(ckpt, names, [total - remaining[t] for t in ratios], bar)
        out.mkdir(parents=True, exist_ok=True)
        outdir.mark(out, "prune")  # before the shards: a rerun after a kill may write here
        try:
            kept = [{} for _ in ratios]
            budgets = [r for _, r in thresholds]
            files = [{} for _ in ratios]
            for t in ratios:
                (staging / _folder(t)).mkdir(parents=True)
            matched = set(names)
            for shard in ckpt.shards:
                rel = shard.path.name
                paths = [staging / _folder(t) / rel for t in ratios]
                with shard:
                    digests = _write_shard(shard, matched, keys, thresholds, budgets, kept,
                                           paths, bar)  # fmt: skip
                for j in range(len(ratios)):
                    files[j][rel] = digests[paths[j]]
            source["sha256"] = digest.result()
            for j, t in enumerate(ratios):
                folder = staging / _folder(t)
                index = _write_index(ckpt, folder)
                ckpt.copy_other_files(folder)
                files[j] = store.file_digests(folder, known=files[j])
                T, _ = thresholds[j]
                record = {
                    "rdfast": __version__,
                    "checkpoint": source,
                    "strategy": "mp (global magnitude)",
                    "include": list(include),
                    "exclude": list(exclude),
                    "tensors": names,
                    "total": total,
                    "t": float(t),
                    "remaining": sum(kept[j].values()),
                    "threshold": keys.value(T),
                    "kept": {n: kept[j].get(n, 0) for n in names},
                    "index": index,
                    "files": files[j],
                }
                store.write_json(folder / RECORD, record)
                final = out / _folder(t)
                if final.exists():  # a damaged folder of this same input, checked above
                    shutil.rmtree(final)
                folder.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _summary(out: Path, names, total, include, exclude, ratios) -> dict:
    """OUT/prune.json: every pruned folder in OUT (those of this command first)."""
    records = _earlier(out)
    order = [_folder(t) for t in ratios] + sorted(set(records) - {_folder(t) for t in ratios})
    entries = []
    source = None
    for name in order:
        r = records.get(name)
        if r is None:
            continue
        source = source or r["checkpoint"]
        entries.append({
            "t": r["t"], "folder": name, "path": str(out / name), "remaining": r["remaining"],
            "threshold": r["threshold"], "kept": r["kept"],
        })  # fmt: skip
    return {
        "checkpoint": source,
        "include": list(include),
        "exclude": list(exclude),
        "tensors": names,
        "total": total,
        "ratios": entries,
    }
