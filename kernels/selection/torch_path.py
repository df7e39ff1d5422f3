"""The torch path of the selection (CPU, and CUDA without Triton): keys split 16/16 bits --
a 65,536-bin `bincount` costs the CPU no more than a 2,048-bin one and saves a pass -- over
pieces of at most CHUNK entries, and a mask pass that hands out the tie budget piece by piece
in logical order. Extra memory: the histograms and one piece."""

from __future__ import annotations

import sys

import numpy as np
import torch

from rdfast.kernels._float_key import float_key_torch
from rdfast.kernels.selection.collectives import agree_on_nan, all_reduce, rank_budget
from rdfast.kernels.selection.source import (
    NEG_INF_KEY,
    POS_INF_KEY,
    TooFewCandidates,
    abs_bits,
    find_nan,
)

DIGITS = (16, 16)


def piece_keys(src, x: torch.Tensor) -> torch.Tensor:
    """The int32 keys of a piece of scores."""
    return x & 0x7FFFFFFF if abs_bits(src) else float_key_torch(x)


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
        if abs_bits(src) and kept is None and x.device.type == "cpu" and bits == 16:
            # Keys of |v| are >= 0: their top digits, the high halves with the sign cleared,
            # fill the upper half of the histogram (numpy: 1e6 values in ~0.8 ms, where the
            # key, shift, offset and torch.bincount take ~2).
            hi, _ = _u16_halves(x)
            hist[half:] += torch.from_numpy(np.bincount(hi, minlength=half))
            continue
        # Unsigned key >> shift == (signed key >> shift) + 2^(bits - 1).
        d = (piece_keys(src, x) >> shift) + half
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
        ks = piece_keys(src, x)
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
    if abs_bits(src) and bits == 16:
        top, rest = _u16_halves(x)
    else:
        kn = piece_keys(src, x).numpy()
        top, rest = kn >> low, kn & (width - 1)
    for s, p in enumerate(prefixes):
        sel = top == p - (1 << (bits - 1))
        if km is not None:
            sel &= km
        d = np.bincount(rest[sel], minlength=width)
        hist[s * width : (s + 1) * width] += torch.from_numpy(d)


def select(src, masks, ks, names, group):
    """[(T, r)] for each k of `ks`, all from the same two reads of the scores.

    Keys are split 16/16 bits: the first pass histograms the top digit, the second the low
    digit of the keys under each k's top digit (one histogram per distinct top digit)."""
    bits = DIGITS[0]
    hist = all_reduce(_torch_top_histogram(src, masks, bits), group)
    # NaN keys lie beyond those of +-inf; anything in the top bin of +inf or the bottom bin
    # of -inf (or past them) gets an exact chunked look that names the tensor -- an extra
    # pass only for inputs that hold infinities or NaN.
    half = 1 << (bits - 1)
    hi_inf = (POS_INF_KEY >> (32 - bits)) + half
    lo_inf = (NEG_INF_KEY >> (32 - bits)) + half
    if hist[hi_inf:].sum() + hist[: lo_inf + 1].sum() > 0:
        agree_on_nan(lambda: find_nan(src, masks, names), group)
    total = int(hist.sum())
    for k in ks:
        if not 1 <= k <= total:
            raise TooFewCandidates(f"k = {k} is out of range: {total} candidates")
    cum = hist.cumsum(0)
    tops = [int(torch.searchsorted(cum, torch.tensor([k]), side="left")) for k in ks]
    rest = [k - (int(cum[d - 1]) if d > 0 else 0) for k, d in zip(ks, tops)]
    prefixes = sorted(set(tops))
    low = 32 - bits
    lows = all_reduce(_torch_low_histograms(src, masks, prefixes, bits), group)
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
        eq = piece_keys(src, x) == T
        count += int((eq if kept is None else eq & kept).sum())
    return count


def torch_masks(src, masks, T, r, group):
    """Keep entries above T; of those equal to T remove the first r in logical order.

    The new masks take the layout of the old ones (channels_last stays channels_last)."""
    out = [torch.empty_like(m) for m in masks]
    for i, start, end, index, keep in kept_parts(src, masks, T, r, group):
        target = region(out[i], start, end, index)
        target.copy_(keep.view(target.shape))
    return out


def kept_parts(src, masks, T, r, group):
    """(tensor, start, end, index, keep) for every segment of the pieces, in logical order:
    entries above T kept, of those equal to T the first r (this process's share) removed."""
    if group is not None and r:
        r = rank_budget(r, _torch_equal_count(src, masks, T), group)
    budget = r
    for x, kept, segments in src.pieces(masks):
        keep, budget = keep_chunk(piece_keys(src, x), kept, T, budget)
        for i, start, end, index, offset in segments:
            yield i, start, end, index, keep[offset : offset + end - start]


def region(t: torch.Tensor, start: int, end: int, index) -> torch.Tensor:
    """The entries of `t` a segment names, as a view: flat when `t` is contiguous, else
    through the segment's logical index (the whole tensor when it has none)."""
    if index is None and t.is_contiguous():
        return t.view(-1)[start:end]
    return t[index] if index is not None else t
