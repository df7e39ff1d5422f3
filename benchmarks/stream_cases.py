"""Cases of the streamed-pruning benchmark, each run in a fresh process so that its peak RSS
(VmHWM) is its own. Prints one JSON line: seconds (the work, imports excluded) and
peak_rss_mb (the whole process, `import torch` included).

    python -m benchmarks.stream_cases write CKPT WEIGHTS [DTYPE]   a synthetic checkpoint
                                                        (float32, bfloat16 or float16)
    python -m benchmarks.stream_cases CASE CKPT OUT RATIOS [cold]   one case, e.g. rdfast 2,4,8
                                                        (cold: the checkpoint evicted from the
                                                        page cache first)

The checkpoint: 8 shards (fp32 unless DTYPE says otherwise) as Hugging Face writes them (an
index and model-0000i-of-00008.safetensors), each 7 weight matrices of R x 4360 and one bias; R is
chosen so the matrices hold WEIGHTS values (R = 4096 for 1e9).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks.memory import peak_rss_mb

SHARDS, MATRICES, COLUMNS = 8, 7, 4360
BLOCK = 1 << 24  # bytes a read/write of the I/O floor moves at a time


def write_checkpoint(folder: Path, weights: float, dtype: str = "float32") -> int:
    """The synthetic checkpoint; returns its number of matrix weights."""
    import torch
    from safetensors.torch import save_file

    rows = max(1, round(weights / (SHARDS * MATRICES * COLUMNS)))
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for s in range(SHARDS):
        file = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {
            f"layers.{s}.proj{j}.weight": torch.randn(rows, COLUMNS, generator=gen).to(
                getattr(torch, dtype)
            )
            for j in range(MATRICES)
        }
        tensors[f"layers.{s}.norm.bias"] = torch.randn(rows, generator=gen).to(
            getattr(torch, dtype)
        )
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return rows * COLUMNS * SHARDS * MATRICES


def _shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def io_floor(ckpt: Path, out: Path, ratios) -> None:
    """What any pruning of the checkpoint must do at least: read every byte once and write
    one copy of it per ratio (plain Python reads and writes of 16 MiB blocks)."""
    folders = [out / f"t{t:g}" for t in ratios]
    for f in folders:
        f.mkdir(parents=True)
    for shard in _shards(ckpt):
        outs = [open(f / shard.name, "wb") for f in folders]
        with open(shard, "rb") as src:
            while block := src.read(BLOCK):
                for o in outs:
                    o.write(block)
        for o in outs:
            o.close()


def rdfast(ckpt: Path, out: Path, ratios) -> None:
    from rdfast.pruning.streaming import stream_prune

    stream_prune(ckpt, ratios, out, progress=False)


def _matrices(ckpt: Path, framework: str):
    if framework == "numpy":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    out = []
    for shard in _shards(ckpt):
        out += [v for k, v in load_file(str(shard)).items() if k.endswith(".weight")]
    return out


def torch_kthvalue(ckpt: Path, out: Path, ratios) -> None:
    """The model loaded, the magnitudes concatenated, torch.kthvalue per ratio."""
    import torch

    ws = _matrices(ckpt, "torch")
    flat = torch.cat([w.abs().reshape(-1) for w in ws])
    for t in ratios:
        torch.kthvalue(flat, flat.numel() - round(flat.numel() / t))


def numpy_sort(ckpt: Path, out: Path, ratios) -> None:
    """The authors' way: np.sort of the concatenated magnitudes, thresholds read off it."""
    import numpy as np

    ws = _matrices(ckpt, "numpy")
    ordered = np.sort(np.concatenate([np.abs(w).reshape(-1) for w in ws]))
    for t in ratios:
        _ = ordered[ordered.size - round(ordered.size / t) - 1]


def torch_global_unstructured(ckpt: Path, out: Path, ratios) -> None:
    """torch.nn.utils.prune.global_unstructured (L1) on the loaded model, once per ratio
    (its amount counts the weights to remove, from the masks of the step before: one-shot
    ratios need prune.remove in between)."""
    from torch import nn
    from torch.nn.utils import prune

    modules = []
    for w in _matrices(ckpt, "torch"):
        m = nn.Module()
        m.weight = nn.Parameter(w, requires_grad=False)
        modules.append(m)
    total = sum(m.weight.numel() for m in modules)
    for t in ratios:
        params = [(m, "weight") for m in modules]
        prune.global_unstructured(
            params, pruning_method=prune.L1Unstructured, amount=total - round(total / t)
        )
        for m in modules:
            prune.remove(m, "weight")


CASES = {
    "io_floor": io_floor,
    "rdfast": rdfast,
    "torch_kthvalue": torch_kthvalue,
    "numpy_sort": numpy_sort,
    "torch_global_unstructured": torch_global_unstructured,
}


def main(argv) -> None:
    import torch

    torch.set_num_threads(2)
    if argv[0] == "write":
        weights = write_checkpoint(Path(argv[1]), float(argv[2]), *argv[3:4])
        print(json.dumps({"weights": weights}))
        return
    case, ckpt, out = argv[0], Path(argv[1]), Path(argv[2])
    ratios = [float(t) for t in argv[3].split(",")]
    cold = len(argv) > 4 and argv[4] == "cold"
    os.sync()  # the previous case's dirty pages written back first, outside the timing
    if cold:  # the checkpoint's pages out of the page cache: every case reads it from disk
        for f in ckpt.iterdir():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    fn = CASES[case]
    import safetensors.torch  # noqa: F401

    import rdfast.pruning.streaming  # noqa: F401  imports outside the timed part, for every case

    start = time.perf_counter()
    fn(ckpt, out, ratios)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}))


if __name__ == "__main__":
    main(sys.argv[1:])
