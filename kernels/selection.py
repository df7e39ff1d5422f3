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

Layouts: every input may be strided in any way (channels_last, transposed, sliced, expanded);
entries are paired and ties broken by logical (row-major) index, and the new masks take the
old masks' layout. How each path reads them: `rdfast.kernels._layout`. bf16 and fp16 scores
are compared as their exact fp32 values.

Extra memory is O(bins) plus one bounded chunk, whatever the number of weights or layouts:
- Triton: digits of 11/11/10 bits (2,048-bin histograms in registers, merged with one atomic
  add per program), a count pass for the entries equal to T, the mask pass.
- torch (CPU): digits of 16/16 bits -- a 65,536-bin `bincount` costs the CPU no more than a
  2,048-bin one and saves a pass -- over chunks of CHUNK elements, and a mask pass that hands
  out the tie budget chunk by chunk in flat order.
NaN among the candidates is an error naming the tensor; +inf is allowed. Removing n = 0
entries reads no score: the masks come back as copies and NaN goes unnoticed there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from rdfast.kernels._backend import HAS_TRITON, grid_size, pick, tl, triton
from rdfast.kernels._float_key import float_key_torch
from rdfast.kernels._layout import kernel_view, logical_slices, padded, same_layout
from rdfast.kernels.saliency import FORM_CODES, STRATEGY_CODES, saliency_ref

FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
DIGITS_TRITON = (11, 11, 10)
DIGITS_TORCH = (16, 16)
# 2^18 fp32 scores = 1 MiB per chunk. On the 2-core CPU, 1e8 scores in 100 tensors: 2^16 took
# 2.3 s (per-call overhead), 2^18 and 2^20 1.2 s, with 2^20 holding ~40 MB more at its peak.
CHUNK = 1 << 18
BLOCK = 1024


class NaNScoreError(ValueError):
    """NaN among the candidate scores; the message names the tensor."""


