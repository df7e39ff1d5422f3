"""Small datasets written in the official on-disk formats, so the real loading code runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        batch = {
            b"data": _images(rng, per_batch),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"batch_label": f"training batch {i} of 5".encode(),
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": _images(rng, n_test), b"labels": (np.arange(n_test) % 10).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = (np.arange(n) % 100) if name == "test" else rng.integers(0, 100, n)
        d = {
            b"data": _images(rng, n),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (np.asarray(fine) // 5).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {
        b"fine_label_names": [f"class{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_svhn(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # 1..10, 10 meaning the digit 0
        savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
    return folder


def write_image_tree(
    path: Path,
    classes=("cat", "dog", "owl"),
    per_class: int = 6,
    size: int = 12,
    split: bool = False,
    fmt: str = "png",
    seed: int = 0,
):
    from PIL import Image

    rng = np.random.default_rng(seed)
    roots = [Path(path) / "train", Path(path) / "test"] if split else [Path(path)]
    for root in roots:
        for c in classes:
            (root / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / c / f"{i}.{fmt}")
    return Path(path)


def read_cifar10_test(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split of `write_cifar10`'s files as N x 3 x 32 x 32 uint8 images and labels,
    read here with pickle alone."""
    with open(Path(root) / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(batch[b"labels"])
