"""Global magnitude pruning of a safetensors checkpoint, streamed shard by shard.

Nothing but a chunk of weights is ever in memory: two reads of the matched tensors give the
histograms of the 16/16-bit radix select (`rdfast.kernels.selection.select_thresholds`),
the thresholds of every ratio at once; a third read writes the pruned checkpoint of every
ratio. Ties at a threshold go in checkpoint order (shards in order, tensors in file order,
then flat index), so the result is, bit for bit, a stable sort of the concatenated
magnitudes -- and the masks of the ratios are nested.

    OUT/t2/, OUT/t4/, ...   one pruned checkpoint per ratio, shaped like the input: the same
                            files, headers and index; pruned weights are zero (w * 0)
    OUT/prune.json          the input (path, sha256), the tensors pruned, and per ratio the
                            threshold, the weights kept in all and per tensor

Written under OUT/.partial and moved into place when complete: a failed or killed command
leaves no pruned shard behind (the next command clears OUT/.partial).
"""

from __future__ import annotations

import fnmatch
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rdfast import outdir, store
from rdfast.checkpoints import Checkpoint, Shard
from rdfast.errors import BadInput
from rdfast.kernels.selection import (
    NaNScoreError,
    _key_to_float,
    keep_chunk,
    select_thresholds,
)
from rdfast.pruning import target_remaining

# 2^20 elements (4 MiB of fp32) a chunk: 1e9 weights are ~950 chunks a pass, so the per-chunk
# Python cost stays under a second, and a chunk's scores and keys stay a few MiB.
CHUNK = 1 << 20
COPY_BLOCK = 1 << 24  # bytes of an unpruned tensor copied at a time


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
    """The matched tensors as the selection reads them, chunk by chunk from the maps: the
    int32 bits of their fp32 values (fp16/bf16 widened), scored by magnitude (`abs_bits`:
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


def _copy(shard: Shard, lo: int, hi: int, files) -> None:
    for a in range(lo, hi, COPY_BLOCK):
        b = min(a + COPY_BLOCK, hi)
        block = shard.raw(a, b)
        for f in files:
            f.write(block)
        block.release()
        shard.release_bytes(a, b)


def _write_shard(shard: Shard, matched: set, thresholds, budgets, kept, paths, bar) -> None:
    """One shard of every ratio's checkpoint: header and unpruned bytes copied, the matched
    tensors written chunk by chunk as w * keep."""
    files = [open(p, "wb") for p in paths]
    buffer = torch.empty(CHUNK, dtype=torch.float32)  # the pruned chunk, written and reused
    try:
        for f in files:
            f.write(shard.header_bytes)
        pos = shard.data_start
        for e in shard.entries:
            _copy(shard, pos, shard.data_start + e.begin, files)
            if e.name not in matched:
                _copy(shard, shard.data_start + e.begin, shard.data_start + e.end, files)
            else:
                for start in range(0, e.numel, CHUNK):
                    end = min(start + CHUNK, e.numel)
                    w = shard.view(e, start, end)
                    ks = magnitude_keys(w)
                    out = buffer[: end - start] if w.dtype == buffer.dtype else None
                    for j, (T, _) in enumerate(thresholds):
                        keep, budgets[j] = keep_chunk(ks, None, T, budgets[j])
                        n_kept = int(torch.count_nonzero(keep))
                        kept[j][e.name] = kept[j].get(e.name, 0) + n_kept
                        # w * keep, as an in-memory prune zeroes (w * 0: -0.0 stays -0.0)
                        pruned = torch.mul(w, keep, out=out) if out is not None else w * keep
                        files[j].write(pruned.view(torch.uint8).numpy())
                    shard.release(e, start, end)
                    bar.update(end - start)
            pos = shard.data_start + e.end
        _copy(shard, pos, shard.path.stat().st_size, files)
    finally:
        for f in files:
            f.close()


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
    remaining = [target_remaining(total, t) for t in ratios]
    if min(remaining) < 1:
        raise BadInput(f"ratio t={max(ratios):g} leaves no weight of {total}")
    out = outdir.check(Path(out), "prune", flag="--out")
    _check_space(ckpt, out, len(ratios))
    # The checkpoint's sha256 (for prune.json) on a thread of its own: hashlib releases the
    # GIL, so hashing 4 GB (~4 s on one core) overlaps the passes instead of following them.
    hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    digest = hasher.submit(ckpt.sha256)
    hasher.shutdown(wait=False)
    staging = out / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    disable = None if progress is None else not progress
    with tqdm(
        total=3 * total, desc="stream-prune", unit="w", unit_scale=True, disable=disable
    ) as bar:
        try:
            thresholds = select_thresholds(
                _Magnitudes(ckpt, names, bar), [total - r for r in remaining], names
            )
        except NaNScoreError as e:
            raise BadInput(f"{checkpoint}: {e}") from None
        out.mkdir(parents=True, exist_ok=True)
        outdir.mark(out, "prune")  # before the shards: a rerun after a kill may write here
        try:
            kept = [{} for _ in ratios]
            budgets = [r for _, r in thresholds]
            for t in ratios:
                (staging / _folder(t)).mkdir(parents=True)
            matched = set(names)
            for shard in ckpt.shards:
                paths = [staging / _folder(t) / shard.path.name for t in ratios]
                with shard:
                    _write_shard(shard, matched, thresholds, budgets, kept, paths, bar)
            for t in ratios:
                if ckpt.index_file is not None:
                    shutil.copyfile(ckpt.index_file, staging / _folder(t) / ckpt.index_file.name)
                final = out / _folder(t)
                if final.exists():
                    shutil.rmtree(final)
                (staging / _folder(t)).rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": digest.result()},
        "include": list(include),
        "exclude": list(exclude),
        "tensors": names,
        "total": total,
        "ratios": [
            {
                "t": float(t),
                "folder": _folder(t),
                "path": str(out / _folder(t)),
                "remaining": sum(kept[j].values()),
                "threshold": float(_key_to_float(thresholds[j][0])),
                "kept": {n: kept[j].get(n, 0) for n in names},
            }
            for j, t in enumerate(ratios)
        ],
        "seconds": time.perf_counter() - started,
    }
    store.write_json(out / "prune.json", summary)
    return summary
