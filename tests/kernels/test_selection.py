"""Global selection: exact against a stable sort of the concatenation, on both backends."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdfast.kernels import kth_smallest, prune_lowest, prune_lowest_fused
from rdfast.pruning.strategies import prune_to, target_remaining
from tests.kernels.conftest import BACKENDS, DEVICE


def numpy_reference(scores, masks, n):
    flat = np.concatenate([s.float().cpu().numpy().reshape(-1) for s in scores])
    keep = np.concatenate([m.cpu().numpy().reshape(-1) for m in masks])
    cand = np.flatnonzero(keep)
    drop = cand[np.argsort(flat[cand], kind="stable")[:n]]
    keep = keep.copy()
    keep[drop] = False
    return keep


def flat(masks):
    return np.concatenate([m.cpu().numpy().reshape(-1) for m in masks])


def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool, device=DEVICE)


def dev(t):
    return t.to(DEVICE)


def test_ties_break_by_tensor_then_index(backend):
    scores = [dev(torch.ones(2, 3)), dev(torch.ones(4))]
    out = prune_lowest(scores, [ones(2, 3), ones(4)], 7, backend=backend)
    assert not out[0].any()  # all six of the first tensor go first
    assert out[1].tolist() == [False, True, True, True]


def test_negative_zero_ties_with_zero(backend):
    scores = [dev(torch.tensor([0.0, -0.0, 0.0, 1.0]))]
    out = prune_lowest(scores, [ones(4)], 2, backend=backend)
    assert out[0].tolist() == [False, False, True, True]
    assert kth_smallest([dev(torch.tensor([-0.0, 1.0]))], 1, backend=backend).item() == 0.0


def test_only_kept_entries_are_candidates(backend):
    scores = [dev(torch.tensor([0.0, 5.0, 1.0, 2.0]))]
    masks = [dev(torch.tensor([False, True, True, True]))]
    out = prune_lowest(scores, masks, 2, backend=backend)
    assert out[0].tolist() == [False, True, False, False]


def test_inf_allowed_nan_named(backend):
    s = [dev(torch.tensor([float("inf"), 1.0]))]
    assert prune_lowest(s, [ones(2)], 1, backend=backend)[0].tolist() == [True, False]
    assert kth_smallest(s, 2, backend=backend).item() == float("inf")
    for bad in (float("nan"), -float("nan")):
        with pytest.raises(ValueError, match="fc2: scores contain NaN"):
            prune_lowest(
                [dev(torch.ones(2)), dev(torch.tensor([1.0, bad]))],
                [ones(2), ones(2)],
                1,
                names=["fc1", "fc2"],
                backend=backend,
            )
    # NaN at an entry removed earlier is not a candidate, hence no error.
    out = prune_lowest(
        [dev(torch.tensor([float("nan"), 2.0, 1.0]))],
        [dev(torch.tensor([False, True, True]))],
        1,
        backend=backend,
    )
    assert out[0].tolist() == [False, True, False]


def test_cannot_remove_more_than_kept(backend):
    with pytest.raises(ValueError, match="cannot remove 3 entries: 2 are kept"):
        prune_lowest([dev(torch.ones(2))], [ones(2)], 3, backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        kth_smallest([dev(torch.ones(2))], 3, backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        kth_smallest([dev(torch.ones(2))], 0, backend=backend)


def test_bad_arguments():
    with pytest.raises(ValueError, match="differ"):
        prune_lowest([torch.ones(2)], [torch.ones(3, dtype=torch.bool)], 1)
    with pytest.raises(ValueError, match="mask must be bool"):
        prune_lowest([torch.ones(2)], [torch.ones(2)], 1)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        prune_lowest([torch.ones(2, dtype=torch.float64)], [torch.ones(2, dtype=torch.bool)], 1)
    with pytest.raises(ValueError, match="backend"):
        prune_lowest([torch.ones(2)], [torch.ones(2, dtype=torch.bool)], 1, backend="cuda")


@pytest.mark.parametrize("case", ["empty", "one", "all-equal", "all-zero", "odd", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adversarial_inputs(backend, case, dtype):
    gen = torch.Generator().manual_seed(1)
    sizes = {
        "empty": [0, 5, 0],
        "one": [1],
        "all-equal": [6, 42],
        "all-zero": [123, 7],
        "odd": [6, 42, 123, 431],
        "inf": [17, 9],
    }[case]
    if case in ("all-equal", "all-zero"):
        value = 0.0 if case == "all-zero" else 3.5
        scores = [torch.full((s,), value) for s in sizes]
        if case == "all-zero":
            scores[0][::2] = -0.0
    else:
        scores = [torch.rand(s, generator=gen) for s in sizes]
        if case == "inf":
            scores[0][::3] = float("inf")
    scores = [dev(s.to(dtype)) for s in scores]
    masks = [dev(torch.rand(s, generator=gen) < 0.9) for s in sizes]
    kept = int(sum(m.sum() for m in masks))
    for n in sorted({0, 1, kept // 2, kept - 1, kept} - {-1}):
        if n < 0:
            continue
        out = prune_lowest(scores, masks, n, backend=backend)
        np.testing.assert_array_equal(flat(out), numpy_reference(scores, masks, n))
    total = sum(sizes)
    cat = torch.cat([s.float().cpu() for s in scores])
    for k in {1, total // 2 or 1, total}:
        got = kth_smallest(scores, k, backend=backend)
        assert got.item() == torch.kthvalue(cat, k).values.item()


def test_many_tensors(backend):
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(0, 30, (200,), generator=gen).tolist()
    scores = [dev(torch.randint(0, 50, (s,), generator=gen).float()) for s in sizes]
    masks = [dev(torch.rand(s, generator=gen) < 0.7) for s in sizes]
    kept = int(sum(m.sum() for m in masks))
    out = prune_lowest(scores, masks, kept // 3, backend=backend)
    np.testing.assert_array_equal(flat(out), numpy_reference(scores, masks, kept // 3))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    data=st.data(),
    backend=st.sampled_from(BACKENDS),
)
def test_matches_stable_sort_of_concatenation(sizes, data, backend):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    # Few distinct values, both signs, so ties and sign handling are exercised.
    scores = [dev(torch.randint(-3, 4, (s,), generator=gen).float() * 0.25) for s in sizes]
    masks = [dev(torch.rand(s, generator=gen) < 0.8) for s in sizes]
    kept = int(sum(m.sum() for m in masks))
    n = data.draw(st.integers(0, kept))
    out = prune_lowest(scores, masks, n, backend=backend)
    np.testing.assert_array_equal(flat(out), numpy_reference(scores, masks, n))
    assert int(flat(out).sum()) == kept - n
    if sum(sizes):
        k = data.draw(st.integers(1, sum(sizes)))
        cat = torch.cat([s.cpu() for s in scores])
        assert kth_smallest(scores, k, backend=backend).item() == torch.kthvalue(cat, k).values


@settings(max_examples=25, deadline=None)
@given(
    bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=60),
    backend=st.sampled_from(BACKENDS),
    data=st.data(),
)
def test_arbitrary_bit_patterns(bits, backend, data):
    """Any float32, subnormals and both infinities included (NaN patterns excluded)."""
    x = torch.tensor(np.array(bits, dtype=np.uint32).view(np.float32))
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return
    k = data.draw(st.integers(1, x.numel()))
    got = kth_smallest([dev(x[:7]), dev(x[7:])], k, backend=backend)
    assert got.item() == torch.kthvalue(x, k).values.item()


@pytest.mark.parametrize(
    "strategy,form",
    [("mp", "taylor"), ("gp", "taylor"), ("up", "taylor"), ("gp", "sum"), ("up", "sum")],
)
def test_fused_equals_the_formula_then_a_stable_sort(backend, strategy, form):
    """Against numpy alone: the score formula in float32, then a stable argsort."""
    from tests.kernels.test_layouts import numpy_scores

    gen = torch.Generator().manual_seed(3)
    ws = [dev(torch.randn(s, generator=gen)) for s in (6, 42, 123)]
    gs = [dev(torch.randn(s, generator=gen)) for s in (6, 42, 123)]
    masks = [dev(torch.rand(s, generator=gen) < 0.8) for s in (6, 42, 123)]
    scores = [torch.from_numpy(numpy_scores(w, g, strategy, form, 0.05)) for w, g in zip(ws, gs)]
    kept = int(sum(m.sum() for m in masks))
    for n in (1, kept // 2, kept):
        fused = prune_lowest_fused(
            ws, gs, masks, n, strategy=strategy, form=form, eps=0.05, backend=backend
        )
        np.testing.assert_array_equal(flat(fused), numpy_reference(scores, masks, n))


def test_torch_path_never_concatenates_or_sorts(monkeypatch):
    """The memory property: chunked passes, never a whole-array cat/sort/topk/kthvalue."""
    import rdfast.kernels.selection.source as sel

    monkeypatch.setattr(sel, "CHUNK", 64)
    for name in ("cat", "sort", "topk", "kthvalue", "argsort", "quantile"):
        monkeypatch.setattr(torch, name, lambda *a, _n=name, **k: pytest.fail(f"torch.{_n}"))
    gen = torch.Generator().manual_seed(4)
    scores = [torch.rand(s, generator=gen) for s in (500, 1000, 3)]
    masks = [torch.rand(s, generator=gen) < 0.9 for s in (500, 1000, 3)]
    out = prune_lowest(scores, masks, 700, backend="torch")
    monkeypatch.undo()
    np.testing.assert_array_equal(flat(out), numpy_reference(scores, masks, 700))


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


@pytest.mark.parametrize("seed", range(6))
def test_torch_chunks_and_packing(monkeypatch, seed):
    """Tensors larger than a chunk, tails and small tensors packed together: same answer."""
    import rdfast.kernels.selection.source as sel

    monkeypatch.setattr(sel, "CHUNK", 16)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (7,), generator=gen).tolist()
    scores = [torch.randint(0, 5, (s,), generator=gen).half() for s in sizes]
    masks = [torch.rand(s, generator=gen) < 0.8 for s in sizes]
    kept = int(sum(m.sum() for m in masks))
    for n in (0, 1, kept // 2, kept):
        out = prune_lowest(scores, masks, n, backend="torch")
        np.testing.assert_array_equal(flat(out), numpy_reference(scores, masks, n))
    big = [s for s in range(7) if sizes[s] and masks[s].any()]
    if big:
        i = big[-1]
        scores[i][masks[i].nonzero()[0]] = float("nan")
        with pytest.raises(ValueError, match=f"layer{i}: scores contain NaN"):
            prune_lowest(scores, masks, 1, names=[f"layer{j}" for j in range(7)], backend="torch")


@pytest.mark.parametrize("strategy", ["mp", "up"])
def test_zero_lowest_fused_zeroes_what_the_reference_removes(strategy):
    """In place, no mask: the zeroed weights are those a stable numpy sort of the scores
    removes (ties in tensor, then logical order), over layouts real callers pass and a
    tensor past one 2^20-entry chunk."""
    from rdfast.kernels.selection import zero_lowest_fused

    gen = torch.Generator().manual_seed(7)
    # Integer-valued weights and gradients: ties at every threshold.
    conv = torch.randint(-4, 5, (16, 8, 3, 3), generator=gen).float()
    ws = [
        conv.to(memory_format=torch.channels_last),
        torch.randint(-9, 10, (40, 30), generator=gen).float().t(),  # transposed
        torch.randint(-50, 51, (1100, 1000), generator=gen).float(),  # two chunks
        torch.randint(-3, 4, (7,), generator=gen).bfloat16(),
    ]
    big = torch.randint(-3, 4, (20, 12), generator=gen).float()
    neighbours = big[:, 1::2].clone()
    ws.append(big[:, ::2])  # sliced
    gs = [torch.randint(-2, 3, w.shape, generator=gen).to(w.dtype) for w in ws]
    eps = 0.5
    if strategy == "mp":
        scores = [w.float().abs() for w in ws]
    else:  # taylor UP |-w*g + eps*w^2|, written out
        scores = [
            (-w.float() * g.float() + eps * w.float() * w.float()).abs() for w, g in zip(ws, gs)
        ]
    total = sum(w.numel() for w in ws)
    n = total // 3
    keep = numpy_reference(scores, [torch.ones(w.shape, dtype=torch.bool) for w in ws], n)
    before = [w.clone() for w in ws]
    kept = zero_lowest_fused(
        ws, None if strategy == "mp" else gs, n, strategy=strategy, form="taylor", eps=eps
    )
    assert sum(kept) == total - n
    at = 0
    for w, b, k in zip(ws, before, kept):
        part = keep[at : at + w.numel()].reshape(w.shape)
        at += w.numel()
        expected = b.float().numpy() * part
        np.testing.assert_array_equal(w.float().numpy(), expected)
        assert int(part.sum()) == k
    assert torch.equal(big[:, 1::2], neighbours)  # the slice's neighbours untouched