class TooFewCandidates(ValueError):
    """k (or n) beyond the number of candidates."""


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
        self._geometry = {}

    def __len__(self):
        return len(self.tensors)

    def numel(self, i):
        return self.tensors[i].numel()

    def operands(self, i, masks):
        """The tensors read for tensor i: scores (or weight), gradient, mask, if present."""
        ops = [self.tensors[i]]
        if self.fused and self.grads is not None:
            ops.append(self.grads[i])
        if masks is not None:
            ops.append(masks[i])
        return ops

    def ranges(self, i, masks):
        """(start, end, index) in logical order, at most CHUNK entries each: flat views when
        every operand is contiguous, bounded logical slices otherwise (index not None)."""
        n = self.numel(i)
        if all(t.is_contiguous() for t in self.operands(i, masks)):
            for start in range(0, n, CHUNK):
                yield start, min(start + CHUNK, n), None
        else:
            yield from logical_slices(self.tensors[i].shape, CHUNK)

    def chunk(self, i, start, end, index) -> torch.Tensor:
        """fp32 scores of the logical range [start, end) of tensor i."""

        def part(t):
            return t.reshape(-1)[start:end] if index is None else t[index].reshape(-1)

        if not self.fused:
            x = part(self.tensors[i])
            return x if x.dtype == torch.float32 else x.float()
        g = part(self.grads[i]) if self.grads is not None else None
        return saliency_ref(part(self.tensors[i]), g, self.strategy, self.form, self.eps)

    def pieces(self, masks):
        """Scores in logical order as (x, kept, segments), x at most CHUNK fp32 values.

        Large pieces come as they are; small ones are packed into one buffer (copied,
        bounded by CHUNK) so that 100 tensors of 1e4 entries cost a few torch calls per pass
        instead of a few hundred. `segments` lists (tensor, start, end, index, offset in x).
        """
        buf_x = buf_m = None
        pending, fill = [], 0

        def flush():
            nonlocal pending, fill
            out = (buf_x[:fill], None if buf_m is None else buf_m[:fill], pending)
            pending, fill = [], 0
            return out

        for i in range(len(self)):
            for start, end, index in self.ranges(i, masks):
                x = self.chunk(i, start, end, index)
                kept = None
                if masks is not None:
                    m = masks[i]
                    kept = m.reshape(-1)[start:end] if index is None else m[index].reshape(-1)
                size = end - start
                if 2 * size > CHUNK:  # a large piece: no copy, after what is pending
                    if fill:
                        yield flush()
                    yield x, kept, [(i, start, end, index, 0)]
                    continue
                if fill + size > CHUNK:
                    yield flush()
                if buf_x is None:
                    buf_x = torch.empty(CHUNK, dtype=torch.float32, device=x.device)
                    buf_m = (
                        None
                        if masks is None
                        else torch.empty(CHUNK, dtype=torch.bool, device=x.device)
                    )
                buf_x[fill : fill + size] = x
                if buf_m is not None:
                    buf_m[fill : fill + size] = kept
                pending.append((i, start, end, index, fill))
                fill += size
        if fill:
            yield flush()

    # ------------------------------------------------------------------ Triton arguments
    def triton_args(self, i):
        w = kernel_view(self.tensors[i])
        if not self.fused:
            return w, w, 0, 0
        g = kernel_view(self.grads[i]) if self.grads is not None else w
        return w, g, STRATEGY_CODES[self.strategy], FORM_CODES[self.form]

    def walk(self, i, masks, out=None, ordered=False, name="tensor"):
        """(LOGICAL, geometry) for one launch over tensor i: memory order when it is safe
        (module docstring of `_layout`), else logical indices through each operand's strides.
        `ordered`: the launch depends on the order of the entries (tie ranks)."""
        ops = self.operands(i, masks) + ([out] if out is not None else [])
        if all(t.is_contiguous() for t in ops) or (not ordered and same_layout(*ops)):
            return False, None
        key = (i, out is not None)
        if key not in self._geometry:
            g = self.grads[i] if self.fused and self.grads is not None else self.tensors[i]
            m = masks[i] if masks is not None else self.tensors[i]
            o = out if out is not None else m
            sizes, _ = padded(self.tensors[i], name)
            strides = [padded(t, name)[1] for t in (self.tensors[i], g, m, o)]
            self._geometry[key] = torch.tensor(
                sizes[1:] + [s for st in strides for s in st],
                dtype=torch.int64,
                device=self.tensors[i].device,
            )
        return True, self._geometry[key]


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
        if src.fused and src.grads is not None:
            g = src.grads[i]
            if g.shape != t.shape:
                raise ValueError(
                    f"{names[i]}: gradient {tuple(g.shape)} and weight {tuple(t.shape)} differ"
                )
            if g.dtype not in FLOAT_TYPES:
                raise ValueError(
                    f"{names[i]}: gradient must be float32, bfloat16 or float16, got {g.dtype}"
                )
        if masks is not None:
            if masks[i].shape != t.shape:
                raise ValueError(
                    f"{names[i]}: scores {tuple(t.shape)} and mask {tuple(masks[i].shape)} differ"
                )
            if masks[i].dtype != torch.bool:
                raise ValueError(f"{names[i]}: mask must be bool, got {masks[i].dtype}")
    devices = {t.device for t in src.tensors} | {m.device for m in masks or []}
    if src.fused and src.grads is not None:
        devices |= {g.device for g in src.grads}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return names


def _find_nan(src: _Source, masks, names):
    """Raise naming the first tensor with a NaN among its candidates, if there is one.

    Chunked like the passes; runs only when the first histogram saw keys beyond +-inf."""
    for x, kept, segments in src.pieces(masks):
        bad = (x & 0x7FFFFFFF) > POS_INF_KEY if _abs_bits(src) else torch.isnan(x)
        if kept is not None:
            bad &= kept
        if bad.any():
            first = int(bad.nonzero()[0])
            i = next(i for i, start, end, _, off in segments if off <= first < off + end - start)
            raise NaNScoreError(f"{names[i]}: scores contain NaN")


# --------------------------------------------------------------------------- torch path


def _abs_bits(src) -> bool:
    """Whether `src` hands out the int32 bits of fp32 values whose scores are their absolute
    values (`rdfast.pruning.streaming`: magnitudes straight from the file, no copy): the key of |v|
    is then the bits with the sign cleared, one op where the float key takes five."""
    return getattr(src, "abs_bits", False)


def _piece_keys(src, x: torch.Tensor) -> torch.Tensor:
    """The int32 keys of a piece of scores."""
    return x & 0x7FFFFFFF if _abs_bits(src) else float_key_torch(x)


