"""The built-in datasets: one registry entry each (see `rdfast.data` for the machinery).

Files in the official on-disk formats are read by a thin layer of our own, so that a subset,
a relabelled copy or a test fixture loads too -- with a warning when its checksum is not the
official one -- while torchvision keeps the downloading (and checks what it downloads).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rdfast.data.registry import AUGMENTATIONS, Option, Raw, register_dataset
from rdfast.errors import BadInput, DataMissing, DataWarning
from rdfast.runs import store


def offline() -> bool:
    return os.environ.get("RDFAST_OFFLINE", "") not in ("", "0")


def _digest(path: Path, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_official(folder: Path, files: dict[str, str], what: str, algorithm="md5") -> None:
    """Warn once, naming the files, when they are not the official archive's."""
    differ = [name for name, want in files.items() if _digest(folder / name, algorithm) != want]
    if differ:
        warnings.warn(
            f"{what} files in {folder} differ from the official archive ({', '.join(differ)}): "
            "a subset, a modified copy or a test fixture; results are not comparable with "
            "published ones",
            DataWarning,
            stacklevel=2,
        )


def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _fetch(download, folder: Path, files, what: str, archive: str) -> None:
    """Files missing: download through torchvision when the network allows, else explain."""
    missing = [f for f in files if not (folder / f).exists()]
    if not missing:
        return
    reason = "RDFAST_OFFLINE is set"
    if not offline():
        try:
            download()
            if all((folder / f).exists() for f in files):
                return
            reason = "the download did not produce them"
        except Exception as e:  # torchvision raises URLError, RuntimeError, OSError here
            reason = _reason(e)
    raise DataMissing(
        f"{what} files not found in {folder} (expected {', '.join(missing)}, from the official "
        f"archive {archive}) and download failed: {reason}"
    )


# --------------------------------------------------------------------------- small, built in


@register_dataset(
    "digits", "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); offline"
)
def _digits(root):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # A fixed stratified split: 70 % train (1,257), 30 % test (540, 54 per class).
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)

    def as_img(a):
        return torch.from_numpy(a.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)

    names = [str(i) for i in range(10)]
    return Raw(as_img(x_tr), torch.from_numpy(y_tr), as_img(x_te), torch.from_numpy(y_te), names)


@register_dataset(
    "synthetic",
    "seeded Gaussian mixture: one isotropic Gaussian per class; difficulty set by sep",
    options={
        "classes": Option(int, 10, "number of classes"),
        "dim": Option(int, 32, "input dimension"),
        "n_train": Option(int, 2000, "training examples (balanced over classes)"),
        "n_test": Option(int, 1000, "test examples (balanced over classes)"),
        "sep": Option(float, 3.0, "typical distance between class means, in noise std units"),
        "seed": Option(int, 0, "seed of the data (fixed across model seeds)"),
    },
)
def _synthetic(root, classes, dim, n_train, n_test, sep, seed):
    if classes < 2 or dim < 1 or n_train < classes or n_test < classes or sep < 0:
        raise BadInput(
            "synthetic needs classes >= 2, dim >= 1, n_train and n_test >= classes, sep >= 0"
        )
    g = torch.Generator().manual_seed(seed)
    # E||mu_i - mu_j|| ~= sqrt(2 * dim) * scale, so this scale puts the means `sep` apart.
    means = torch.randn(classes, dim, generator=g) * (sep / (2 * dim) ** 0.5)

    def draw(n):
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
        return means[y] + torch.randn(n, dim, generator=g), y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Raw(x_tr, y_tr, x_te, y_te, [str(i) for i in range(classes)])


# --------------------------------------------------------------------------- MNIST family

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# SHA-256 of the official MNIST idx files, uncompressed (the gz archives torchvision checks
# have other digests). Fashion-MNIST's copy here is re-split: no official digests to hold it to.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # ubyte data, 3 dimensions / 1 dimension


def _check_idx_headers(raw: Path) -> None:
    for name in _MNIST_FILES:
        path = raw / name
        with open(path, "rb") as f:
            head = f.read(4)
        want = IDX_MAGIC["images" if "images" in name else "labels"]
        got = int.from_bytes(head, "big") if len(head) == 4 else None
        if got != want:
            kind = name.split("-")[1]
            raise BadInput(f"{path}: not an idx {kind} file (magic {got}, want {want})")


