"""Every kernel over the layouts real callers pass, against numpy references.

Layouts: contiguous, channels_last (4-D), transposed, sliced (every other element) and
expanded (stride 0), for inputs and masks alike, at sizes 0, 1, 431, 1,025, 5,000 and past
several programs (the persistent histogram runs 4 programs of 1,024 on the CPU). The
references are numpy: a stable argsort of the concatenated logical values, the score formulas
written out in float32, np.add.at for the confusion matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdfast.kernels import (
    confusion_matrix,
    kth_smallest,
    masked_linear,
    prune_lowest,
    prune_lowest_fused,
    saliency,
)
from rdfast.kernels._layout import logical_slices
from tests.kernels.conftest import DEVICE
from tests.kernels.test_selection import flat
from tests.kernels.test_selection import numpy_reference as numpy_keep

SHAPES_2D = [(0, 5), (1, 1), (1, 431), (25, 41), (50, 100), (3, 2731)]
SHAPES_4D = [
    (0, 3, 2, 2),
    (1, 1, 1, 1),
    (4, 3, 6, 6),
    (41, 1, 5, 5),
    (10, 5, 10, 10),
    (41, 8, 5, 5),
]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "expanded"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shapes_for(layout):
    return SHAPES_4D if layout == "channels_last" else SHAPES_2D + SHAPES_4D[2:4]


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical values as `t` in another memory layout (expanded: t's first row,
    repeated -- the values change, the reference reads them back through numpy)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
        assert t.numel() <= 1 or t.shape[1] == 1 or not out.is_contiguous()
        return out
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded":
        return t[:1].expand(t.shape) if t.shape[0] else t
    raise ValueError(layout)


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """Logical values as float32 (bf16 and fp16 widen exactly)."""
    return t.detach().float().cpu().numpy().reshape(-1)


def numpy_scores(w, g, strategy, form, eps):
    """The score formulas in float32 numpy, one rounding per operation."""
    w, eps = numpy_of(w), np.float32(eps)
    if strategy == "mp":
        return np.abs(w)
    g = numpy_of(g)
    if form == "taylor":
        return np.abs(w * g) if strategy == "gp" else np.abs(-w * g + eps * w * w)
    return np.abs(g) if strategy == "gp" else np.abs(g) + eps * np.abs(w)


def draw(shape, seed, dtype=torch.float32, levels=None):
    gen = torch.Generator().manual_seed(seed)
    if levels:  # few distinct values: ties at the threshold everywhere
        x = torch.randint(0, levels, shape, generator=gen).float() * 0.25
    else:
        x = torch.randn(shape, generator=gen)
    return x.to(dtype).to(DEVICE)


def kept_mask(shape, seed, frac=0.8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < frac).to(DEVICE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_layout", ["same", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_lowest_pairs_scores_and_masks_by_logical_index(backend, layout, mask_layout, dtype):
    for k, shape in enumerate(shapes_for(layout)):
        scores = [
            in_layout(draw(shape, k, dtype, levels=7), layout),
            draw((7,), 100 + k, dtype, levels=7),
        ]
        masks = [kept_mask(shape, 50 + k), kept_mask((7,), 60 + k)]
        masks[0] = in_layout(masks[0], layout if mask_layout == "same" else "contiguous")
        kept = int(sum(int(m.sum()) for m in masks))
        for n in sorted({0, 1, kept // 2, kept} & set(range(kept + 1))):
            out = prune_lowest(scores, masks, n, backend=backend)
            np.testing.assert_array_equal(flat(out), numpy_keep(scores, masks, n), err_msg=str(n))
            assert all(o.shape == m.shape and o.dtype == torch.bool for o, m in zip(out, masks))
            if masks[0].is_contiguous(memory_format=torch.channels_last) and shape[0] > 1:
                assert out[0].stride() == masks[0].stride()  # the layout is kept


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy,form", [("up", "taylor"), ("gp", "sum")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_selection_in_every_layout(backend, layout, strategy, form, dtype):
    for k, shape in enumerate(shapes_for(layout)):
        ws = [in_layout(draw(shape, k, dtype), layout), draw((5, 3), 10 + k, dtype)]
        gs = [in_layout(draw(shape, 20 + k, dtype), layout), draw((5, 3), 30 + k, dtype)]
        masks = [in_layout(kept_mask(shape, 40 + k), layout), kept_mask((5, 3), 41 + k)]
        scores = [numpy_scores(w, g, strategy, form, 0.05) for w, g in zip(ws, gs)]
        kept = int(sum(int(m.sum()) for m in masks))
        for n in sorted({1, kept // 3, kept} & set(range(1, kept + 1))):
            out = prune_lowest_fused(
                ws, gs, masks, n, strategy=strategy, form=form, eps=0.05, backend=backend
            )
            ref = numpy_keep([torch.from_numpy(s) for s in scores], masks, n)
            np.testing.assert_array_equal(flat(out), ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kth_smallest_with_and_without_masks(backend, layout):
    for k, shape in enumerate(shapes_for(layout)):
        x = in_layout(draw(shape, k, levels=9), layout)
        m = in_layout(kept_mask(shape, k + 7, 0.6), layout)
        values, keep = numpy_of(x), m.cpu().numpy().reshape(-1)
        for k_ in {1, values.size // 2, values.size} & set(range(1, values.size + 1)):
            assert kth_smallest([x], k_, backend=backend).item() == np.sort(values)[k_ - 1]
        cand = np.sort(values[keep])
        for k_ in {1, cand.size // 2, cand.size} & set(range(1, cand.size + 1)):
            got = kth_smallest([x], k_, masks=[m], backend=backend).item()
            assert got == cand[k_ - 1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "strategy,form",
    [("mp", "taylor"), ("gp", "taylor"), ("up", "taylor"), ("gp", "sum"), ("up", "sum")],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_saliency_bits_equal_the_formula(layout, strategy, form, dtype):
    """No FMA contraction and exact widening: the kernel's bits are numpy's."""
    shape = (10, 5, 10, 10) if layout == "channels_last" else (50, 100)
    w = in_layout(draw(shape, 1, dtype), layout)
    g = in_layout(draw(shape, 2, dtype) * 1e-3, layout)
    out = saliency(w, g, strategy=strategy, form=form, eps=5e-4, backend="triton")
    assert out.dtype == torch.float32 and out.shape == w.shape
    np.testing.assert_array_equal(numpy_of(out), numpy_scores(w, g, strategy, form, 5e-4))


def bf16_subnormals(n, seed):
    """bf16 values whose bit patterns are subnormal (exponent 0), both signs, and their exact
    fp32 values computed from the bits in numpy."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 0x80, n).astype(np.uint16) | (rng.integers(0, 2, n) << 15).astype(
        np.uint16
    )
    exact = (bits.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).to(DEVICE), exact


