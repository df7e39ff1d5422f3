"""CIFAR-10/100, SVHN and image folders from files in the official formats; augmentation."""

import os
import time

import numpy as np
import pytest
import torch

import rdfast.data.builtin as datasets_mod
from rdfast.data import augment_batch, load_dataset
from rdfast.errors import BadInput, DataWarning
from tests.official_formats import write_cifar10, write_cifar100, write_image_tree, write_svhn


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("RDFAST_OFFLINE", "1")


def test_cifar10(tmp_path):
    write_cifar10(tmp_path, per_batch=20, n_test=30)
    with pytest.warns(DataWarning, match="differ from the official archive"):
        d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (30, 3, 32, 32)
    assert d.num_classes == 10 and d.class_names[0] == "airplane"
    assert d.y_test.tolist() == [i % 10 for i in range(30)]
    assert d.augment == "crop-flip"
    # The pixel layout is the official one: row-major 3 x 32 x 32 planes.
    import pickle

    raw = pickle.loads(
        (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes"
    )
    np.testing.assert_array_equal(d.x_test[1].numpy().reshape(-1), raw[b"data"][1])
    x, _ = next(d.test_batches(30))
    assert abs(float(x.mean())) < 0.2  # normalized with the training statistics


def test_cifar100_and_subset(tmp_path):
    write_cifar100(tmp_path, n_train=300, n_test=200)
    with pytest.warns(DataWarning):
        d = load_dataset("cifar100:test=100", tmp_path)
    assert d.num_classes == 100 and d.class_names[99] == "class99"
    assert d.x_train.shape == (300, 3, 32, 32) and d.x_test.shape[0] == 100
    assert sorted(d.y_test.tolist()) == list(range(100))  # stratified: one per class


def test_svhn(tmp_path):
    write_svhn(tmp_path, n_train=40, n_test=20)
    with pytest.warns(DataWarning):
        d = load_dataset("svhn", tmp_path)
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.y_test.tolist() == [(i % 10 + 1) % 10 for i in range(20)]  # 10 -> 0
    assert d.augment == "crop"  # no flips for digits


@pytest.mark.parametrize(
    "name, folder, archive",
    [
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
        ("svhn", "svhn", "train_32x32.mat"),
        ("mnist", "MNIST/raw", "MNIST's four idx files"),
        ("fashion-mnist", "FashionMNIST/raw", "FashionMNIST's four idx files"),
    ],
)
def test_missing_files_name_the_path_and_archive(tmp_path, name, folder, archive):
    with pytest.raises(BadInput) as e:
        load_dataset(name, tmp_path)
    assert str(tmp_path / folder) in str(e.value) and archive in str(e.value)


def test_malformed_files_are_named(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.warns(DataWarning), pytest.raises(BadInput, match="data_batch_3: not a CIFAR"):
        load_dataset("cifar10", tmp_path)
    import pickle

    (folder / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.warns(DataWarning), pytest.raises(BadInput, match="data_batch_3: 'data' must"):
        load_dataset("cifar10", tmp_path)
    svhn = write_svhn(tmp_path)
    (svhn / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.warns(DataWarning), pytest.raises(BadInput, match="test_32x32.mat: not a"):
        load_dataset("svhn", tmp_path)


def test_imagefolder_split_tree(tmp_path):
    tree = write_image_tree(tmp_path / "pets", split=True, per_class=4, size=12)
    d = load_dataset(f"imagefolder:{tree}", tmp_path / "cache")
    assert d.class_names == ["cat", "dog", "owl"]
    assert d.x_train.shape == (12, 3, 12, 12) and d.x_test.shape == (12, 3, 12, 12)
    assert d.x_train.dtype == torch.uint8 and d.augment == "crop-flip"
    d = load_dataset(f"imagefolder:{tree},size=8,augment=none", tmp_path / "cache")
    assert d.x_train.shape == (12, 3, 8, 8) and d.augment == "none"


def test_imagefolder_single_tree_split_and_cache(tmp_path, monkeypatch):
    tree = write_image_tree(tmp_path / "pets", per_class=10, fmt="jpg")
    calls = []
    real = datasets_mod._decode_tree
    monkeypatch.setattr(datasets_mod, "_decode_tree", lambda *a: calls.append(a) or real(*a))
    d1 = load_dataset(f"imagefolder:{tree},test_frac=0.3", tmp_path / "cache")
    assert len(calls) == 1 and d1.x_test.shape[0] == 9 and d1.x_train.shape[0] == 21
    assert sorted(np.bincount(d1.y_test.numpy()).tolist()) == [3, 3, 3]
    d2 = load_dataset(f"imagefolder:{tree},test_frac=0.3", tmp_path / "cache")
    assert len(calls) == 1  # decoded once, then read from the cache
    assert torch.equal(d1.x_train, d2.x_train)
    # A changed file invalidates the cache.
    target = tree / "dog" / "3.jpg"
    write_image_tree(tmp_path / "other", per_class=1, fmt="jpg", seed=5)
    target.write_bytes((tmp_path / "other" / "dog" / "0.jpg").read_bytes())
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    d3 = load_dataset(f"imagefolder:{tree},test_frac=0.3", tmp_path / "cache")
    assert len(calls) == 2
    assert not (torch.equal(d1.x_train, d3.x_train) and torch.equal(d1.x_test, d3.x_test))


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(BadInput, match="is not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}", tmp_path)
    with pytest.raises(BadInput, match="imagefolder needs a path"):
        load_dataset("imagefolder", tmp_path)
    tree = write_image_tree(tmp_path / "mixed", per_class=2, size=12)
    write_image_tree(tmp_path / "mixed", classes=("dog",), per_class=1, size=10, seed=3, fmt="jpg")
    with pytest.raises(BadInput, match=r"images differ in size \(2 shapes\); give size=N"):
        load_dataset(f"imagefolder:{tree}", tmp_path / "c")
    (tree / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(BadInput, match="broken.png: cannot decode"):
        load_dataset(f"imagefolder:{tree},size=8", tmp_path / "c")


def test_augmentation_keeps_shape_and_is_seeded():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1), flip=True)
    b = augment_batch(x, torch.Generator().manual_seed(1), flip=True)
    c = augment_batch(x, torch.Generator().manual_seed(2), flip=True)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # Each output is a 32 x 32 window of the zero-padded image, mirrored or not.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        windows = [padded[i, :, r : r + 32, s : s + 32] for r in range(9) for s in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    no_flip = augment_batch(x, torch.Generator().manual_seed(1), flip=False)
    assert no_flip.shape == x.shape