def _torchvision_mnist(cls, folder, root):
    raw = Path(root) / folder / "raw"

    def download():
        cls(str(root), train=True, download=True)

    _fetch(download, raw, _MNIST_FILES, folder, f"{folder}'s four idx files")
    _check_idx_headers(raw)
    if folder == "MNIST":
        _check_official(raw, MNIST_SHA256, "MNIST", algorithm="sha256")
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except Exception as e:
        raise BadInput(f"{folder} files in {raw} could not be read: {_reason(e)}") from None
    return Raw(
        train.data.unsqueeze(1),
        train.targets,
        test.data.unsqueeze(1),
        test.targets,
        list(train.classes),
    )


def _mnist_family(name: str, folder: str, description: str) -> None:
    """Register a torchvision dataset of the MNIST idx format (its class is named `folder`)."""

    @register_dataset(name, description, files=tuple(f"{folder}/raw/{f}" for f in _MNIST_FILES))
    def load(root):
        import torchvision.datasets

        return _torchvision_mnist(getattr(torchvision.datasets, folder), folder, root)


_mnist_family(
    "mnist", "MNIST", "MNIST handwritten digits (60,000 / 10,000, 28x28) through torchvision"
)
_mnist_family(
    "fashion-mnist",
    "FashionMNIST",
    "Fashion-MNIST clothing images (60,000 / 10,000, 28x28) through torchvision",
)


# --------------------------------------------------------------------------- CIFAR

CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR100_FILES = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python files hold dicts of numpy arrays, lists and strings; any other global a
    pickle names (os.system, say) is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file never needs")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="bytes").load()
    except Exception as e:
        raise BadInput(f"{path}: not a CIFAR pickle ({_reason(e)})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: not a CIFAR pickle (holds a {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int):
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise BadInput(f"{path}: missing the keys 'data' and {label_key!r}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise BadInput(f"{path}: 'data' must be N x 3072 uint8, got {data.shape} {data.dtype}")
    if (
        labels.shape != (data.shape[0],)
        or labels.min(initial=0) < 0
        or labels.max(initial=0) >= num_classes
    ):
        raise BadInput(
            f"{path}: {label_key!r} must hold {data.shape[0]} labels in 0..{num_classes - 1}"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(
        labels.astype(np.int64)
    )


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps what, as unpacked from its official archive."""

    what: str
    folder: str
    archive: str
    files: dict[str, str]  # name -> md5 of the official file
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


CIFAR10 = CifarLayout(
    "CIFAR-10",
    "cifar-10-batches-py",
    "cifar-10-python.tar.gz",
    CIFAR10_FILES,
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    "labels",
    "label_names",
    10,
)
CIFAR100 = CifarLayout(
    "CIFAR-100",
    "cifar-100-python",
    "cifar-100-python.tar.gz",
    CIFAR100_FILES,
    ("train",),
    "test",
    "meta",
    "fine_labels",
    "fine_label_names",
    100,
)


def _cifar(root, layout: CifarLayout, tv_class):
    folder = Path(root) / layout.folder
    _fetch(
        lambda: tv_class(str(root), train=True, download=True),
        folder,
        list(layout.files),
        layout.what,
        layout.archive,
    )
    _check_official(folder, layout.files, layout.what)
    parts = [
        _cifar_batch(folder / f, layout.label_key, layout.num_classes) for f in layout.train_files
    ]
    x_te, y_te = _cifar_batch(folder / layout.test_file, layout.label_key, layout.num_classes)
    meta = _unpickle(folder / layout.meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(layout.names_key, [])]
    if len(names) != layout.num_classes:
        raise BadInput(
            f"{folder / layout.meta_file}: {layout.names_key!r} must list "
            f"{layout.num_classes} names"
        )
    return Raw(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        x_te,
        y_te,
        names,
        augment="crop-flip",
    )


@register_dataset(
    "cifar10",
    "CIFAR-10 (50,000 / 10,000 32x32 colour images, 10 classes); crop + flip augmentation",
    files=tuple(f"{CIFAR10.folder}/{f}" for f in CIFAR10_FILES),
)
def _cifar10(root):
    from torchvision import datasets

    return _cifar(root, CIFAR10, datasets.CIFAR10)


@register_dataset(
    "cifar100",
    "CIFAR-100 (50,000 / 10,000 32x32 colour images, 100 classes); crop + flip augmentation",
    files=tuple(f"{CIFAR100.folder}/{f}" for f in CIFAR100_FILES),
)
def _cifar100(root):
    from torchvision import datasets

    return _cifar(root, CIFAR100, datasets.CIFAR100)


# --------------------------------------------------------------------------- SVHN

SVHN_FILES = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}


def _svhn_split(path: Path):
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as e:
        raise BadInput(f"{path}: not a MATLAB .mat file ({_reason(e)})") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise BadInput(f"{path}: expected 'X' of shape 32 x 32 x 3 x N and 'y'")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3] or y.min(initial=1) < 1 or y.max(initial=1) > 10:
        raise BadInput(f"{path}: 'y' must hold {x.shape[3]} labels in 1..10")
    # The official files label the digit 0 as 10.
    y[y == 10] = 0
    return torch.from_numpy(
        np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8)
    ), torch.from_numpy(y)


@register_dataset(
    "svhn",
    "SVHN house numbers (73,257 / 26,032 32x32 colour images, 10 classes); crop augmentation",
    files=tuple(f"svhn/{f}" for f in SVHN_FILES),
)
def _svhn(root):
    from torchvision.datasets import SVHN

    folder = Path(root) / "svhn"

    def download():
        for split in ("train", "test"):
            SVHN(str(folder), split=split, download=True)

    _fetch(download, folder, list(SVHN_FILES), "SVHN", "train_32x32.mat and test_32x32.mat")
    _check_official(folder, SVHN_FILES, "SVHN")
    x_tr, y_tr = _svhn_split(folder / "train_32x32.mat")
    x_te, y_te = _svhn_split(folder / "test_32x32.mat")
    # No flips: mirrored digits are other symbols.
    return Raw(x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)], augment="crop")


# --------------------------------------------------------------------------- image folders


def _file_list(folder: Path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = Path(dirpath) / name
            st = p.stat()
            out.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _decode_tree(folder: Path, size: int):
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    try:
        tree = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as e:
        raise BadInput(f"{folder}: not an image tree of <class>/<image> ({_reason(e)})") from None
    images, labels = [], []
    for path, label in tree.samples:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size:
                    im = im.resize((size, size), Image.BILINEAR)
                images.append(pil_to_tensor(im))
        except (UnidentifiedImageError, OSError) as e:
            raise BadInput(f"{path}: cannot decode the image ({_reason(e)})") from None
        labels.append(label)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise BadInput(f"{folder}: images differ in size ({len(shapes)} shapes); give size=N")
    return torch.stack(images), torch.tensor(labels), list(tree.classes)


@register_dataset(
    "imagefolder",
    "any tree PATH/{train,test}/<class>/<image> or PATH/<class>/<image>, decoded once and cached",
    options={
        "path": Option(str, "", "the image tree"),
        "size": Option(int, 0, "resize every image to size x size (0 = keep; all must match)"),
        "test_frac": Option(float, 0.2, "test fraction of a tree without train/test folders"),
        "seed": Option(int, 0, "seed of that split"),
        "augment": Option(str, "crop-flip", "training augmentation: none, crop, crop-flip"),
    },
    positional="path",
)
def _imagefolder(root, path, size, test_frac, seed, augment):
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise BadInput(f"imagefolder: {folder} is not a directory")
    if augment not in AUGMENTATIONS:
        raise BadInput(f"imagefolder augment must be one of {', '.join(AUGMENTATIONS)}")
    if size < 0 or not 0 < test_frac < 1:
        raise BadInput("imagefolder needs size >= 0 and 0 < test_frac < 1")
    split = (folder / "train").is_dir() and (folder / "test").is_dir()
    # The cache is keyed by every file's name, size and modification time: any change to the
    # tree decodes it again.
    key = store.stable_hash(
        {
            "folder": str(folder),
            "files": _file_list(folder),
            "size": size,
            "split": None if split else [test_frac, seed],
        },
        length=16,
    )
    cache = Path(root) / "imagefolder-cache" / f"{key}.pt"
    if cache.exists():
        try:
            c = store.load_torch(cache)
            return Raw(c["x_train"], c["y_train"], c["x_test"], c["y_test"], c["classes"], augment)
        except (store.DamagedFile, KeyError) as e:
            warnings.warn(f"{e}: decoding the images again", DataWarning, stacklevel=2)
            store.remove(cache)
    if split:
        x_tr, y_tr, classes = _decode_tree(folder / "train", size)
        x_te, y_te, test_classes = _decode_tree(folder / "test", size)
        if classes != test_classes:
            raise BadInput(f"{folder}: train and test hold different class folders")
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise BadInput(f"{folder}: train and test images differ in size; give size=N")
    else:
        from sklearn.model_selection import train_test_split

        x, y, classes = _decode_tree(folder, size)
        try:
            tr, te = train_test_split(
                np.arange(len(y)), test_size=test_frac, stratify=y.numpy(), random_state=seed
            )
        except ValueError as e:
            raise BadInput(f"{folder}: cannot split into train and test: {e}") from None
        tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    store.save_torch(
        cache,
        {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "classes": classes},
    )
    return Raw(x_tr, y_tr, x_te, y_te, classes, augment)