def test_bf16_subnormals_are_exact(backend):
    x, exact = bf16_subnormals(3000, 0)
    assert (exact != 0).all()
    np.testing.assert_array_equal(
        saliency(x, strategy="mp", backend=backend).cpu().numpy(), np.abs(exact)
    )
    for k in (1, 1500, 3000):
        assert kth_smallest([x], k, backend=backend).item() == np.sort(exact)[k - 1]
    masks = [torch.ones(3000, dtype=torch.bool, device=DEVICE)]
    out = prune_lowest([x], masks, 1000, backend=backend)
    np.testing.assert_array_equal(flat(out), numpy_keep([torch.from_numpy(exact)], masks, 1000))
    logits = x.view(1000, 3)
    cm = confusion_matrix(
        logits, torch.zeros(1000, dtype=torch.long, device=DEVICE), 3, backend=backend
    )
    assert cm[0].tolist() == np.bincount(exact.reshape(1000, 3).argmax(1), minlength=3).tolist()


def test_nan_is_not_read_when_nothing_is_removed(backend):
    """n = 0 reads no score: documented, and the masks come back unchanged (as copies)."""
    scores = [torch.tensor([float("nan"), 1.0], device=DEVICE)]
    masks = [torch.ones(2, dtype=torch.bool, device=DEVICE)]
    out = prune_lowest(scores, masks, 0, backend=backend)
    assert out[0].tolist() == [True, True] and out[0] is not masks[0]
    with pytest.raises(ValueError, match="NaN"):
        prune_lowest(scores, masks, 1, backend=backend)


