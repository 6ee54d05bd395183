"""The scan's per-block statistics of a 16-bit hidden state in one Triton kernel launch per state.

Why: at the paper's model sizes a state holds millions of values (Qwen3-4B, 2,048 tokens: 5.2 M), and
:func:`melayer.capture.reduce_packed` sorts all of them for the exact median and passes over them about ten times:
about 650 µs of GPU time per state on an H200, against 83 µs for this kernel (``docs/results/bench_scan.md``).

A bf16 or fp16 |h| is a 15-bit pattern whose integer order is its value's order, so the *exact* median is found by
radix selection, with histograms instead of a sort. Pass 1 reads the state once and writes small partials:

- a histogram of |h|'s exponent field over real tokens (NaN left out, as ``nanmedian`` does);
- per token: sum of squares, largest |h| and its dim (NaN wins, as in ``max``), largest non-NaN |h|, non-finite count;
- per dim: the largest |h| over the "rest" tokens and its position, packed into one int64 and merged atomically;
- the first and delimiter tokens' rows, and a copy of the state.

Pass 2 reads the copy: a histogram of the low bits within the median's exponent, and the massive entries (those
surely above the threshold counted, those whose side depends on the median's low bits histogrammed by pattern).
The launch for state i runs pass 1 of state i and pass 2 of state i - 1. A histogram of all 32,768 patterns in
one pass would need one global atomic per value: measured 10x slower than this, from contention on the busy bins.

:meth:`FusedReduction.stacks` finishes every state of the forward at once, on the device, into
:func:`~melayer.capture.reduce_packed`'s packs: the same values (norms up to the order of summation), so
:meth:`~melayer.capture.ReductionPlan.unpack` serves both. On a CPU tensor the kernel runs in Triton's interpreter
(slow; it is how the tests check it without a GPU).
"""
from __future__ import annotations

import functools
import re
import warnings
from collections import OrderedDict
from typing import Optional

import torch

BINS = 1 << 15  # every non-negative 16-bit float bit pattern
INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # patterns above these are NaN
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
DTYPES = tuple(INF_BITS)
_TAG = 0x7FFFFFFF  # a position t is packed as _TAG - t, so that ties go to the first position, as torch's max


def supports(h: torch.Tensor, states: int = 1) -> bool:
    """Whether the kernel takes ``h``, one of ``states`` per forward: a 16-bit state whose two copies, and every
    state's histograms, stay within the kernel's 32-bit offsets."""
    return h.dtype in DTYPES and 2 * h.numel() < 2**31 and states * h.shape[0] * BINS < 2**31


MIN_TRITON = (3, 4)  # masked tl.histogram and triton.knobs (tested with 3.6)
NEEDS_TRITON = 'needs Triton >= {0}.{1} (it ships with CUDA builds of torch; pip install "triton>={0}.{1}")'.format(
    *MIN_TRITON)  # the one-line error where it is not available()
DIRECT_LAUNCH_TRITON = ((3, 6),)  # the releases whose compiled-kernel launch signature was checked on a GPU


