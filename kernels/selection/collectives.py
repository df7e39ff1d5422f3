"""Selection over a model sharded across processes: one global threshold.

A model sharded over processes wants one global threshold. The histograms add up across
processes, so one all_reduce per pass gives every process the exact global (T, r): 512 KiB
per pass on the torch path (65,536 int64 bins), 16 KiB on the Triton path (2,048). Ties go
in rank order, then in each process's own (tensor, index) order: every process learns how
many entries equal to T the lower ranks hold (one all_gather of an int64).
"""

from __future__ import annotations

import torch

from rdfast.kernels.selection.source import NaNScoreError


def _collective_device(group):
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return t
    import torch.distributed as dist

    buf = t.to(_collective_device(group))
    dist.all_reduce(buf, group=group)
    return buf.to(t.device)


def rank_budget(r: int, local_equal: int, group) -> int:
    """Of the r entries equal to T that go, how many fall to this process."""
    import torch.distributed as dist

    dev = _collective_device(group)
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local_equal], dtype=torch.int64, device=dev), group=group)
    before = sum(int(c) for c in counts[: dist.get_rank(group)])
    return min(max(r - before, 0), local_equal)


def agree_on_nan(check, group):
    """Run `check` (raises NaNScoreError); with a group, every process raises if any did,
    so that none waits in the next collective for a process that stopped."""
    try:
        check()
        local = None
    except NaNScoreError as e:
        local = e
    if group is not None:
        flag = all_reduce(torch.tensor([int(local is not None)]), group)
        if int(flag) and local is None:
            raise NaNScoreError("scores contain NaN in another process")
    if local is not None:
        raise local