def _u16_halves(x: torch.Tensor):
    """(high, low) 16 bits of each int32 of a CPU tensor as numpy uint16 views, the sign bit
    of the high half cleared: the top and low digits of |v|'s key without computing it."""
    u = x.numpy().view(np.uint16)
    hi, lo = (u[1::2], u[0::2]) if sys.byteorder == "little" else (u[0::2], u[1::2])
    return hi & 0x7FFF, lo


def _torch_top_histogram(src, masks, bits):
    """Histogram of the top `bits` bits of the candidates' keys (unsigned order)."""
    hist = torch.zeros(1 << bits, dtype=torch.int64)
    shift = 32 - bits
    half = 1 << (bits - 1)
    for x, kept, _ in src.pieces(masks):
        if _abs_bits(src) and kept is None and x.device.type == "cpu" and bits == 16:
            # Keys of |v| are >= 0: their top digits, the high halves with the sign cleared,
            # fill the upper half of the histogram (numpy: 1e6 values in ~0.8 ms, where the
            # key, shift, offset and torch.bincount take ~2).
            hi, _ = _u16_halves(x)
            hist[half:] += torch.from_numpy(np.bincount(hi, minlength=half))
            continue
        # Unsigned key >> shift == (signed key >> shift) + 2^(bits - 1).
        d = (_piece_keys(src, x) >> shift) + half
        if kept is not None and not bool(kept.all()):
            d = d[kept]
        hist += torch.bincount(d, minlength=1 << bits).cpu()
    return hist


def _torch_low_histograms(src, masks, prefixes, bits):
    """One histogram of the low `32 - bits` bits per top digit in `prefixes`, from one read
    of the scores: slot s of the result holds the keys whose top digit is prefixes[s]."""
    low = 32 - bits
    lookup = torch.full((1 << bits,), -1, dtype=torch.int64)
    lookup[torch.tensor(prefixes, dtype=torch.int64)] = torch.arange(len(prefixes))
    hist = torch.zeros(len(prefixes) << low, dtype=torch.int64)
    for x, kept, _ in src.pieces(masks):
        if x.device.type == "cpu":
            _cpu_low_histograms(src, x, kept, prefixes, bits, hist)
            continue
        ks = _piece_keys(src, x)
        if len(prefixes) == 1:  # one k: a compare instead of a gather (1e8 scores: -30 %)
            sel = (ks >> low) == prefixes[0] - (1 << (bits - 1))
            slot = None
        else:
            slot = lookup.to(x.device)[(ks >> low) + (1 << (bits - 1))]
            sel = slot >= 0
        if kept is not None:
            sel &= kept
        d = ks[sel] & ((1 << low) - 1)
        if slot is not None:
            d = (slot[sel] << low) | d.long()
        hist += torch.bincount(d, minlength=len(prefixes) << low).cpu()
    return hist


def _cpu_low_histograms(src, x, kept, prefixes, bits, hist) -> None:
    """`_torch_low_histograms` for one piece on the CPU, through numpy: its boolean indexing
    is 2.5x faster than torch's on a sparse selection (1e6 keys, 0.5 % under the digit:
    1.3 ms against 2.7 on two cores), one compare per top digit instead of a gather."""
    km = None if kept is None else kept.numpy()
    low = 32 - bits
    width = 1 << low
    if _abs_bits(src) and bits == 16:
        top, rest = _u16_halves(x)
    else:
        kn = _piece_keys(src, x).numpy()
        top, rest = kn >> low, kn & (width - 1)
    for s, p in enumerate(prefixes):
        sel = top == p - (1 << (bits - 1))
        if km is not None:
            sel &= km
        d = np.bincount(rest[sel], minlength=width)
        hist[s * width : (s + 1) * width] += torch.from_numpy(d)


