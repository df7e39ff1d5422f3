"""Selection across processes (gloo on the CPU): each process holds some of the tensors; the
union of their masks must equal, bit for bit, one process selecting over all of them (ties in
rank order), as a stable numpy sort of the concatenation gives it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests import gloo
from tests.kernels.test_selection import numpy_reference

# Tensors of the whole model, in rank order: every process takes a contiguous run of them.
SIZES = [3000, 17, 2500, 0, 4100, 900, 1, 2200]
N_REMOVE = [1, 4000, 7000, 10216]  # 10,216: every kept entry


def _model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Integer scores in 0..49: thousands of ties at every threshold.
    scores = [torch.randint(0, 50, (n,), generator=gen).float() for n in SIZES]
    scores[2] = scores[2].view(50, 50).t()  # a transposed tensor in one process
    masks = [torch.rand(n, generator=gen) > 0.2 for n in SIZES]
    masks[2] = masks[2].view(50, 50)
    return scores, masks


def _split(world):
    """Tensor indices per rank: contiguous runs, rank 0 first."""
    bounds = np.linspace(0, len(SIZES), world + 1).round().astype(int)
    return [list(range(bounds[r], bounds[r + 1])) for r in range(world)]


def _worker(rank, world, backend):
    os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    from rdfast.kernels import kth_smallest, prune_lowest, prune_lowest_fused
    from rdfast.kernels.selection import NaNScoreError, TooFewCandidates

    scores, masks = _model()
    mine = _split(world)[rank]
    s = [scores[i] for i in mine]
    m = [masks[i] for i in mine]
    result = {"masks": {}, "kth": {}, "fused": {}}
    for n in N_REMOVE:
        result["masks"][n] = [
            x.clone() for x in prune_lowest(s, m, n, backend=backend, group=dist.group.WORLD)
        ]
        result["kth"][n] = float(
            kth_smallest(s, n, masks=m, backend=backend, group=dist.group.WORLD)
        )
        w = [x - 25.0 for x in s]  # signed weights: |w| ties between +-x as well
        result["fused"][n] = prune_lowest_fused(
            w, None, m, n, strategy="mp", backend=backend, group=dist.group.WORLD
        )
    try:  # more than all processes keep together
        prune_lowest(s, m, 10**9, backend=backend, group=dist.group.WORLD)
    except TooFewCandidates as e:
        result["too_few"] = str(e)
    bad = [x.clone() for x in s]
    if rank == world - 1 and bad:
        bad[-1].view(-1)[int(m[-1].view(-1).nonzero()[0])] = float("nan")  # a candidate
    try:  # NaN in the last process: every process stops, none waits in a collective
        prune_lowest(bad, m, 10, backend=backend, group=dist.group.WORLD)
    except NaNScoreError as e:
        result["nan"] = str(e)
    return result


def _flat(tensors):
    return np.concatenate([t.numpy().reshape(-1) for t in tensors])


@pytest.mark.parametrize("world,backend", [(2, "torch"), (3, "torch"), (4, "torch"), (2, "triton")])
def test_union_of_process_masks_equals_one_process(tmp_path, world, backend):
    results = gloo.run(_worker, world, tmp_path, backend)
    scores, masks = _model()
    kept = _flat(masks)
    all_scores = np.concatenate([s.numpy().reshape(-1) for s in scores])
    for n in N_REMOVE:
        union = _flat([m for r in results for m in r["masks"][n]])
        np.testing.assert_array_equal(union, numpy_reference(scores, masks, n))
        fused = _flat([m for r in results for m in r["fused"][n]])
        np.testing.assert_array_equal(
            fused, numpy_reference([(s - 25.0).abs() for s in scores], masks, n)
        )
        kth = np.sort(all_scores[kept])[n - 1]
        assert all(r["kth"][n] == kth for r in results)
        # The new masks keep each input's layout (the transposed tensor stays transposed).
        for r, idx in zip(results, _split(world)):
            for m, i in zip(r["masks"][n], idx):
                assert m.shape == masks[i].shape
    total = int(kept.sum())
    assert all(
        r["too_few"] == f"cannot remove 1000000000 entries: {total} are kept" for r in results
    )
    assert "another process" in results[0]["nan"]
    assert results[-1]["nan"].endswith("scores contain NaN")
