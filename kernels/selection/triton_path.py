"""The Triton path of the selection (CUDA; the CPU through Triton's interpreter): keys split
11/11/10 bits, 2,048-bin histograms in registers merged with one atomic add per program, a
count pass for the entries equal to T, and the mask pass. One launch per tensor and pass;
extra memory O(bins).

Launch contract (asserted by `TensorScores.walk` and `rdfast.kernels._layout`): every operand
is read either in memory order -- all contiguous, or all dense with the same strides when the
pass does not depend on order -- or through its strides in logical order (LOGICAL), padded to
4-D. The geometry of a LOGICAL launch is an int64 array:

    GEOMETRY = [d1, d2, d3,                 sizes of dims 1..3 (dim 0 follows from n)
                scores or weight strides x4, gradient strides x4,
                mask strides x4,             output mask strides x4]
"""

from __future__ import annotations

import torch

from rdfast.kernels._backend import HAS_TRITON, code, constant, grid_size, tl, triton
from rdfast.kernels._layout import kernel_view
from rdfast.kernels.saliency import SCORES_GIVEN
from rdfast.kernels.selection.collectives import agree_on_nan, all_reduce, rank_budget
from rdfast.kernels.selection.source import NaNScoreError, TooFewCandidates

DIGITS = (11, 11, 10)
BLOCK = 1024

# Offsets into the geometry.
GEOM_SIZES, GEOM_SCORES, GEOM_GRAD = constant(0), constant(3), constant(7)
GEOM_MASK, GEOM_OUT = constant(11), constant(15)
# What `_mask_kernel` does with the entries equal to T: keep them all, remove them all, or
# remove the first r in logical order (the tie boundary falls inside the tensor).
TIES_KEEP, TIES_REMOVE, TIES_BY_RANK = constant(0), constant(1), constant(2)


