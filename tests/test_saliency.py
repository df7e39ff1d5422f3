"""Scores on a network small enough to differentiate by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from rdfast.data import TensorData
from rdfast.kernels import saliency
from rdfast.pruning.strategies import data_gradients, prune_to, random_scores

W = [[1.0, -2.0], [0.5, 0.0]]
X = [1.0, 2.0]
EPS = 0.1


def hand_gradient():
    # logits = W x = [1*1 - 2*2, 0.5*1 + 0] = [-3, 0.5]; target class 0.
    # dCE/dW = (softmax(logits) - onehot) x^T.
    p0 = math.exp(-3) / (math.exp(-3) + math.exp(0.5))
    p1 = 1 - p0
    return np.array([[(p0 - 1) * 1, (p0 - 1) * 2], [p1 * 1, p1 * 2]])


def tiny():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(W))
    x = torch.tensor([X])
    y = torch.tensor([0])
    data = TensorData("tiny", x, y, x, y, ["a", "b"], torch.zeros(1, 2), torch.ones(1, 2))
    return model, {"fc": model.fc.weight}, data


def test_data_gradient_matches_hand_computation():
    model, layers, data = tiny()
    g = data_gradients(model, layers, data, batches=3, batch_size=1, seed_parts=(0,))
    np.testing.assert_allclose(g["fc"].numpy(), hand_gradient(), rtol=1e-6)


@pytest.mark.parametrize(
    "strategy, form, expected",
    [
        ("mp", "taylor", lambda w, g: np.abs(w)),
        ("gp", "taylor", lambda w, g: np.abs(w * g)),
        ("up", "taylor", lambda w, g: np.abs(-w * g + EPS * w * w)),
        ("gp", "sum", lambda w, g: np.abs(g)),
        ("up", "sum", lambda w, g: np.abs(g) + EPS * np.abs(w)),
    ],
)
def test_score_forms_on_tiny_network(strategy, form, expected):
    model, layers, data = tiny()
    grads = data_gradients(model, layers, data, batches=1, batch_size=1, seed_parts=(0,))
    scores = saliency(layers["fc"].detach(), grads["fc"], strategy=strategy, form=form, eps=EPS)
    w, g = np.array(W), hand_gradient()
    hand = expected(w, g)
    np.testing.assert_allclose(scores.numpy(), hand, rtol=1e-6)
    assert scores.dtype == torch.float32
    # Pruning to t = 2 (2 of 4 kept) with the fused selection removes the two lowest scores.
    masks = {"fc": torch.ones(2, 2, dtype=torch.bool)}
    new = prune_to(layers, masks, 2.0, strategy, grads=grads, form=form, eps=EPS)
    order = np.argsort(hand.reshape(-1), kind="stable")
    expect = np.ones(4, dtype=bool)
    expect[order[:2]] = False
    np.testing.assert_array_equal(new["fc"].numpy().reshape(-1), expect)
    assert torch.all(layers["fc"].detach()[~new["fc"]] == 0)


def test_hand_values_of_up_taylor():
    # Entry (0, 0): w = 1, g = p0 - 1 = -0.970688; -w*g + eps*w^2 = 0.970688 + 0.1.
    model, layers, data = tiny()
    grads = data_gradients(model, layers, data, batches=1, batch_size=1, seed_parts=(0,))
    s = saliency(layers["fc"].detach(), grads["fc"], strategy="up", form="taylor", eps=EPS)
    assert s[0, 0].item() == pytest.approx(0.9706877 + 0.1, rel=1e-6)
    assert s[1, 1].item() == 0.0  # w = 0: no loss change from removing it


def test_gradient_ignores_weight_decay_and_uses_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.eval()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    data = TensorData("d", x, y, x, y, ["a", "b"], torch.zeros(1, 3), torch.ones(1, 3))
    layers = {"0": model[0].weight, "2": model[2].weight}
    data_gradients(model, layers, data, batches=1, batch_size=8, seed_parts=(0,))
    assert model.training  # dropout active while estimating, as during training


def test_random_scores_are_seeded():
    layers = {"a": torch.zeros(5, 3), "b": torch.zeros(7)}
    s1 = random_scores(layers, seed_parts=(1, 2, "rp"))
    s2 = random_scores(layers, seed_parts=(1, 2, "rp"))
    s3 = random_scores(layers, seed_parts=(2, 2, "rp"))
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert not torch.equal(s1[0], s3[0])


def test_gradient_estimate_leaves_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    data = TensorData("d", x, y, x, y, ["a", "b"], torch.zeros(1, 3), torch.ones(1, 3))
    before = {n: b.clone() for n, b in model.named_buffers()}
    layers = {"0": model[0].weight, "2": model[2].weight}
    grads = data_gradients(model, layers, data, batches=4, batch_size=8, seed_parts=(0,))
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert grads["0"].abs().sum() > 0