def _triton_version() -> Optional[tuple[int, int]]:
    """Triton's (major, minor), or None where it is not importable."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def available() -> bool:
    """Whether a Triton that builds the kernel is importable (>= 3.4; it ships with CUDA builds of torch)."""
    version = _triton_version()
    return version is not None and version >= MIN_TRITON


def _kernel(device: torch.device):
    """The kernel, or a one-line error where it cannot run on ``device``."""
    import triton

    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError("the fused reduction runs on CUDA, or on the CPU under Triton's interpreter "
                         "(TRITON_INTERPRET=1 before Triton is imported)")
    from ._fused_kernel import reduce_state

    return reduce_state


class FusedReduction:
    """The partials of every state of one forward, for one input shape (B, T, D) and 16-bit dtype.

    Per forward: :meth:`restart`, then ``fused(h, plan)`` for each state in order (one kernel launch, no sync), then
    :meth:`stacks`. ``abs_threshold`` / ``ratio``: the massive criterion, as in :func:`reduce_packed`.

    The median takes two passes over a state (its exponent field, then its low bits within that exponent), and a
    hook sees each state once; so the kernel keeps a copy of the state, and the launch for the next state makes
    the previous state's second pass (the last one's runs in :meth:`stacks`): one launch per state, and two
    copies of one state (2 x B x T x D 16-bit values) besides the statistics."""

    def __init__(self, states: int, h: torch.Tensor, abs_threshold: float = 100.0, ratio: float = 1000.0,
                 block_t: int = 32, block_d: int = 128):
        if not supports(h, states):
            raise ValueError(f"the fused reduction reads 16-bit states ({DTYPES}) within 32-bit offsets, got "
                             f"{states} x {h.dtype} {tuple(h.shape)}")
        batch, self.tokens, self.dim = h.shape
        self.states, self.dtype, self.plan = states, h.dtype, None
        self.abs_threshold, self.ratio = abs_threshold, ratio
        self.mant = MANTISSA_BITS[h.dtype]
        self.block_t, self.block_d = block_t, block_d
        self.grid = (-(-self.tokens // block_t), -(-self.dim // block_d))
        new = functools.partial(torch.empty, device=h.device)
        rows = (states, batch)
        self.scratch = new((2, batch, self.tokens, self.dim), dtype=h.dtype)
        self.exp_hist = new((*rows, 1 << (15 - self.mant)), dtype=torch.int32)
        self.mant_hist = new((*rows, 1 << self.mant), dtype=torch.int32)
        self.band_hist = new((*rows, BINS), dtype=torch.int32)  # entries near the threshold, by bit pattern
        self.above = new(rows, dtype=torch.int32)  # entries surely above it
        self.sumsq = new((*rows, self.grid[1], self.tokens), dtype=torch.float32)  # per token, per tile of dims
        self.tok_max = new((*rows, self.tokens), dtype=torch.int64)  # |h|'s bits << 32 | (_TAG - its dim)
        self.tok_nn = new((*rows, self.tokens), dtype=torch.int32)  # largest non-NaN |h|, as bits
        self.tok_nonfinite = new((*rows, self.tokens), dtype=torch.int32)
        self.rest = new((*rows, self.dim), dtype=torch.int64)  # |h|'s bits << 32 | (_TAG - its position)
        self.carriers = new((*rows, 2, self.dim), dtype=torch.float32)
        self.bin_values = torch.arange(BINS, dtype=torch.int16, device=h.device).view(h.dtype).float()
        self.kernel = _kernel(h.device)
        self.compiled: dict[bool, object] = {}  # PASS1 -> the compiled kernel, launched directly once known
        self.direct = _triton_version() in DIRECT_LAUNCH_TRITON  # elsewhere Triton's own launcher, always
        self.strides = h.stride()
        self.used, self.result, self.dirty = 0, None, False
        self._clear()
        self.masks = [torch.zeros((batch, self.tokens), dtype=torch.bool, device=h.device) for _ in range(2)]
        from . import capture  # its graph helpers (and their test seams)

        self.finish = self._graphed_finish(capture._record) if capture._graphable(h) else None

    def _clear(self) -> None:
        for buffer in (self.exp_hist, self.mant_hist, self.band_hist, self.above, self.tok_nn, self.tok_nonfinite,
                       self.carriers):
            buffer.zero_()
        for buffer in (self.tok_max, self.rest):
            buffer.fill_(torch.iinfo(torch.int64).min)

    def restart(self) -> None:
        """Start a forward: once, before its first state (the partials were cleared when the last one finished)."""
        if self.dirty:  # a forward that never finished
            self._clear()
        self.used, self.result = 0, None

    def __call__(self, h: torch.Tensor, plan) -> int:
        """Reduce ``h`` into the next state's partials, the token layout read from ``plan`` (a
        :class:`~melayer.capture.ReductionPlan`); returns the state's row."""
        if self.used >= self.states or self.result is not None:
            raise RuntimeError(f"more than {self.states} states in one forward; restart() first")
        self.plan, self.dirty = plan, True
        self._launch(h, pass1=True)
        self.used += 1
        return self.used - 1

    def _launch(self, h: Optional[torch.Tensor], pass1: bool) -> None:
        valid, carrier_pos = self.plan.kernel_inputs(self.scratch.device)
        batch = self.scratch.shape[1]
        previous = self.used - 1  # the state whose second pass runs now (-1: none)
        z = batch * (2 if pass1 and previous >= 0 else 1)
        h = self.scratch[0] if h is None else h  # without pass 1 the kernel reads only the copy
        buffers = (self.scratch, self.exp_hist, self.sumsq, self.tok_max, self.tok_nn, self.tok_nonfinite, self.rest,
                   self.carriers, self.mant_hist, self.band_hist, self.above)
        constants = (self.dim, self.mant, INF_BITS[self.dtype], int(pass1), self.block_t, self.block_d)
        compiled = self.compiled.get(pass1)
        if compiled is not None and h.data_ptr() % 16 == 0 and h.stride() == self.strides:
            # the kernel Triton's launcher picked for these shapes, strides and alignments, launched with addresses:
            # Triton then skips its per-call argument binding and its driver query per tensor argument, which on a
            # busy host cost more than the kernel itself
            stream = torch.cuda.current_stream(h.device).cuda_stream
            compiled.run(*self.grid, z, stream, compiled.function, compiled.packed_metadata, None, None, None,
                         h.data_ptr(), *h.stride(), self.tokens, batch, self.used, previous, valid.data_ptr(),
                         carrier_pos.data_ptr(), *self.addresses, float(self.abs_threshold), float(self.ratio),
                         *constants)
            return
        launched = self.kernel[(*self.grid, z)](h, *h.stride(), self.tokens, batch, self.used, previous, valid,
                                                carrier_pos, *buffers, float(self.abs_threshold), float(self.ratio),
                                                *constants, num_warps=4)
        self.addresses = tuple(b.data_ptr() for b in buffers)
        if self.direct and h.is_cuda and h.data_ptr() % 16 == 0 and h.stride() == self.strides:
            self.compiled[pass1] = launched

    def _graphed_finish(self, record):
        """:meth:`_finish_and_clear` captured as a CUDA graph by ``record`` (one launch for its ~40 operations,
        which cost more host time than the kernels on a busy host); None where capture fails (it then runs
        eagerly)."""

        def finish():
            self.graph_result = self._finish_and_clear(*self.masks)

        try:
            return record(finish, self.scratch.device)
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture of the fused reduction's finish failed ({err}); finishing eagerly",
                          stacklevel=2)
            return None

    def stacks(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rows`` states' packs, (rows, B, 3D + 4) floats and (rows, B, D + 4) ints, as
        :func:`~melayer.capture.reduce_packed` makes them, finished for all states at once on the device."""
        if self.result is None:
            if self.used:
                self._launch(None, pass1=False)  # the last state's second pass
            masks = self.plan.on(self.scratch.device)
            if self.finish is None:
                self.result = self._finish_and_clear(masks["first_sel"], masks["others"])
            else:
                for static, mask in zip(self.masks, (masks["first_sel"], masks["others"])):
                    static.copy_(mask)
                self.finish.replay()
                self.result = self.graph_result
            self.dirty = False
        return tuple(r[:rows] for r in self.result)

    def _finish_and_clear(self, first_sel: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every state's packs from the partials (``first_sel`` / ``others``: the plan's (B, T) token masks); then
        the partials are cleared for the next forward."""
        exp_hist, mant_hist = self.exp_hist.long(), self.mant_hist.long()
        count = exp_hist.sum(-1)
        rank = torch.div(count - 1, 2, rounding_mode="trunc")  # the lower median, as nanmedian
        cum = exp_hist.cumsum(-1)
        exponent = (cum <= rank[..., None]).sum(-1)
        below = torch.where(exponent > 0, cum.gather(-1, (exponent - 1).clamp(min=0)[..., None])[..., 0], 0)
        low = (mant_hist.cumsum(-1) <= (rank - below)[..., None]).sum(-1)
        pattern = (exponent << self.mant | low).clamp(max=BINS - 1)
        median = torch.where(count > 0, self.bin_values[pattern], float("nan"))
        threshold = torch.clamp(median * self.ratio, min=self.abs_threshold)
        near = (self.band_hist * (self.bin_values > threshold[..., None])).sum(-1, dtype=torch.int64)
        massive_count = self.above.long() + near
        massive_tokens = (self.tok_nn.view(torch.float32) > threshold[..., None]).sum(-1)
        norms = self.sumsq.sum(2).sqrt()
        first_norm = (norms * first_sel).sum(-1)
        rest_norm_sum = (norms * others).sum(-1)
        positions = torch.arange(self.tokens, device=norms.device)
        largest = ((self.tok_max >> 32) << 32 | (_TAG - positions)).max(-1).values  # ties: the first position
        at = _TAG - (largest & 0xFFFFFFFF)
        arg = at * self.dim + _TAG - (self.tok_max.gather(-1, at[..., None])[..., 0] & 0xFFFFFFFF)
        max_abs = _float_of(largest >> 32)
        rest_max, rest_arg = _float_of(self.rest >> 32), _TAG - (self.rest & 0xFFFFFFFF)
        finite = self.tokens * self.dim - self.tok_nonfinite.sum(-1, dtype=torch.int64)
        floats = torch.cat([self.carriers.flatten(2), rest_max,
                            torch.stack([max_abs, median, first_norm, rest_norm_sum], -1)], -1)
        ints = torch.cat([rest_arg, torch.stack([arg, massive_count, massive_tokens, finite], -1)], -1)
        self._clear()
        return floats, ints


def _float_of(high_bits: torch.Tensor) -> torch.Tensor:
    """The fp32 values whose bit patterns are ``high_bits`` (int64 holding int32 patterns)."""
    return high_bits.to(torch.int32).view(torch.float32)


_SHARED: "OrderedDict[tuple, FusedReduction]" = OrderedDict()
KEPT = 2  # each holds ~states x batch x 128 KB of histograms


def shared(h: torch.Tensor, states: int, abs_threshold: float, ratio: float) -> FusedReduction:
    """The :class:`FusedReduction` for ``h``'s shape, dtype and device, and these settings, shared by every capture
    (a scan's batches reuse it); the ``KEPT`` most recent are kept."""
    key = (tuple(h.shape), h.dtype, h.device, states, abs_threshold, ratio)
    if key not in _SHARED:
        _SHARED[key] = FusedReduction(states, h, abs_threshold, ratio)
        while len(_SHARED) > KEPT:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return _SHARED[key]
