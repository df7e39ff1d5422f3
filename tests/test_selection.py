"""Global selection: exact counts and the (tensor, flat index) tie rule."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdfast.kernels import prune_lowest
from rdfast.pruning import prune_to, target_remaining


def numpy_reference(scores, masks, n):
    flat = np.concatenate([s.numpy().reshape(-1) for s in scores]).astype(np.float32)
    keep = np.concatenate([m.numpy().reshape(-1) for m in masks])
    cand = np.flatnonzero(keep)
    drop = cand[np.argsort(flat[cand], kind="stable")[:n]]
    keep = keep.copy()
    keep[drop] = False
    return keep


def test_ties_break_by_tensor_then_index():
    scores = [torch.ones(2, 3), torch.ones(4)]
    masks = [torch.ones(2, 3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    out = prune_lowest(scores, masks, 7)
    assert not out[0].any()  # all six of the first tensor go first
    assert out[1].tolist() == [False, True, True, True]


def test_negative_zero_ties_with_zero():
    scores = [torch.tensor([0.0, -0.0, 0.0, 1.0])]
    out = prune_lowest(scores, [torch.ones(4, dtype=torch.bool)], 2)
    assert out[0].tolist() == [False, False, True, True]


def test_only_kept_entries_are_candidates():
    scores = [torch.tensor([0.0, 5.0, 1.0, 2.0])]
    masks = [torch.tensor([False, True, True, True])]
    out = prune_lowest(scores, masks, 2)
    assert out[0].tolist() == [False, True, False, False]


def test_inf_allowed_nan_named():
    s = [torch.tensor([float("inf"), 1.0])]
    m = [torch.ones(2, dtype=torch.bool)]
    assert prune_lowest(s, m, 1)[0].tolist() == [True, False]
    with pytest.raises(ValueError, match="fc2: scores contain NaN"):
        prune_lowest(
            [torch.ones(2), torch.tensor([float("nan")])],
            [torch.ones(2, dtype=torch.bool), torch.ones(1, dtype=torch.bool)],
            1,
            names=["fc1", "fc2"],
        )


def test_cannot_remove_more_than_kept():
    with pytest.raises(ValueError, match="cannot remove 3"):
        prune_lowest([torch.ones(2)], [torch.ones(2, dtype=torch.bool)], 3)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    data=st.data(),
)
def test_matches_stable_sort_of_concatenation(sizes, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    # Few distinct values so ties are common.
    scores = [torch.randint(0, 4, (s,), generator=gen).float() for s in sizes]
    masks = [torch.rand(s, generator=gen) < 0.8 for s in sizes]
    kept = int(sum(m.sum() for m in masks))
    n = data.draw(st.integers(0, kept))
    out = prune_lowest(scores, masks, n)
    got = np.concatenate([m.numpy() for m in out]) if sizes else np.array([])
    np.testing.assert_array_equal(got, numpy_reference(scores, masks, n))
    assert int(got.sum()) == kept - n


@pytest.mark.parametrize("total, t", [(1000, 3.0), (1001, 2.0), (266610, 64.0), (7, 1.5)])
def test_prune_to_keeps_round_total_over_t(total, t):
    w = torch.nn.Parameter(torch.randn(total))
    layers = {"w": w}
    masks = {"w": torch.ones(total, dtype=torch.bool)}
    magnitude = w.detach().abs().clone()
    new = prune_to(layers, masks, t, "mp")
    assert int(new["w"].sum()) == target_remaining(total, t) == round(total / t)
    assert torch.all(w[~new["w"]] == 0)
    # The survivors are exactly the largest |w| (magnitude pruning).
    assert magnitude[new["w"]].min() >= magnitude[~new["w"]].max()