def test_too_many_dims_in_mixed_layouts_are_refused_by_name():
    x = torch.rand(2, 3, 2, 2, 2, device=DEVICE).transpose(0, 4)
    m = torch.ones(2, 3, 2, 2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="conv3d: a 5-D tensor"):
        prune_lowest([x], [m], 1, names=["conv3d"], backend="triton")
    # The torch path reads any number of dimensions.
    out = prune_lowest([x], [m], 5, backend="torch")
    np.testing.assert_array_equal(flat(out), numpy_keep([x], [m], 5))


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 70), (70, 3), (2, 3, 40, 5)])
@pytest.mark.parametrize("chunk", [1, 16, 64, 1000])
def test_logical_slices_cover_in_order_and_stay_bounded(shape, chunk):
    t = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    t = t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t
    seen = []
    for start, end, index in logical_slices(shape, chunk):
        part = t[index].reshape(-1)
        assert part.numel() == end - start <= max(chunk, 1)
        seen.append(part)
    got = torch.cat(seen) if seen else torch.empty(0)
    assert got.tolist() == list(range(t.numel()))


# --------------------------------------------------------------------------- confusion


def numpy_confusion(pred, target, c):
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (np.asarray(target), np.asarray(pred)), 1)
    return cm


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "expanded"])
@pytest.mark.parametrize("n,c", [(0, 3), (1, 1), (431, 10), (1025, 100), (5000, 7)])
def test_confusion_in_every_layout(backend, layout, n, c):
    gen = torch.Generator().manual_seed(n + c)
    logits = in_layout(torch.randint(-3, 4, (n, c), generator=gen).float().to(DEVICE), layout)
    y = in_layout(
        torch.randint(0, c, (n,), generator=gen).to(DEVICE),
        layout if layout == "expanded" else "contiguous",
    )
    if layout == "sliced" and n:
        y = torch.stack([y, y], 1)[:, 0]  # a strided 1-D target view
    cm = confusion_matrix(logits, y, c, backend=backend)
    pred = np.argmax(logits.cpu().numpy(), axis=1) if n else np.zeros(0, dtype=np.int64)
    np.testing.assert_array_equal(cm.cpu().numpy(), numpy_confusion(pred, y.cpu().numpy(), c))
    labels = in_layout(torch.randint(0, c, (n, 1), generator=gen).to(DEVICE), layout)[:, 0]
    cm = confusion_matrix(labels, y, c, backend=backend)
    np.testing.assert_array_equal(
        cm.cpu().numpy(), numpy_confusion(labels.cpu().numpy(), y.cpu().numpy(), c)
    )


@pytest.mark.parametrize("bad", [-1, 4, 10**6])
def test_confusion_refuses_labels_out_of_range(backend, bad):
    logits = torch.zeros(5, 4, device=DEVICE)
    y = torch.tensor([0, 1, bad, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match=f"targets must lie in \\[0, 4\\), found {bad}"):
        confusion_matrix(logits, y, 4, backend=backend)
    pred = torch.tensor([0, bad, 1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match=f"predicted labels must lie in \\[0, 4\\), found {bad}"):
        confusion_matrix(pred, torch.zeros(5, dtype=torch.long, device=DEVICE), 4, backend=backend)
    with pytest.raises(ValueError, match="targets must be integers"):
        confusion_matrix(logits, y.float(), 4, backend=backend)


def test_confusion_compares_fp64_in_fp64(backend):
    logits = torch.tensor([[1.0, 1.0 + 1e-12], [2.0, 2.0 - 1e-12]], dtype=torch.float64)
    cm = confusion_matrix(
        logits.to(DEVICE), torch.tensor([1, 0], device=DEVICE), 2, backend=backend
    )
    assert cm.tolist() == [[1, 0], [0, 1]]


# --------------------------------------------------------------------------- masked linear


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_masked_linear_reads_every_operand_by_its_strides(layout):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(70, 33, generator=gen).to(DEVICE)
    w = torch.randn(6, 33, generator=gen).to(DEVICE)
    mask = torch.rand(6, 33, generator=gen).to(DEVICE) < 0.5
    bias = torch.randn(12, generator=gen).to(DEVICE)[::2]  # stride 2
    x_, w_, m_ = (in_layout(t, layout) for t in (x, w, mask))
    out = masked_linear(x_, w_, m_, bias, backend="triton")
    ref = (
        x_.double().cpu().numpy() @ (w_.double().cpu().numpy() * m_.cpu().numpy()).T
        + bias.double().cpu().numpy()
    )
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-4, atol=1e-4)
