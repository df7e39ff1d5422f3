"""Checkpoints users bring: safetensors files, sharded safetensors folders, torch state dicts.

    model.safetensors                       one file
    DIR/model.safetensors.index.json        shards as Hugging Face writes them: the index's
    DIR/model-00001-of-00008.safetensors    `weight_map` names each tensor's shard
    model.pt / .pth / .bin                  a torch state dict, read with weights_only=True

A model that fits is read whole by the safetensors library; streamed pruning reads shards
through memory maps chunk by chunk, releasing the pages as it goes (which the library cannot),
so a checkpoint is never held whole. The format is an 8-byte little-endian header length, a JSON
header (per tensor: dtype, shape, byte offsets into the data that follows) and the data.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rdfast.errors import BadInput

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOATING = ("F64", "F32", "F16", "BF16")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: where its bytes lie, relative to the shard's data."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING


MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit


def _entries(path: Path, header, data_size: int) -> list[Entry]:
    """The tensors of a parsed header, checked by the safetensors format's rules before a
    byte of data is used: a JSON object of tensors, each with a known dtype, a shape of
    non-negative integers and data_offsets [begin, end] of exactly its size, inside the data
    and the tensors covering the data end to end; __metadata__ a table of strings."""

    def bad(why: str):
        return BadInput(f"{path}: not a safetensors file ({why})")

    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map names to strings")
    entries = []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(h, dict):
            raise bad(f"tensor {name} is a {type(h).__name__}, not an object")
        dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if dtype not in DTYPES:
            raise BadInput(f"{path}: tensor {name} has dtype {dtype}, unsupported")
        if not _naturals(shape):
            raise bad(f"tensor {name}: shape must be a list of integers >= 0, got {shape!r}")
        if not _naturals(offsets) or len(offsets) != 2 or offsets[1] < offsets[0]:
            raise bad(f"tensor {name}: data_offsets must be [begin, end], integers with "
                      f"0 <= begin <= end, got {offsets!r}")  # fmt: skip
        entry = Entry(name, path, dtype, tuple(shape), offsets[0], offsets[1])
        itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if entry.end - entry.begin != entry.numel * itemsize or entry.end > data_size:
            raise BadInput(f"{path}: tensor {name} does not fit its byte range")
        entries.append(entry)
    # As the library reads it: in offset order, each tensor starts where the one before ends
    # (no gap, no overlap) and the last ends where the file does.
    at, before = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != at:
            what = f"{before} and {e.name} overlap" if e.begin < at else f"a gap before {e.name}"
            raise bad(f"byte ranges: {what}" if before else f"{e.name} does not start the data")
        at, before = e.end, e.name
    if at != data_size:
        raise bad(f"{data_size - at} bytes after the last tensor: the data is not fully covered")
    return entries


def _naturals(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
    )


class Shard:
    """One safetensors file: its header, and its tensors read through a memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError("shorter than a header")
                (n,) = struct.unpack("<Q", head)
                size = self.path.stat().st_size
                if n > min(size - 8, MAX_HEADER):
                    raise ValueError("header longer than the file or than 100 MB")
                self.header_bytes = head + f.read(n)
            header = json.loads(self.header_bytes[8:])
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else e
            raise BadInput(f"{self.path}: not a safetensors file ({reason})") from None
        except OSError as e:
            raise BadInput(f"cannot read {self.path}: {e.strerror or e}") from None
        self.data_start = 8 + n
        self.entries = _entries(self.path, header, size - self.data_start)
        self.entries.sort(key=lambda e: e.begin)  # file order: the order chunks are read
        self._map = None

    def __enter__(self):
        with open(self.path, "rb") as f:
            # ACCESS_COPY: a private mapping torch may view without a read-only warning;
            # nothing is ever written to it.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self

    def __exit__(self, *exc):
        self._map.close()
        self._map = None

    def view(self, e: Entry, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Flat elements [start, end) of tensor `e`, a view of the mapped file (no copy)."""
        dtype = DTYPES[e.dtype]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        end = e.numel if end is None else end
        return torch.frombuffer(
            self._map,
            dtype=dtype,
            count=end - start,
            offset=self.data_start + e.begin + start * itemsize,
        )

    def release(self, e: Entry, start: int, end: int) -> None:
        """Drop the pages of elements [start, end) of `e` from this process's resident memory
        (they stay in the page cache): RSS stays at a chunk, not at the shard."""
        itemsize = (e.end - e.begin) // max(e.numel, 1)
        base = self.data_start + e.begin
        self.release_bytes(base + start * itemsize, base + end * itemsize)

    def release_bytes(self, lo: int, hi: int) -> None:
        page = mmap.PAGESIZE
        lo, hi = lo // page * page, min(-(-hi // page) * page, len(self._map))
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def raw(self, lo: int, hi: int) -> memoryview:
        """Bytes [lo, hi) of the file."""
        return memoryview(self._map)[lo:hi]


class Checkpoint:
    """A checkpoint on disk: its files and, for safetensors, every tensor's entry."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise BadInput(f"checkpoint {self.path} does not exist")
        self.index_file: Path | None = None
        if self.path.is_dir():
            indexes = sorted(self.path.glob("*.safetensors.index.json"))
            if len(indexes) > 1:
                raise BadInput(f"{self.path} holds several indexes: {indexes[0].name}, ...")
            if indexes:
                self.index_file = indexes[0]
                files = self._indexed_files()
            else:
                files = sorted(self.path.glob("*.safetensors"))
                if not files:
                    raise BadInput(f"{self.path} holds no *.safetensors file")
                for f in files:
                    _check_inside(self.path, f.name, self.path)
        elif self.path.suffix == ".safetensors":
            files = [self.path]
        elif self.path.suffix in TORCH_SUFFIXES:
            files = []
        else:
            raise BadInput(
                f"{self.path}: give a .safetensors file, a folder of shards, or a torch state "
                f"dict ({', '.join(TORCH_SUFFIXES)})"
            )
        self.shards = [Shard(f) for f in files]
        self.entries = {}
        for s in self.shards:
            for e in s.entries:
                if e.name in self.entries:
                    raise BadInput(f"tensor {e.name} is in both {self.entries[e.name].file.name} "
                                   f"and {e.file.name}")  # fmt: skip
                self.entries[e.name] = e

    @property
    def is_safetensors(self) -> bool:
        return bool(self.shards)

    def _indexed_files(self) -> list[Path]:
        """The shards the index names, each a file of this folder (untrusted input: a name
        with a path, or a link out of the folder, is refused before anything is opened)."""
        try:
            index = json.loads(self.index_file.read_text())
        except (OSError, ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else e
            raise BadInput(f"{self.index_file}: not a safetensors index ({why})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise BadInput(f"{self.index_file}: not a safetensors index (its weight_map must "
                           "map tensor names to shard file names)")  # fmt: skip
        files = [self.path / f for f in sorted(set(weight_map.values()))]
        for name in sorted(set(weight_map.values())):
            _check_inside(self.path, name, self.index_file)
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise BadInput(f"{self.index_file} names missing shards: {', '.join(missing[:3])}")
        return files

    def files(self) -> list[Path]:
        """Every file that makes the checkpoint (the index first)."""
        if not self.is_safetensors:
            return [self.path]
        return ([self.index_file] if self.index_file else []) + [s.path for s in self.shards]

    def other_files(self) -> list[Path]:
        """Every file of the checkpoint's folder that is not a weight file (config, generation
        config, tokenizer, model card, ...), relative to the folder; hidden files and folders
        are left out. A pruned copy of the model needs them to load where the input loads."""
        if not self.path.is_dir():
            return []
        weights = {f.resolve() for f in self.files()}
        other = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if p.resolve() not in weights:
                other.append(rel)
        return other

    def copy_other_files(self, folder: Path) -> None:
        """`other_files()` copied into `folder`, at the same relative paths."""
        import shutil

        for rel in self.other_files():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.path / rel, folder / rel)

    def sha256(self) -> str:
        """Of the file, or of the index and shards (names and contents, in order)."""
        h = hashlib.sha256()
        files = self.files()
        for f in files:
            if len(files) > 1:
                h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, in memory (a model that fits)."""
        if not self.is_safetensors:
            return _torch_state_dict(self.path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        out = {}
        for s in self.shards:  # headers already checked by Shard: the library reads the rest
            try:
                out.update(load_file(str(s.path)))
            except (OSError, SafetensorError) as e:
                raise BadInput(f"cannot read {s.path}: {e}") from None
        return out

    def chunks(self, names, chunk: int) -> Iterator[tuple[int, Shard, Entry, int, int]]:
        """(tensor position, shard, entry, start, end) over the tensors `names` in the
        checkpoint's order (shards in order, tensors in file order), `chunk` elements at a
        time; the shard is open (mapped) while its chunks are handed out."""
        wanted = set(names)
        position = {n: i for i, n in enumerate(self.ordered(names))}
        for s in self.shards:
            mine = [e for e in s.entries if e.name in wanted]
            if not mine:
                continue
            with s:
                for e in mine:
                    for start in range(0, e.numel, chunk):
                        yield position[e.name], s, e, start, min(start + chunk, e.numel)

    def ordered(self, names) -> list[str]:
        """`names` in the checkpoint's order: shards in order, tensors in file order."""
        wanted = set(names)
        return [e.name for s in self.shards for e in s.entries if e.name in wanted]


def _check_inside(folder: Path, name: str, index: Path) -> None:
    """A shard named by an index must be a file of `folder`: a plain file name (no folder
    part, no ..), that resolves inside the folder -- or, in the Hugging Face hub cache's
    layout (snapshots/REV/NAME -> ../../blobs/HASH), inside that repository's blobs."""
    where = f"{index}: shard {name!r}"
    if not name or name != Path(name).name or name in (".", ".."):
        raise BadInput(f"{where} is not a file name of the checkpoint's folder")
    target = (folder / name).resolve()
    home = folder.resolve()
    inside = target.parent == home
    if not inside and home.parent.name == "snapshots":
        inside = target.parent == home.parent.parent / "blobs"
    if not inside:
        raise BadInput(f"{where} leads out of the checkpoint's folder (to {target})")


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise BadInput(
            f"{path}: refused by torch.load(weights_only=True): {first[:160]}; save the "
            "model's state_dict() (or convert it to safetensors)"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise BadInput(f"cannot read {path} as a torch checkpoint: {str(e)[:160]}") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"{path} does not hold a state dict of tensors")
    prefix = "module."  # saved from DistributedDataParallel
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj
