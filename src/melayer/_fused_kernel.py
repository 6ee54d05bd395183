"""The Triton kernel of :mod:`melayer.fused_reduction` (imported only where it runs: it needs Triton).

On CPU tensors it runs in Triton's interpreter, which Triton turns on only when ``TRITON_INTERPRET=1`` is set before
it is first imported (the test suite does so on machines without a GPU)."""
import triton
import triton.language as tl

_NEG_ONE_BITS = tl.constexpr(-1082130432)  # -1.0's fp32 bits: a token left out of the per-dim maxima


@triton.jit
def _tile(h_ptr, stride_b, stride_t, stride_d, T, b, valid_ptr, carrier_pos_ptr, D: tl.constexpr,
          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_T, BLOCK_D) tile of sequence ``b`` at this program's (token, dim) block, and its token layout."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_t = t < T
    in_d = d < D
    valid = tl.load(valid_ptr + b * T + t, mask=in_t, other=0) != 0
    first = tl.load(carrier_pos_ptr + b * 2)
    delim = tl.load(carrier_pos_ptr + b * 2 + 1)  # -1: none
    inside = in_t[:, None] & in_d[None, :]
    real = inside & valid[:, None]
    x = tl.load(h_ptr + b * stride_b + t[:, None] * stride_t + d[None, :] * stride_d, mask=inside, other=0.0)
    return x, t, d, in_t, in_d, valid, first, delim, inside, real


@triton.jit
def _tile_statistics(x, t, d, in_t, in_d, valid, first, delim, inside, real, T, row, sumsq_ptr, tok_max_ptr,
                     tok_nn_ptr, tok_nonfinite_ptr, rest_ptr, carriers_ptr, D: tl.constexpr):
    """A tile's share of every statistic but the median, into state ``row``'s partials."""
    xf = x.to(tl.float32)
    a = tl.abs(xf)
    nan = a != a
    key = tl.where(nan, 0x7FC00000, a.to(tl.int32, bitcast=True))  # orders as |h| does, NaN on top (as max)
    # per token, over this tile's dims: merged across tiles by atomics (order-free) or summed later (squares)
    tl.store(sumsq_ptr + (row * tl.num_programs(1) + tl.program_id(1)) * T + t, tl.sum(xf * xf, axis=1), mask=in_t)
    tok_key = tl.where(in_d[None, :], tl.where(real, key, 0), -1)  # pads count as 0, as reduce_packed's
    packed = (tok_key.to(tl.int64) << 32) | (0x7FFFFFFF - d)[None, :].to(tl.int64)  # ties: the first dim
    tl.atomic_max(tok_max_ptr + row * T + t, tl.max(packed, axis=1), mask=in_t, sem="relaxed")
    largest_nn = tl.max(tl.where(real & ~nan, a, 0.0), axis=1)
    tl.atomic_max(tok_nn_ptr + row * T + t, largest_nn.to(tl.int32, bitcast=True), mask=in_t, sem="relaxed")
    nonfinite = tl.sum((real & (key >= 0x7F800000)).to(tl.int32), axis=1)
    tl.atomic_add(tok_nonfinite_ptr + row * T + t, nonfinite, mask=in_t & (nonfinite > 0), sem="relaxed")
    # per dim, over this tile's "rest" tokens (neither first nor delimiter): ties go to the first position
    rest_t = valid & (t != first) & (t != delim)
    rest_key = tl.where(inside & rest_t[:, None], key, _NEG_ONE_BITS)
    rest = (rest_key.to(tl.int64) << 32) | (0x7FFFFFFF - t)[:, None].to(tl.int64)
    rest = tl.where(inside, rest, -9223372036854775807 - 1)
    tl.atomic_max(rest_ptr + row * D + d, tl.max(rest, axis=0), mask=in_d, sem="relaxed")
    target = carriers_ptr + row * 2 * D + d[None, :] + 0 * t[:, None]
    tl.store(target, xf, mask=inside & (t == first)[:, None])
    tl.store(target + D, xf, mask=inside & (t == delim)[:, None])


@triton.jit
def _partials(h_ptr, stride_b, stride_t, stride_d, T, b, row, valid_ptr, carrier_pos_ptr, scratch_ptr,
              exp_hist_ptr, sumsq_ptr, tok_max_ptr, tok_nn_ptr, tok_nonfinite_ptr, rest_ptr, carriers_ptr,
              D: tl.constexpr, MANT: tl.constexpr, INF16: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Pass 1 on one (BLOCK_T, BLOCK_D) tile: everything but the median's low bits; keeps a copy for pass 2."""
    x, t, d, in_t, in_d, valid, first, delim, inside, real = _tile(h_ptr, stride_b, stride_t, stride_d, T, b,
                                                                   valid_ptr, carrier_pos_ptr, D, BLOCK_T, BLOCK_D)
    tl.store(scratch_ptr + (b * T + t[:, None]) * D + d[None, :], x, mask=inside)
    _tile_statistics(x, t, d, in_t, in_d, valid, first, delim, inside, real, T, row, sumsq_ptr, tok_max_ptr,
                     tok_nn_ptr, tok_nonfinite_ptr, rest_ptr, carriers_ptr, D)
    # the median's high bits: a histogram of |h|'s exponent field (NaN left out, as nanmedian)
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    counted = tl.reshape(real & (bits <= INF16), (BLOCK_T * BLOCK_D,))
    exp_bins: tl.constexpr = 1 << (15 - MANT)
    hist = tl.histogram(tl.reshape(bits >> MANT, (BLOCK_T * BLOCK_D,)), exp_bins, mask=counted)
    tl.atomic_add(exp_hist_ptr + row * exp_bins + tl.arange(0, exp_bins), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _median_pass(T, b, row, valid_ptr, scratch_ptr, exp_hist_ptr, mant_hist_ptr, band_hist_ptr, above_ptr,
                 abs_threshold, ratio, D: tl.constexpr, MANT: tl.constexpr, INF16: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2 on one tile of the previous state's copy: the low bits of the median's bit pattern (its exponent
    is known from pass 1), and the massive entries: those surely above the threshold are counted, those whose
    side depends on the median's low bits go to a histogram of bit patterns, compared once the median is known."""
    exp_bins: tl.constexpr = 1 << (15 - MANT)
    counts = tl.load(exp_hist_ptr + row * exp_bins + tl.arange(0, exp_bins))
    rank = (tl.sum(counts) - 1) // 2  # the lower median, 0-based, as nanmedian
    exponent = tl.sum((tl.cumsum(counts, 0) <= rank).to(tl.int32))
    low = (exponent << MANT).to(tl.int16).to(scratch_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    high = ((exponent + 1) << MANT).to(tl.int16).to(scratch_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    surely_not = tl.maximum(low * ratio, abs_threshold)  # the median is in [low, high): so is its threshold
    maybe = tl.maximum(high * ratio, abs_threshold)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_t = t < T
    valid = tl.load(valid_ptr + b * T + t, mask=in_t, other=0) != 0
    real = in_t[:, None] & (d < D)[None, :] & valid[:, None]
    x = tl.load(scratch_ptr + (b * T + t[:, None]) * D + d[None, :], mask=real, other=0.0)
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    counted = real & (bits <= INF16)
    mant_bins: tl.constexpr = 1 << MANT
    in_bucket = tl.reshape(counted & ((bits >> MANT) == exponent), (BLOCK_T * BLOCK_D,))
    hist = tl.histogram(tl.reshape(bits & (mant_bins - 1), (BLOCK_T * BLOCK_D,)), mant_bins, mask=in_bucket)
    tl.atomic_add(mant_hist_ptr + row * mant_bins + tl.arange(0, mant_bins), hist, mask=hist > 0, sem="relaxed")
    a = tl.abs(x.to(tl.float32))
    above = tl.sum(tl.sum((counted & (a > maybe)).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(above_ptr + row, above, mask=above > 0, sem="relaxed")
    tl.atomic_add(band_hist_ptr + row * 32768 + bits, 1, mask=counted & (a > surely_not) & (a <= maybe), sem="relaxed")


@triton.jit(do_not_specialize=["state", "previous"])
def reduce_state(h_ptr, stride_b, stride_t, stride_d, T, B, state, previous, valid_ptr, carrier_pos_ptr, scratch_ptr,
                 exp_hist_ptr, sumsq_ptr, tok_max_ptr, tok_nn_ptr, tok_nonfinite_ptr, rest_ptr, carriers_ptr,
                 mant_hist_ptr, band_hist_ptr, above_ptr, abs_threshold, ratio,
                 D: tl.constexpr, MANT: tl.constexpr, INF16: tl.constexpr, PASS1: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One launch per state: pass 1 of state ``state`` (axis-2 programs [0, B)) and pass 2 of state ``previous``
    (the next B programs, or all of them without ``PASS1``), whose copy the previous launch left in the other
    scratch slot. Slot of a state: its index modulo 2."""
    z = tl.program_id(2)
    if z < B * PASS1:
        _partials(h_ptr, stride_b, stride_t, stride_d, T, z, state * B + z, valid_ptr, carrier_pos_ptr,
                  scratch_ptr + (state % 2) * B * T * D, exp_hist_ptr, sumsq_ptr, tok_max_ptr, tok_nn_ptr,
                  tok_nonfinite_ptr, rest_ptr, carriers_ptr, D, MANT, INF16, BLOCK_T, BLOCK_D)
    else:
        b = z - B * PASS1
        _median_pass(T, b, previous * B + b, valid_ptr, scratch_ptr + (previous % 2) * B * T * D, exp_hist_ptr,
                     mant_hist_ptr, band_hist_ptr, above_ptr, abs_threshold, ratio, D, MANT, INF16, BLOCK_T, BLOCK_D)