if HAS_TRITON:
    from rdfast.kernels._float_key import float_key
    from rdfast.kernels._layout import at, to_f32, unravel
    from rdfast.kernels.saliency import MP, score_of

    @triton.jit
    def _strides_at(geom_ptr, BASE: tl.constexpr):
        """The four strides of one operand in the geometry (GEOMETRY above)."""
        p = geom_ptr + BASE
        return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)

    @triton.jit
    def _offsets(lin, geom_ptr, LOGICAL: tl.constexpr):
        """Memory offsets of logical indices `lin` in the four operands (scores or weight,
        gradient, mask, output); in memory-order launches all four are `lin` itself."""
        if LOGICAL:
            i0, i1, i2, i3 = unravel(
                lin,
                tl.load(geom_ptr + GEOM_SIZES),
                tl.load(geom_ptr + GEOM_SIZES + 1),
                tl.load(geom_ptr + GEOM_SIZES + 2),
            )
            s0, s1, s2, s3 = _strides_at(geom_ptr, GEOM_SCORES)
            so = at(i0, i1, i2, i3, s0, s1, s2, s3)
            s0, s1, s2, s3 = _strides_at(geom_ptr, GEOM_GRAD)
            go = at(i0, i1, i2, i3, s0, s1, s2, s3)
            s0, s1, s2, s3 = _strides_at(geom_ptr, GEOM_MASK)
            mo = at(i0, i1, i2, i3, s0, s1, s2, s3)
            s0, s1, s2, s3 = _strides_at(geom_ptr, GEOM_OUT)
            oo = at(i0, i1, i2, i3, s0, s1, s2, s3)
        else:
            so = lin
            go = lin
            mo = lin
            oo = lin
        return so, go, mo, oo

    @triton.jit
    def _load_score(s_ptr, g_ptr, so, go, valid, eps, SOURCE: tl.constexpr, FORM: tl.constexpr):
        """fp32 scores at offsets `so` (and gradients at `go`): given (SCORES_GIVEN) or
        computed from the weights by `score_of` (SOURCE = MP, GP or UP)."""
        if SOURCE == SCORES_GIVEN:
            x = to_f32(tl.load(s_ptr + so, mask=valid, other=0))
        else:
            w = tl.load(s_ptr + so, mask=valid, other=0)
            if SOURCE == MP:
                g = w
            else:
                g = tl.load(g_ptr + go, mask=valid, other=0)
            x = score_of(w, g, eps, SOURCE, FORM)
        return x

    @triton.jit
    def _keys(
        s_ptr,
        g_ptr,
        m_ptr,
        geom_ptr,
        lin,
        valid,
        eps,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        LOGICAL: tl.constexpr,
    ):
        """Scores, kept flags (False past the end), keys and output offsets of indices `lin`."""
        so, go, mo, oo = _offsets(lin, geom_ptr, LOGICAL)
        x = _load_score(s_ptr, g_ptr, so, go, valid, eps, SOURCE, FORM)
        kept = valid
        if HAS_MASK:
            kept = valid & (tl.load(m_ptr + mo, mask=valid, other=0) != 0)
        return x, kept, float_key(x), oo

    @triton.jit
    def _histogram_kernel(
        s_ptr,
        g_ptr,
        m_ptr,
        geom_ptr,
        hist_ptr,
        nan_ptr,
        n,
        eps,
        lo,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        LOGICAL: tl.constexpr,
        CONSUMED: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Histogram of one digit of the keys of the candidates of one tensor, added into
        `hist_ptr` (persistent programs, one atomic add of the whole histogram each).

        Args:
            s_ptr: scores, or the weights when SOURCE computes scores (bf16 as int16 bits).
            g_ptr: gradients (GP, UP); any pointer otherwise.
            m_ptr: the kept mask (uint8) when HAS_MASK; candidates are the kept entries.
            geom_ptr: int64 geometry (GEOMETRY) when LOGICAL; any pointer otherwise.
            hist_ptr: int64[2^BITS] histogram, accumulated across launches (tensors).
            nan_ptr: int64 count of NaN candidates (first digit only).
            n (int): entries of the tensor.
            eps (float): UP's eps.
            lo (int): the signed key where the range narrowed so far starts.
            SOURCE, FORM (constexpr): where scores come from (SCORES_GIVEN, MP, GP, UP).
            HAS_MASK (constexpr): whether m_ptr is read.
            LOGICAL (constexpr): index operands through their strides in logical order.
            CONSUMED (constexpr): key bits fixed by the earlier digits (0, 11, 22).
            BITS (constexpr): bits of this digit (11, 11, 10).
            BLOCK (constexpr): entries a program reads per iteration.
        """
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
                # 1. The top digit: unsigned key >> shift, the signed key offset by half.
                digit = (ks >> (32 - BITS)) + (1 << (BITS - 1))
                nan += ((x != x) & sel).to(tl.int64)
            else:
                # 2. Later digits: only keys in [lo, lo + 2^(32 - CONSUMED)) are candidates.
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
        geom_ptr,
        cnt_ptr,
        n,
        eps,
        T,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        LOGICAL: tl.constexpr,
        PER_BLOCK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Kept entries whose key equals T, one BLOCK a program.

        Args:
            s_ptr, g_ptr, m_ptr, geom_ptr, n, eps, SOURCE, FORM, LOGICAL: as in
                `_histogram_kernel` (the mask is always read).
            cnt_ptr: int64 output: one cell (atomic sum), or one per program (PER_BLOCK).
            T (int): the signed key of the threshold.
            PER_BLOCK (constexpr): a count per program, for the tie ranks of `_mask_kernel`.
            BLOCK (constexpr): entries a program.
        """
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
        s_ptr,
        g_ptr,
        m_ptr,
        geom_ptr,
        out_ptr,
        off_ptr,
        n,
        eps,
        T,
        r,
        SOURCE: tl.constexpr,
        FORM: tl.constexpr,
        LOGICAL: tl.constexpr,
        TIES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The new mask of one tensor: kept entries above T stay, entries equal to T as TIES
        says, one BLOCK a program.

        Args:
            s_ptr, g_ptr, m_ptr, geom_ptr, n, eps, SOURCE, FORM, LOGICAL: as in
                `_histogram_kernel` (the mask is always read).
            out_ptr: uint8 new mask, written at the output strides of the geometry.
            off_ptr: int64 per program, the entries equal to T before its block (TIES_BY_RANK).
            T (int): the signed key of the threshold.
            r (int): entries equal to T this tensor removes (TIES_BY_RANK).
            TIES (constexpr): TIES_KEEP, TIES_REMOVE, or TIES_BY_RANK (remove rank < r, ranks
                in logical order: launched LOGICAL unless every operand is contiguous).
        """
        pid = tl.program_id(0).to(tl.int64)
        lin = pid * BLOCK + tl.arange(0, BLOCK)
        valid = lin < n
        _, kept, ks, oo = _keys(
            s_ptr, g_ptr, m_ptr, geom_ptr, lin, valid, eps, SOURCE, FORM, True, LOGICAL
        )
        keep = kept & (ks > T)
        eq = kept & (ks == T)
        if TIES == TIES_KEEP:
            keep = keep | eq
        if TIES == TIES_BY_RANK:
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


def histogram(src, masks, consumed, bits, lo, nan_out, names):
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


def count_equal(src, masks, i, T, out, per_block, names):
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


def triton_masks(src, masks, T, r, names, group):
    device = src.tensors[0].device if len(src) else torch.device("cpu")
    counts = torch.zeros(len(src), dtype=torch.int64, device=device)
    if r:
        for i in range(len(src)):
            if src.numel(i):
                count_equal(src, masks, i, T, counts[i:], False, names)
    counts = counts.tolist()
    if group is not None and r:
        r = rank_budget(r, sum(counts), group)
    out, budget = [], r
    for i in range(len(src)):
        n = src.numel(i)
        new = torch.empty_like(masks[i])  # the old mask's layout, channels_last included
        take = min(budget, counts[i])
        if take == 0:
            ties = TIES_KEEP
        elif take == counts[i]:
            ties = TIES_REMOVE
        else:  # the tie boundary falls inside this tensor
            ties = TIES_BY_RANK
        offsets = _dummy(device, torch.int64)
        if ties is TIES_BY_RANK:
            per_block = torch.empty(triton.cdiv(n, BLOCK), dtype=torch.int64, device=device)
            count_equal(src, masks, i, T, per_block, True, names)
            offsets = per_block.cumsum(0) - per_block
        if n:
            s, g, source, form = src.triton_args(i)
            ordered = ties is TIES_BY_RANK
            logical, geom = src.walk(i, masks, out=new, ordered=ordered, name=names[i])
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
                TIES=code(ties),
                BLOCK=BLOCK,
                **_options(logical),
            )
        budget -= take
        out.append(new)
    return out


def select(src, masks, k, names, group):
    """(T, r) through 11/11/10-bit digits, one histogram launch per tensor and digit."""
    consumed, lo_unsigned = 0, 0
    device = src.tensors[0].device
    for bits in DIGITS:
        lo = lo_unsigned - (1 << 31)  # the signed key where the current range starts
        if consumed == 0:
            nan = torch.zeros(len(src), dtype=torch.int64, device=device)
            hist = all_reduce(histogram(src, masks, 0, bits, lo, nan, names), group)

            def check(nan=nan):
                if bool(nan.any()):
                    raise NaNScoreError(f"{names[int(nan.nonzero()[0])]}: scores contain NaN")

            agree_on_nan(check, group)
            total = int(hist.sum())
            if not 1 <= k <= total:
                raise TooFewCandidates(f"k = {k} is out of range: {total} candidates")
        else:
            hist = all_reduce(histogram(src, masks, consumed, bits, lo, None, names), group)
        cum = hist.cumsum(0)
        d = int(torch.searchsorted(cum, torch.tensor([k]), side="left"))
        k -= int(cum[d - 1]) if d > 0 else 0
        consumed += bits
        lo_unsigned += d << (32 - consumed)
    return lo_unsigned - (1 << 31), k
