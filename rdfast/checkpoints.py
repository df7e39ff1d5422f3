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
                if n > size - 8:
                    raise ValueError("header longer than the file")
                self.header_bytes = head + f.read(n)
            header = json.loads(self.header_bytes[8:])
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInput(f"{self.path}: not a safetensors file ({e})") from None
        except OSError as e:
            raise BadInput(f"cannot read {self.path}: {e.strerror or e}") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None)
        self.entries = []
        for name, h in header.items():
            if h.get("dtype") not in DTYPES:
                raise BadInput(
                    f"{self.path}: tensor {name} has dtype {h.get('dtype')}, unsupported"
                )
            begin, end = h["data_offsets"]
            entry = Entry(name, self.path, h["dtype"], tuple(h["shape"]), begin, end)
            itemsize = torch.empty(0, dtype=DTYPES[entry.dtype]).element_size()
            if end - begin != entry.numel * itemsize or self.data_start + end > size:
                raise BadInput(f"{self.path}: tensor {name} does not fit its byte range")
            self.entries.append(entry)
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
        try:
            index = json.loads(self.index_file.read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{self.index_file}: not a safetensors index ({e})") from None
        files = [self.path / f for f in dict.fromkeys(sorted(set(weight_map.values())))]
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