def _torch_select(src, masks, ks, names, group):
    """[(T, r)] for each k of `ks`, all from the same two reads of the scores.

    Keys are split 16/16 bits: the first pass histograms the top digit, the second the low
    digit of the keys under each k's top digit (one histogram per distinct top digit)."""
    bits = DIGITS_TORCH[0]
    hist = _all_reduce(_torch_top_histogram(src, masks, bits), group)
    # NaN keys lie beyond those of +-inf; anything in the top bin of +inf or the bottom bin
    # of -inf (or past them) gets an exact chunked look that names the tensor -- an extra
    # pass only for inputs that hold infinities or NaN.
    half = 1 << (bits - 1)
    hi_inf = (POS_INF_KEY >> (32 - bits)) + half
    lo_inf = (NEG_INF_KEY >> (32 - bits)) + half
    if hist[hi_inf:].sum() + hist[: lo_inf + 1].sum() > 0:
        _agree_on_nan(lambda: _find_nan(src, masks, names), group)
    total = int(hist.sum())
    for k in ks:
        if not 1 <= k <= total:
            raise TooFewCandidates(f"k = {k} is out of range: {total} candidates")
    cum = hist.cumsum(0)
    tops = [int(torch.searchsorted(cum, torch.tensor([k]), side="left")) for k in ks]
    rest = [k - (int(cum[d - 1]) if d > 0 else 0) for k, d in zip(ks, tops)]
    prefixes = sorted(set(tops))
    low = 32 - bits
    lows = _all_reduce(_torch_low_histograms(src, masks, prefixes, bits), group)
    out = []
    for d, k in zip(tops, rest):
        sub = lows[prefixes.index(d) << low : (prefixes.index(d) + 1) << low].cumsum(0)
        e = int(torch.searchsorted(sub, torch.tensor([k]), side="left"))
        k -= int(sub[e - 1]) if e > 0 else 0
        out.append((((d << low) | e) - (1 << 31), k))
    return out


def keep_chunk(ks, kept, T, budget):
    """(keep, budget left) for one chunk of keys in logical order: entries above T stay, and
    of those equal to T the first `budget` go (the tie boundary may fall inside the chunk).
    `ks` is a torch tensor or a numpy array (streamed 16-bit keys), `keep` the same kind."""
    if not budget:  # no tie left to remove: one compare (1e6 keys: 0.3 ms, 1.5 for three)
        keep = ks >= T
        return (keep if kept is None else keep & kept), 0
    above = ks > T
    eq = ks == T
    if kept is not None:
        above &= kept
        eq &= kept
    c = count_true(eq)
    if c <= budget:  # every equal entry of this chunk goes
        return above, budget - c
    return above | (eq & (eq.cumsum(0) > budget)), 0


def count_true(x) -> int:
    """True entries of a bool torch tensor or numpy array."""
    return int(np.count_nonzero(x)) if isinstance(x, np.ndarray) else int(torch.count_nonzero(x))


def _torch_equal_count(src, masks, T):
    count = 0
    for x, kept, _ in src.pieces(masks):
        eq = _piece_keys(src, x) == T
        count += int((eq if kept is None else eq & kept).sum())
    return count


def _torch_masks(src, masks, T, r, group):
    """Keep entries above T; of those equal to T remove the first r in logical order.

    The new masks take the layout of the old ones (channels_last stays channels_last)."""
    out = [torch.empty_like(m) for m in masks]
    for i, start, end, index, keep in _kept_parts(src, masks, T, r, group):
        target = _region(out[i], start, end, index)
        target.copy_(keep.view(target.shape))
    return out


def _kept_parts(src, masks, T, r, group):
    """(tensor, start, end, index, keep) for every segment of the pieces, in logical order:
    entries above T kept, of those equal to T the first r (this process's share) removed."""
    if group is not None and r:
        r = _rank_budget(r, _torch_equal_count(src, masks, T), group)
    budget = r
    for x, kept, segments in src.pieces(masks):
        keep, budget = keep_chunk(_piece_keys(src, x), kept, T, budget)
        for i, start, end, index, offset in segments:
            yield i, start, end, index, keep[offset : offset + end - start]


def _region(t: torch.Tensor, start: int, end: int, index) -> torch.Tensor:
    """The entries of `t` a segment names, as a view: flat when `t` is contiguous, else
    through the segment's logical index (the whole tensor when it has none)."""
    if index is None and t.is_contiguous():
        return t.view(-1)[start:end]
    return t[index] if index is not None else t


# --------------------------------------------------------------------------- processes
# A model sharded over processes wants one global threshold. The histograms add up across
# processes, so one all_reduce per pass gives every process the exact global (T, r): 512 KiB
# per pass on the torch path (65,536 int64 bins), 16 KiB on the Triton path (2,048). Ties go
# in rank order, then in each process's own (tensor, index) order: every process learns how
# many entries equal to T the lower ranks hold (one all_gather of an int64).


def _collective_device(group):
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return t
    import torch.distributed as dist

    buf = t.to(_collective_device(group))
    dist.all_reduce(buf, group=group)
    return buf.to(t.device)


