"""Class-share selection (`--strategy cs`): the per-class importance against autograd on each
batch's class examples alone, the keys and the masks against a brute force in Python, the
one-class case against FairGRAPE's greedy, and runs that record it."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.fairgrape import fairgrape_greedy
from rdfast.data import load_dataset
from rdfast.pruning.calibration import calibration_batches
from rdfast.pruning.class_share import class_importance, class_share_masks, share_keys
from rdfast.runs import store
from rdfast.runs.engine import Engine
from tests.test_engine import experiment

DATA = "synthetic:n_train=120,n_test=40,classes=4,dim=6"


@pytest.mark.parametrize("memory", [None, 0], ids=["at-once", "one-class-at-a-time"])
def test_class_importance_equals_autograd_per_batch_and_class(memory):
    data = load_dataset(DATA, None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    layers = {"0": model[0].weight, "2": model[2].weight}
    budget = {} if memory is None else {"memory": memory}
    got = dict(class_importance(model, layers, data, batches=3, batch_size=16,
                                seed_parts=(3, "grad"), **budget))  # fmt: skip
    draw = list(calibration_batches(data, 3, 16, (3, "grad")))
    for c, importance in got.items():
        ref = [torch.zeros_like(w) for w in layers.values()]
        for x, y in draw:
            if not (y == c).any():
                continue
            loss = F.cross_entropy(model(x[y == c]), y[y == c])
            for r, w, g in zip(
                ref, layers.values(), torch.autograd.grad(loss, list(layers.values()))
            ):
                r += (w.detach().abs() * g.abs()) ** 2
        for h, r in zip(importance, ref):
            torch.testing.assert_close(h, r / 3, rtol=1e-5, atol=1e-9)


def test_class_importance_with_batch_norm_is_the_same_measured_either_way():
    """A batch-norm model: each class's importance, from whole batches in train mode, is the
    same bit for bit from one forward pass a batch and from one class at a time, and equals
    a per-batch reference that runs each batch whole for each class."""
    data = load_dataset(DATA, None)

    def model_and_layers():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        return m, {"0": m[0].weight, "3": m[3].weight}

    draw = dict(batches=3, batch_size=16, seed_parts=(3, "grad"))
    got = [dict(class_importance(*model_and_layers(), data, **draw, memory=memory))
           for memory in (1 << 30, 0)]  # fmt: skip
    model, layers = model_and_layers()
    model.train()
    params = list(layers.values())
    for c in got[0]:
        ref = [torch.zeros_like(w) for w in params]
        for x, y in calibration_batches(data, 3, 16, (3, "grad")):
            if (y == c).any():
                loss = F.cross_entropy(model(x)[y == c], y[y == c])
                for r, w, g in zip(ref, params, torch.autograd.grad(loss, params)):
                    r += (w.detach().abs() * g.abs()) ** 2
        for h, h0, r in zip(got[0][c], got[1][c], ref):
            torch.testing.assert_close(h, r / 3, rtol=1e-5, atol=1e-9)
            assert torch.equal(h, h0), c


def brute_keys(h: np.ndarray) -> np.ndarray:
    """min over classes of the share of the class's importance ranked strictly above i,
    ranking by importance (highest first), ties by position -- in plain Python."""
    n, classes = h.shape
    keys = [1.0] * n
    for c in range(classes):
        total = sum(h[:, c])
        if total <= 0:
            continue
        ranked = sorted(range(n), key=lambda i: (-h[i, c], i))
        above = 0.0
        for i in ranked:
            keys[i] = min(keys[i], above / total)
            above += h[i, c]
    return np.array(keys)


def test_keys_and_masks_equal_a_brute_force():
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (40,)]
    n = sum(int(np.prod(s)) for s in shapes)
    h = rng.exponential(size=(n, 3)) ** 3
    h[rng.random(n) < 0.2] = 0.0  # weights no class needs: ties at the end of every ranking
    h[:5, 1] = h[5, 1]  # ties inside one class's ranking
    per_class = [[torch.tensor(part.reshape(s)) for part, s in
                  zip(np.split(h[:, c], [35]), shapes)] for c in range(3)]  # fmt: skip
    keys = share_keys([torch.Size(s) for s in shapes], per_class)
    expected = brute_keys(h)
    np.testing.assert_allclose(torch.cat([k.reshape(-1) for k in keys]).numpy(), expected,
                               rtol=0, atol=1e-12)  # fmt: skip
    layers = {"a": nn.Parameter(torch.zeros(7, 5)), "b": nn.Parameter(torch.zeros(40))}
    old = [torch.ones(7, 5, dtype=torch.bool), torch.ones(40, dtype=torch.bool)]
    old[1][:3] = False  # already pruned weights stay pruned and are not counted again
    remove = 30
    masks = class_share_masks(layers, old, remove, per_class, ["a", "b"])
    # Brute force: of the kept weights, remove those of highest key first (float32 keys, ties
    # by position: a stable sort of -key).
    score = -expected.astype(np.float32)
    alive = np.concatenate([m.numpy().reshape(-1) for m in old])
    idx = [i for i in np.argsort(score, kind="stable") if alive[i]][:remove]
    want = alive.copy()
    want[idx] = False
    np.testing.assert_array_equal(np.concatenate([m.numpy().reshape(-1) for m in masks]), want)


@pytest.mark.parametrize("keep", [1, 17, 120])
def test_one_class_keeps_what_fairgrapes_greedy_keeps(keep):
    """With one class, both keep the most important weights."""
    rng = np.random.default_rng(keep)
    h = rng.exponential(size=(300, 1))
    layers = {"w": nn.Parameter(torch.zeros(300))}
    masks = class_share_masks(layers, [torch.ones(300, dtype=torch.bool)], 300 - keep,
                              [[torch.tensor(h[:, 0])]], ["w"])  # fmt: skip
    np.testing.assert_array_equal(masks[0].numpy(), fairgrape_greedy(h, keep))


def test_every_class_keeps_the_share_its_key_promises():
    """Keeping the keys below rho keeps, for every class, at least a share rho of its
    importance: the property the selection is built on."""
    rng = np.random.default_rng(3)
    h = rng.exponential(size=(500, 5)) ** 2
    keys = brute_keys(h)
    for rho in (0.3, 0.7, 0.95):
        kept = keys < rho
        shares = h[kept].sum(axis=0) / h.sum(axis=0)
        assert (shares >= rho).all(), (rho, shares)


def test_runs_record_class_share(tmp_path):
    Engine(experiment(tmp_path, strategies=("mp", "cs")), progress=False).execute()
    rec = store.load_records(tmp_path)
    assert set(rec["strategy"]) == {"mp", "cs"}
    steps = rec[rec["strategy"] == "cs"].drop_duplicates("step").sort_values("step")
    total = int(steps["total"].iloc[0])
    assert list(steps["remaining"]) == [total] + [round(total / t) for t in (2.0, 5.0, 20.0)]
