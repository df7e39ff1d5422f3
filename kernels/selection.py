"""Exact global selection over many tensors without concatenating them.

`prune_lowest(scores, masks, n)` removes exactly n kept entries, lowest score first, ties in
(tensor position, flat index) order -- bit for bit what a stable sort of the concatenated
scores gives. `kth_smallest(tensors, k)` is the exact k-th smallest value (1-based).
`prune_lowest_fused(weights, grads, masks, n, strategy=...)` computes the saliency inside the
passes, so no score tensor is ever stored.

Method: radix select on the float bit patterns. A float32 x maps to a signed int32 key
`b ^ ((b >> 31) & 0x7fffffff)` (b = bits of x; -0.0 first becomes +0.0) that orders exactly as
the floats do, +inf included. Histogram passes over the key's digits, accumulated across all
tensors, narrow the k-th key down to one value T; a last pass writes the masks: entries below
T go, and of the entries equal to T the first r in (tensor, index) order.

Extra memory is O(bins) plus one bounded chunk, whatever the number of weights:
- Triton: digits of 11/11/10 bits (2,048-bin histograms in registers, merged with one atomic
  add per program), a count pass for the entries equal to T, the mask pass.
- torch (CPU): digits of 16/16 bits -- a 65,536-bin `bincount` costs the CPU no more than a
  2,048-bin one and saves a pass -- over chunks of CHUNK elements, and a mask pass that hands
  out the tie budget chunk by chunk in flat order.
NaN among the candidates is an error naming the tensor; +inf is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rdfast.kernels._backend import HAS_TRITON, grid_size, pick, tl, triton
from rdfast.kernels._float_key import float_key_torch
from rdfast.kernels.saliency import FORM_CODES, STRATEGY_CODES, saliency_ref

FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
DIGITS_TRITON = (11, 11, 10)
DIGITS_TORCH = (16, 16)
# 2^18 fp32 scores = 1 MiB per chunk. On the 2-core CPU, 1e8 scores in 100 tensors: 2^16 took
# 2.3 s (per-call overhead), 2^18 and 2^20 1.2 s, with 2^20 holding ~40 MB more at its peak.
CHUNK = 1 << 18
BLOCK = 1024
POS_INF_KEY = 0x7F800000  # signed key of +inf; above it: NaN with the sign bit clear
NEG_INF_KEY = -0x7F800001  # signed key of -inf; below it: NaN with the sign bit set


# --------------------------------------------------------------------------- sources


class _Source:
    """Where the scores of tensor i come from: given, or computed from (w, g) on the fly."""

    def __init__(
        self, scores=None, weights=None, grads=None, strategy=None, form="taylor", eps=0.0
    ):
        self.fused = scores is None
        self.tensors = list(weights if self.fused else scores)
        self.grads = list(grads) if grads is not None else None
        self.strategy, self.form, self.eps = strategy, form, float(eps)

    def __len__(self):
        return len(self.tensors)

    def numel(self, i):
        return self.tensors[i].numel()

    def flat(self, i):
        """Per tensor, once per pass: flat views (a copy only for non-contiguous input)."""
        w = self.tensors[i].reshape(-1)
        g = self.grads[i].reshape(-1) if self.fused and self.grads is not None else None
        return w, g

    def chunk(self, flat, start, end) -> torch.Tensor:
        w, g = flat
        if not self.fused:
            x = w[start:end]
            return x if x.dtype == torch.float32 else x.float()
        return saliency_ref(
            w[start:end], None if g is None else g[start:end], self.strategy, self.form, self.eps
        )

    def pieces(self, masks):
        """Scores in flat order as (x, kept, segments), x at most CHUNK fp32 values.

        Slices of large tensors come as they are; small tensors are packed into one buffer
        (copied, bounded by CHUNK) so that 100 tensors of 1e4 entries cost a few torch calls
        per pass instead of a few hundred. `segments` lists (tensor, start, end, offset in x).
        """
        buf_x = buf_m = None
        pending, fill = [], 0

        def flush():
            nonlocal pending, fill
            out = (buf_x[:fill], None if buf_m is None else buf_m[:fill], pending)
            pending, fill = [], 0
            return out

        for i in range(len(self)):
            flat = self.flat(i)
            m = masks[i].reshape(-1) if masks is not None else None
            n = self.numel(i)
            for start in range(0, n, CHUNK):
                end = min(start + CHUNK, n)
                x = self.chunk(flat, start, end)
                kept = m[start:end] if m is not None else None
                if end - start == CHUNK:  # a full chunk: no copy, after what is pending
                    if fill:
                        yield flush()
                    yield x, kept, [(i, start, end, 0)]
                    continue
                if fill + end - start > CHUNK:
                    yield flush()
                if buf_x is None:
                    buf_x = torch.empty(CHUNK, dtype=torch.float32, device=x.device)
                    buf_m = (
                        None if m is None else torch.empty(CHUNK, dtype=torch.bool, device=x.device)
                    )
                buf_x[fill : fill + end - start] = x
                if buf_m is not None:
                    buf_m[fill : fill + end - start] = kept
                pending.append((i, start, end, fill))
                fill += end - start
        if fill:
            yield flush()

    def triton_args(self, i):
        w = self.tensors[i].contiguous()
        if not self.fused:
            return w, w, 0, 0
        g = self.grads[i].contiguous() if self.grads is not None else w
        return w, g, STRATEGY_CODES[self.strategy], FORM_CODES[self.form]


def _validate(src: _Source, masks, names):
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(src))]
    if len(names) != len(src):
        raise ValueError(f"{len(names)} names for {len(src)} tensors")
    if masks is not None and len(masks) != len(src):
        raise ValueError(f"{len(src)} score tensors but {len(masks)} masks")
    for i, t in enumerate(src.tensors):
        if t.dtype not in FLOAT_TYPES:
            raise ValueError(
                f"{names[i]}: scores must be float32, bfloat16 or float16, got {t.dtype}"
            )
        if src.fused and src.grads is not None and src.grads[i].shape != t.shape:
            raise ValueError(
                f"{names[i]}: gradient {tuple(src.grads[i].shape)} and weight "
                f"{tuple(t.shape)} differ"
            )
        if masks is not None:
            if masks[i].shape != t.shape:
                raise ValueError(
                    f"{names[i]}: scores {tuple(t.shape)} and mask {tuple(masks[i].shape)} differ"
                )
            if masks[i].dtype != torch.bool:
                raise ValueError(f"{names[i]}: mask must be bool, got {masks[i].dtype}")
    devices = {t.device for t in src.tensors} | {m.device for m in masks or []}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return names


def _find_nan(src: _Source, masks, names):
    """Raise naming the first tensor with a NaN among its candidates, if there is one.

    Chunked like the passes; runs only when the first histogram saw keys beyond +-inf."""
    for x, kept, segments in src.pieces(masks):
        bad = torch.isnan(x)
        if kept is not None:
            bad &= kept
        if bad.any():
            first = int(bad.nonzero()[0])
            i = next(i for i, start, end, off in segments if off <= first < off + end - start)
            raise ValueError(f"{names[i]}: scores contain NaN")


# --------------------------------------------------------------------------- torch path


def _torch_histogram(src, masks, consumed, bits, lo):
    """Histogram of the next `bits` bits of the keys in [lo, lo + 2^(32-consumed))."""
    hist = torch.zeros(1 << bits, dtype=torch.int64)
    shift = 32 - consumed - bits
    for x, kept, _ in src.pieces(masks):
        ks = float_key_torch(x)
        if consumed == 0:
            # Unsigned key >> shift == (signed key >> shift) + 2^(bits - 1).
            d = (ks >> shift) + (1 << (bits - 1))
            if kept is not None and not bool(kept.all()):
                d = d[kept]
        else:
            diff = ks - lo  # wraps; in range iff 0 <= diff < 2^(32 - consumed)
            sel = (diff >> (32 - consumed)) == 0
            if kept is not None:
                sel &= kept
            d = diff[sel] >> shift
        hist += torch.bincount(d, minlength=1 << bits).cpu()
    return hist


def _torch_masks(src, masks, T, r):
    """Keep entries above T; of those equal to T remove the first r in flat order."""
    out = [torch.empty_like(m).reshape(-1) for m in masks]
    budget = r
    for x, kept, segments in src.pieces(masks):
        ks = float_key_torch(x)
        keep = kept & (ks > T)
        eq = kept & (ks == T)
        if budget:
            c = int(eq.sum())
            if c <= budget:  # every equal entry of this piece goes
                budget -= c
            else:  # the tie boundary: the first `budget` equal entries go
                keep |= eq & (eq.cumsum(0) > budget)
                budget = 0
        else:
            keep |= eq
        for i, start, end, offset in segments:
            out[i][start:end] = keep[offset : offset + end - start]
    return [o.view_as(m) for o, m in zip(out, masks)]


# --------------------------------------------------------------------------- Triton path

if HAS_TRITON:
    from rdfast.kernels._float_key import float_key
    from rdfast.kernels.saliency import score_of

    @triton.jit
    def _load_score(s_ptr, g_ptr, offs, valid, eps, SOURCE: tl.constexpr, FORM: tl.constexpr):
        if SOURCE == 0:
            x = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            w = tl.load(s_ptr + offs, mask=valid, other=0.0)
            if SOURCE == 1:
                g = w
            else:
                g = tl.load(g_ptr + offs, mask=valid, other=0.0)
            x = score_of(w, g, eps, SOURCE, FORM)
        return x

    @triton.jit
    def _block_keys(
        s_ptr,
        g_ptr,
        m_ptr,
        pid,
        n,
        eps,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Offsets, kept flags (False past the end) and keys of block `pid` of one tensor."""
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        x = _load_score(s_ptr, g_ptr, offs, valid, eps, SOURCE, FORM)
        kept = valid & (tl.load(m_ptr + offs, mask=valid, other=0) != 0)
        return offs, kept, float_key(x)

    @triton.jit
    def _histogram_kernel(
        s_ptr,
        g_ptr,
        m_ptr,
        hist_ptr,
        nan_ptr,
        n,
        eps,
        lo,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CONSUMED: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        acc = tl.zeros([1 << BITS], dtype=tl.int64)
        nan = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(pid * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            sel = offs < n
            x = _load_score(s_ptr, g_ptr, offs, sel, eps, SOURCE, FORM)
            if HAS_MASK:
                sel = sel & (tl.load(m_ptr + offs, mask=sel, other=0) != 0)
            ks = float_key(x)
            if CONSUMED == 0:
                digit = (ks >> (32 - BITS)) + (1 << (BITS - 1))
                nan += ((x != x) & sel).to(tl.int64)
            else:
                diff = ks - lo
                sel = sel & ((diff >> (32 - CONSUMED)) == 0)
                digit = (diff >> (32 - CONSUMED - BITS)) & ((1 << BITS) - 1)
            acc += tl.histogram(digit, 1 << BITS, mask=sel).to(tl.int64)
        tl.atomic_add(hist_ptr + tl.arange(0, 1 << BITS), acc)
        if CONSUMED == 0:
            tl.atomic_add(nan_ptr, tl.sum(nan, axis=0))

    @triton.jit
    def _equal_count_kernel(
        s_ptr,
        g_ptr,
        m_ptr,
        cnt_ptr,
        n,
        eps,
        T,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        PER_BLOCK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Entries equal to T among the kept: per tensor (atomic) or per block (for ranks)."""
        pid = tl.program_id(0).to(tl.int64)
        offs, kept, ks = _block_keys(s_ptr, g_ptr, m_ptr, pid, n, eps, SOURCE, FORM, BLOCK)
        c = tl.sum((kept & (ks == T)).to(tl.int64), axis=0)
        if PER_BLOCK:
            tl.store(cnt_ptr + pid, c)
        else:
            tl.atomic_add(cnt_ptr, c)

    @triton.jit
    def _mask_kernel(
        s_ptr,
        g_ptr,
        m_ptr,
        out_ptr,
        off_ptr,
        n,
        eps,
        T,
        r,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        TIES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """TIES 0: keep every entry equal to T; 1: remove them all; 2: remove rank < r."""
        pid = tl.program_id(0).to(tl.int64)
        offs, kept, ks = _block_keys(s_ptr, g_ptr, m_ptr, pid, n, eps, SOURCE, FORM, BLOCK)
        keep = kept & (ks > T)
        eq = kept & (ks == T)
        if TIES == 0:
            keep = keep | eq
        if TIES == 2:
            e = eq.to(tl.int64)
            rank = tl.load(off_ptr + pid) + tl.cumsum(e, axis=0) - e
            keep = keep | (eq & (rank >= r))
        tl.store(out_ptr + offs, keep.to(tl.uint8), mask=offs < n)


def _dummy_mask(device):
    return torch.ones(1, dtype=torch.uint8, device=device)


def _triton_histogram(src, masks, consumed, bits, lo, nan_out):
    device = src.tensors[0].device
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=device)
    for i in range(len(src)):
        n = src.numel(i)
        if n == 0:
            continue
        s, g, source, form = src.triton_args(i)
        m = masks[i].view(torch.uint8) if masks is not None else _dummy_mask(device)
        _histogram_kernel[(grid_size(n, BLOCK, device),)](
            s,
            g,
            m,
            hist,
            nan_out[i],
            n,
            src.eps,
            lo,
            SOURCE=source,
            FORM=form,
            HAS_MASK=masks is not None,
            CONSUMED=consumed,
            BITS=bits,
            BLOCK=BLOCK,
        )
    return hist.cpu()


def _triton_masks(src, masks, T, r):
    device = src.tensors[0].device
    counts = torch.zeros(len(src), dtype=torch.int64, device=device)
    args = [src.triton_args(i) for i in range(len(src))]
    if r:
        for i, (s, g, source, form) in enumerate(args):
            n = src.numel(i)
            if n:
                _equal_count_kernel[(triton.cdiv(n, BLOCK),)](
                    s,
                    g,
                    masks[i].view(torch.uint8),
                    counts[i:],
                    n,
                    src.eps,
                    T,
                    SOURCE=source,
                    FORM=form,
                    PER_BLOCK=False,
                    BLOCK=BLOCK,
                )
    counts = counts.tolist()
    out, budget = [], r
    for i, (s, g, source, form) in enumerate(args):
        n = src.numel(i)
        new = torch.empty_like(masks[i])
        take = min(budget, counts[i])
        ties = 1 if take == counts[i] and take > 0 else (0 if take == 0 else 2)
        offsets = _dummy_mask(device).long()
        if ties == 2:
            per_block = torch.empty(triton.cdiv(n, BLOCK), dtype=torch.int64, device=device)
            _equal_count_kernel[(per_block.numel(),)](
                s,
                g,
                masks[i].view(torch.uint8),
                per_block,
                n,
                src.eps,
                T,
                SOURCE=source,
                FORM=form,
                PER_BLOCK=True,
                BLOCK=BLOCK,
            )
            offsets = per_block.cumsum(0) - per_block
        if n:
            _mask_kernel[(triton.cdiv(n, BLOCK),)](
                s,
                g,
                masks[i].view(torch.uint8),
                new.view(torch.uint8),
                offsets,
                n,
                src.eps,
                T,
                take,
                SOURCE=source,
                FORM=form,
                TIES=ties,
                BLOCK=BLOCK,
            )
        budget -= take
        out.append(new)
    return out


# --------------------------------------------------------------------------- driver


def _radix_select(src, masks, k, names, backend):
    """(T, r): the signed key of the k-th smallest candidate, and how many of the k smallest
    candidates equal T. Raises on NaN among the candidates or k beyond their number."""
    digits = DIGITS_TRITON if backend == "triton" else DIGITS_TORCH
    consumed, lo_unsigned = 0, 0
    for bits in digits:
        lo = lo_unsigned - (1 << 31)  # the signed key where the current range starts
        if backend == "triton":
            nan = torch.zeros(len(src), dtype=torch.int64, device=src.tensors[0].device)
            hist = _triton_histogram(src, masks, consumed, bits, lo, nan)
            if consumed == 0 and bool(nan.any()):
                raise ValueError(f"{names[int(nan.nonzero()[0])]}: scores contain NaN")
        else:
            hist = _torch_histogram(src, masks, consumed, bits, lo)
            # NaN keys lie beyond those of +-inf; anything in the top bin of +inf or the
            # bottom bin of -inf (or past them) gets an exact chunked look that names the
            # tensor -- an extra pass only for inputs that hold infinities or NaN.
            if consumed == 0:
                half = 1 << (bits - 1)
                hi_inf = (POS_INF_KEY >> (32 - bits)) + half
                lo_inf = (NEG_INF_KEY >> (32 - bits)) + half
                if hist[hi_inf:].sum() + hist[: lo_inf + 1].sum() > 0:
                    _find_nan(src, masks, names)
        if consumed == 0:
            total = int(hist.sum())
            if not 1 <= k <= total:
                raise ValueError(f"k = {k} is out of range: {total} candidates")
        cum = hist.cumsum(0)
        d = int(torch.searchsorted(cum, torch.tensor([k]), side="left"))
        k -= int(cum[d - 1]) if d > 0 else 0
        consumed += bits
        lo_unsigned += d << (32 - consumed)
    return lo_unsigned - (1 << 31), k


def _key_to_float(T: int) -> torch.Tensor:
    b = torch.tensor([T], dtype=torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)[0]


def kth_smallest(
    tensors: Sequence[torch.Tensor], k: int, *, masks=None, names=None, backend: str = "auto"
) -> torch.Tensor:
    """The exact k-th smallest value (1-based) among all entries of all tensors (of the kept
    entries where `masks` is given), as a 0-dim float32 tensor; -0.0 comes back as +0.0."""
    src = _Source(scores=tensors)
    if not len(src):
        raise ValueError("no tensors given")
    names = _validate(src, masks, names)
    be = pick(backend, *src.tensors)
    T, _ = _radix_select(src, masks, int(k), names, be)
    return _key_to_float(T)


def _prune(src, masks, n, names, backend):
    names = _validate(src, masks, names)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not len(src) or n == 0:
        if n == 0:
            return [m.clone() for m in masks]
        raise ValueError(f"cannot remove {n} entries: no tensors given")
    be = pick(backend, *src.tensors, *masks)
    try:
        T, r = _radix_select(src, masks, int(n), names, be)
    except ValueError as e:
        if "out of range" in str(e):
            kept = sum(int(m.sum()) for m in masks)
            raise ValueError(f"cannot remove {n} entries: {kept} are kept") from None
        raise
    return (_triton_masks if be == "triton" else _torch_masks)(src, masks, T, r)


def prune_lowest(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    n: int,
    names: Sequence[str] | None = None,
    *,
    backend: str = "auto",
):
    """New bool masks with exactly `n` more entries removed, lowest score first.

    `scores[i]` and `masks[i]` have the same shape; only entries with `masks[i] == True` are
    candidates. NaN among them is an error naming the tensor; +inf is allowed.
    """
    return _prune(_Source(scores=scores), list(masks), n, names, backend)


def prune_lowest_fused(
    weights,
    grads,
    masks,
    n,
    *,
    strategy: str,
    form: str = "taylor",
    eps: float = 0.0,
    names=None,
    backend: str = "auto",
):
    """`prune_lowest(saliency(w, g), masks, n)` without ever storing the scores."""
    if strategy not in STRATEGY_CODES:
        raise ValueError(f"fused selection takes strategy mp, gp or up, got {strategy!r}")
    if strategy != "mp" and grads is None:
        raise ValueError(f"strategy {strategy} needs the gradients")
    src = _Source(weights=weights, grads=grads, strategy=strategy, form=form, eps=eps)
    return _prune(src, list(masks), n, names, backend)


def prune_lowest_ref(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], n: int):
    """Reference: stable sort of the kept scores, concatenated (4N bytes more memory)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = torch.cat([m.reshape(-1) for m in masks])
    candidates = keep.nonzero().squeeze(1)
    order = torch.sort(flat[candidates], stable=True).indices[:n]
    keep = keep.clone()
    keep[candidates[order]] = False
    out, start = [], 0
    for m in masks:
        out.append(keep[start : start + m.numel()].view_as(m))
        start += m.numel()
    return out