def _rank_budget(r: int, local_equal: int, group) -> int:
    """Of the r entries equal to T that go, how many fall to this process."""
    import torch.distributed as dist

    dev = _collective_device(group)
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local_equal], dtype=torch.int64, device=dev), group=group)
    before = sum(int(c) for c in counts[: dist.get_rank(group)])
    return min(max(r - before, 0), local_equal)


def _agree_on_nan(check, group):
    """Run `check` (raises NaNScoreError); with a group, every process raises if any did,
    so that none waits in the next collective for a process that stopped."""
    try:
        check()
        local = None
    except NaNScoreError as e:
        local = e
    if group is not None:
        flag = _all_reduce(torch.tensor([int(local is not None)]), group)
        if int(flag) and local is None:
            raise NaNScoreError("scores contain NaN in another process")
    if local is not None:
        raise local


# --------------------------------------------------------------------------- Triton path

if HAS_TRITON:
    from rdfast.kernels._float_key import float_key
    from rdfast.kernels._layout import at, to_f32, unravel
    from rdfast.kernels.saliency import score_of

    @triton.jit
    def _offsets(lin, geom_ptr, LOGICAL: tl.constexpr):
        """Memory offsets of logical indices `lin` in the four operands (scores or weight,
        gradient, mask, output); in memory-order launches all four are `lin` itself."""
        if LOGICAL:
            i0, i1, i2, i3 = unravel(
                lin, tl.load(geom_ptr), tl.load(geom_ptr + 1), tl.load(geom_ptr + 2)
            )
            so = at(i0, i1, i2, i3, tl.load(geom_ptr + 3), tl.load(geom_ptr + 4),
                    tl.load(geom_ptr + 5), tl.load(geom_ptr + 6))  # fmt: skip
            go = at(i0, i1, i2, i3, tl.load(geom_ptr + 7), tl.load(geom_ptr + 8),
                    tl.load(geom_ptr + 9), tl.load(geom_ptr + 10))  # fmt: skip
            mo = at(i0, i1, i2, i3, tl.load(geom_ptr + 11), tl.load(geom_ptr + 12),
                    tl.load(geom_ptr + 13), tl.load(geom_ptr + 14))  # fmt: skip
            oo = at(i0, i1, i2, i3, tl.load(geom_ptr + 15), tl.load(geom_ptr + 16),
                    tl.load(geom_ptr + 17), tl.load(geom_ptr + 18))  # fmt: skip
        else:
            so = lin
            go = lin
            mo = lin
            oo = lin
        return so, go, mo, oo

    @triton.jit
    def _load_score(s_ptr, g_ptr, so, go, valid, eps, SOURCE: tl.constexpr, FORM: tl.constexpr):
        if SOURCE == 0:
            x = to_f32(tl.load(s_ptr + so, mask=valid, other=0))
        else:
            w = tl.load(s_ptr + so, mask=valid, other=0)
            if SOURCE == 1:
                g = w
            else:
                g = tl.load(g_ptr + go, mask=valid, other=0)
            x = score_of(w, g, eps, SOURCE, FORM)
        return x

    @triton.jit
    def _keys(
        s_ptr, g_ptr, m_ptr, geom_ptr, lin, valid, eps,
        SOURCE: tl.constexpr, FORM: tl.constexpr, HAS_MASK: tl.constexpr, LOGICAL: tl.constexpr,
    ):  # fmt: skip
        """Scores, kept flags (False past the end), keys and output offsets of indices `lin`."""
        so, go, mo, oo = _offsets(lin, geom_ptr, LOGICAL)
        x = _load_score(s_ptr, g_ptr, so, go, valid, eps, SOURCE, FORM)
        kept = valid
        if HAS_MASK:
            kept = valid & (tl.load(m_ptr + mo, mask=valid, other=0) != 0)
        return x, kept, float_key(x), oo

    @triton.jit
    def _histogram_kernel(
        s_ptr, g_ptr, m_ptr, geom_ptr, hist_ptr, nan_ptr, n, eps, lo,
        SOURCE: tl.constexpr, FORM: tl.constexpr, HAS_MASK: tl.constexpr,
        LOGICAL: tl.constexpr, CONSUMED: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        acc = tl.zeros([1 << BITS], dtype=tl.int64)
        nan = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(pid * BLOCK, n, step):
            lin = start + tl.arange(0, BLOCK)
            x, sel, ks, _ = _keys(
                s_ptr, g_ptr, m_ptr, geom_ptr, lin, lin < n, eps, SOURCE, FORM, HAS_MASK, LOGICAL
            )
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
        s_ptr, g_ptr, m_ptr, geom_ptr, cnt_ptr, n, eps, T,
        SOURCE: tl.constexpr, FORM: tl.constexpr, LOGICAL: tl.constexpr,
        PER_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Entries equal to T among the kept: per tensor (atomic) or per block (for ranks)."""
        pid = tl.program_id(0).to(tl.int64)
        lin = pid * BLOCK + tl.arange(0, BLOCK)
        _, kept, ks, _ = _keys(
            s_ptr, g_ptr, m_ptr, geom_ptr, lin, lin < n, eps, SOURCE, FORM, True, LOGICAL
        )
        c = tl.sum((kept & (ks == T)).to(tl.int64), axis=0)
        if PER_BLOCK:
            tl.store(cnt_ptr + pid, c)
        else:
            tl.atomic_add(cnt_ptr, c)

    @triton.jit
    def _mask_kernel(
        s_ptr, g_ptr, m_ptr, geom_ptr, out_ptr, off_ptr, n, eps, T, r,
        SOURCE: tl.constexpr, FORM: tl.constexpr, LOGICAL: tl.constexpr,
        TIES: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """TIES 0: keep every entry equal to T; 1: remove them all; 2: remove rank < r (ranks
        in logical order: launched with LOGICAL unless every operand is contiguous)."""
        pid = tl.program_id(0).to(tl.int64)
        lin = pid * BLOCK + tl.arange(0, BLOCK)
        valid = lin < n
        _, kept, ks, oo = _keys(
            s_ptr, g_ptr, m_ptr, geom_ptr, lin, valid, eps, SOURCE, FORM, True, LOGICAL
        )
        keep = kept & (ks > T)
        eq = kept & (ks == T)
        if TIES == 0:
            keep = keep | eq
        if TIES == 2:
            e = eq.to(tl.int64)
            rank = tl.load(off_ptr + pid) + tl.cumsum(e, axis=0) - e
            keep = keep | (eq & (rank >= r))
        tl.store(out_ptr + oo, keep.to(tl.uint8), mask=valid)


def _dummy(device, dtype=torch.uint8):
    return torch.ones(1, dtype=dtype, device=device)


# Compiled Triton contracts a*b + c into one FMA; the torch reference rounds twice. The
# kernels that compute scores are compiled without contraction, so both give the same bits
# (and the same threshold on ties).
NO_FMA = {"enable_fp_fusion": False}


def _options(logical: bool) -> dict:
    """Launch options. Logical indexing keeps four int64 offsets per element: at 4 warps
    (8 elements a thread) the mask pass took 128-168 registers and spilled on sm_90; 8 warps
    halve the elements per thread (ptxas figures: benchmarks/README.md)."""
    return {**NO_FMA, "num_warps": 8 if logical else 4}


def _triton_histogram(src, masks, consumed, bits, lo, nan_out, names):
    device = src.tensors[0].device
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=device)
    for i in range(len(src)):
        n = src.numel(i)
        if n == 0:
            continue
        s, g, source, form = src.triton_args(i)
        logical, geom = src.walk(i, masks, name=names[i])
        m = kernel_view(masks[i]) if masks is not None else _dummy(device)
        _histogram_kernel[(grid_size(n, BLOCK, device),)](
            s,
            g,
            m,
            geom if logical else _dummy(device, torch.int64),
            hist,
            nan_out[i] if nan_out is not None else _dummy(device, torch.int64),
            n,
            src.eps,
            lo,
            SOURCE=source,
            FORM=form,
            HAS_MASK=masks is not None,
            LOGICAL=logical,
            CONSUMED=consumed,
            BITS=bits,
            BLOCK=BLOCK,
            **_options(logical),
        )
    return hist.cpu()


def _triton_count(src, masks, i, T, out, per_block, names):
    """Kept entries of tensor i equal to T, into `out` (one cell, or one per block)."""
    s, g, source, form = src.triton_args(i)
    n = src.numel(i)
    logical, geom = src.walk(i, masks, ordered=per_block, name=names[i])
    _equal_count_kernel[(triton.cdiv(n, BLOCK),)](
        s,
        g,
        kernel_view(masks[i]),
        geom if logical else _dummy(s.device, torch.int64),
        out,
        n,
        src.eps,
        T,
        SOURCE=source,
        FORM=form,
        LOGICAL=logical,
        PER_BLOCK=per_block,
        BLOCK=BLOCK,
        **_options(logical),
    )


def _triton_masks(src, masks, T, r, names, group):
    device = src.tensors[0].device if len(src) else torch.device("cpu")
    counts = torch.zeros(len(src), dtype=torch.int64, device=device)
    if r:
        for i in range(len(src)):
            if src.numel(i):
                _triton_count(src, masks, i, T, counts[i:], False, names)
    counts = counts.tolist()
    if group is not None and r:
        r = _rank_budget(r, sum(counts), group)
    out, budget = [], r
    for i in range(len(src)):
        n = src.numel(i)
        new = torch.empty_like(masks[i])  # the old mask's layout, channels_last included
        take = min(budget, counts[i])
        ties = 1 if take == counts[i] and take > 0 else (0 if take == 0 else 2)
        offsets = _dummy(device, torch.int64)
        if ties == 2:
            per_block = torch.empty(triton.cdiv(n, BLOCK), dtype=torch.int64, device=device)
            _triton_count(src, masks, i, T, per_block, True, names)
            offsets = per_block.cumsum(0) - per_block
        if n:
            s, g, source, form = src.triton_args(i)
            logical, geom = src.walk(i, masks, out=new, ordered=ties == 2, name=names[i])
            _mask_kernel[(triton.cdiv(n, BLOCK),)](
                s,
                g,
                kernel_view(masks[i]),
                geom if logical else _dummy(device, torch.int64),
                kernel_view(new),
                offsets,
                n,
                src.eps,
                T,
                take,
                SOURCE=source,
                FORM=form,
                LOGICAL=logical,
                TIES=ties,
                BLOCK=BLOCK,
                **_options(logical),
            )
        budget -= take
        out.append(new)
    return out


# --------------------------------------------------------------------------- driver


def _triton_select(src, masks, k, names, group):
    """(T, r) through 11/11/10-bit digits, one histogram launch per tensor and digit."""
    consumed, lo_unsigned = 0, 0
    device = src.tensors[0].device
    for bits in DIGITS_TRITON:
        lo = lo_unsigned - (1 << 31)  # the signed key where the current range starts
        if consumed == 0:
            nan = torch.zeros(len(src), dtype=torch.int64, device=device)
            hist = _all_reduce(_triton_histogram(src, masks, 0, bits, lo, nan, names), group)

            def check(nan=nan):
                if bool(nan.any()):
                    raise NaNScoreError(f"{names[int(nan.nonzero()[0])]}: scores contain NaN")

            _agree_on_nan(check, group)
            total = int(hist.sum())
            if not 1 <= k <= total:
                raise TooFewCandidates(f"k = {k} is out of range: {total} candidates")
        else:
            hist = _all_reduce(
                _triton_histogram(src, masks, consumed, bits, lo, None, names), group
            )
        cum = hist.cumsum(0)
        d = int(torch.searchsorted(cum, torch.tensor([k]), side="left"))
        k -= int(cum[d - 1]) if d > 0 else 0
        consumed += bits
        lo_unsigned += d << (32 - consumed)
    return lo_unsigned - (1 << 31), k


def _radix_select(src, masks, k, names, backend, group=None):
    """(T, r): the signed key of the k-th smallest candidate, and how many of the k smallest
    candidates equal T. Raises on NaN among the candidates or k beyond their number."""
    if backend == "triton":
        return _triton_select(src, masks, k, names, group)
    return _torch_select(src, masks, [k], names, group)[0]


def float_of_key(T: int) -> torch.Tensor:
    """The float32 whose selection key is T (the inverse of `float_key_torch`)."""
    b = torch.tensor([T], dtype=torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)[0]


GROUP_DOC = """`group`: a `torch.distributed` process group over which the tensors are spread; every
process passes its own tensors and gets the result of the selection over all of them (ties
in rank order), k and n counting over all processes."""


def kth_smallest(
    tensors: Sequence[torch.Tensor],
    k: int,
    *,
    masks=None,
    names=None,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """The exact k-th smallest value (1-based) among all entries of all tensors (of the kept
    entries where `masks` is given), as a 0-dim float32 tensor; -0.0 comes back as +0.0."""
    src = _Source(scores=tensors)
    if not len(src) and group is None:
        raise ValueError("no tensors given")
    names = _validate(src, masks, names)
    be = pick(backend, *src.tensors)
    T, _ = _radix_select(src, masks, int(k), names, be, group)
    return float_of_key(T)


def _prune(src, masks, n, names, backend, group):
    names = _validate(src, masks, names)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return [m.clone() for m in masks]
    if not len(src) and group is None:
        raise ValueError(f"cannot remove {n} entries: no tensors given")
    be = pick(backend, *src.tensors, *masks)
    T, r = _select_n(src, masks, n, names, be, group)
    if be == "triton":
        return _triton_masks(src, masks, T, r, names, group)
    return _torch_masks(src, masks, T, r, group)


def _select_n(src, masks, n, names, backend, group):
    """(T, r) of removing n entries, or TooFewCandidates saying how many are kept."""
    try:
        return _radix_select(src, masks, int(n), names, backend, group)
    except TooFewCandidates:
        if masks is None:
            counts = [src.numel(i) for i in range(len(src))]
        else:
            counts = [int(m.sum()) for m in masks]
        kept = _all_reduce(torch.tensor([sum(counts)]), group)
        raise TooFewCandidates(f"cannot remove {n} entries: {int(kept)} are kept") from None


def prune_lowest(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    n: int,
    names: Sequence[str] | None = None,
    *,
    backend: str = "auto",
    group=None,
):
    """New bool masks with exactly `n` more entries removed, lowest score first.

    `scores[i]` and `masks[i]` have the same shape; only entries with `masks[i] == True` are
    candidates. NaN among them is an error naming the tensor; +inf is allowed.
    """
    return _prune(_Source(scores=scores), list(masks), n, names, backend, group)


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
    group=None,
):
    """`prune_lowest(saliency(w, g), masks, n)` without ever storing the scores."""
    src = _fused_source(weights, grads, strategy, form, eps)
    return _prune(src, list(masks), n, names, backend, group)


def _fused_source(weights, grads, strategy, form, eps) -> _Source:
    if strategy not in STRATEGY_CODES:
        raise ValueError(f"fused selection takes strategy mp, gp or up, got {strategy!r}")
    if strategy != "mp" and grads is None:
        raise ValueError(f"strategy {strategy} needs the gradients")
    return _Source(weights=weights, grads=grads, strategy=strategy, form=form, eps=eps)


@torch.no_grad()
def zero_lowest_fused(
    weights,
    grads,
    n,
    *,
    strategy: str,
    form: str = "taylor",
    eps: float = 0.0,
    names=None,
    group=None,
) -> list[int]:
    """Zero, in place, the `n` weights of lowest saliency(w, g) among all of them -- the
    weights `prune_lowest_fused` with all-true masks removes, ties alike -- without any
    mask: the memory beyond weights and gradients is a chunk of scores (2^20 fp32) and the
    histograms, where masks would take a byte a weight (300 MB for 3e8 weights). Returns
    the weights kept per tensor. Torch path on every device (three reads, one write)."""
    src = _fused_source(weights, grads, strategy, form, eps)
    names = _validate(src, None, names)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kept = [int(w.numel()) for w in src.tensors]
    if n == 0:
        return kept
    T, r = _select_n(src, None, n, names, "torch", group)
    # The scores of a piece are computed before its weights are zeroed, and no piece is read
    # twice: zeroing as the pass goes changes no later score.
    for i, start, end, index, keep in _kept_parts(src, None, T, r, group):
        w = src.tensors[i]
        kept[i] -= keep.numel() - int(torch.count_nonzero(keep))
        target = _region(w, start, end, index)
        target.mul_(keep.view(target.shape).to(w.dtype))
    return kept


for _f in (kth_smallest, prune_lowest, prune_lowest_fused):
    _f.__doc__ += "\n\n    " + GROUP_DOC.replace("\n", "\n    ")


def select_thresholds(source, ks: Sequence[int], names: Sequence[str], *, group=None):
    """[(T, r)] for each k of `ks` over the scores `source.pieces(None)` yields, from the same
    two reads: T the signed key of the k-th smallest score, r how many of the k smallest
    equal T. For scores read from disk (`rdfast.pruning.streaming`): torch path only."""
    return _torch_select(source, None, [int(k) for k in ks], list(names), group)


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
