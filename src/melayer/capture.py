"""Reduce the residual stream to per-block statistics *while* the forward pass runs.

A forward hook on every decoder block turns the block's output (B, T, D) into a few fp32 numbers per
sequence and discards it, so memory is O(layers × dims) per prompt instead of every hidden state. The
first token, the first delimiter and every dim's largest value over the other tokens are kept per dim
(signed for the first two), so any massive value on any token is seen, and massive entries are counted
exactly. Pad tokens are excluded using the attention mask (left padding aware, via :class:`TokenContext`).

:func:`reduce_hidden` defines the statistics. :meth:`ResidualCapture.run` computes the same values more cheaply
(:class:`ReductionPlan`): the token masks are built once per forward on the host, the per-block work is ~30
kernels packed into two tensors, and all blocks reach the host in two copies. On a GPU each block's reduction
is one CUDA graph replay into its own row of two stacks (the default, measured faster), because a small model's
forward is launch bound there and the hooks' launches are the cost; on a 4B model the arithmetic is (the exact
median sorts every value of the state: ``docs/results/bench_scan.md``). ``reduction="fused"``
(:mod:`melayer.fused_reduction`) does a 16-bit state's work in one Triton kernel launch, 8x less GPU time there.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn

from . import fused_reduction
from .adapters import adapter_for
from .hooks import HookGroup, TokenContext, block_output
from .modelutils import device_of, hidden_arg


@dataclass
class LayerStats:
    """Statistics of one hidden state (a block's output, or the embeddings) for a batch; leading dim is the batch.

    Positions are relative to each sequence's first real token.
    """

    max_abs: torch.Tensor  # (B,) largest |h| over real tokens and dims
    max_pos: torch.Tensor  # (B,) its token position
    max_dim: torch.Tensor  # (B,) its hidden dimension
    median_abs: torch.Tensor  # (B,) median |h| over real tokens and dims
    first: torch.Tensor  # (B, D) h of the first real token (signed)
    delim: torch.Tensor  # (B, D) h of the first delimiter token (signed; zeros where there is none)
    rest_max_abs: torch.Tensor  # (B, D) per-dim max |h| over the other real tokens (neither first nor delimiter)
    rest_argmax: torch.Tensor  # (B, D) the position holding it
    first_norm: torch.Tensor  # (B,) L2 norm of the first token
    rest_norm: torch.Tensor  # (B,) mean L2 norm of the other real tokens
    massive_count: torch.Tensor  # (B,) entries meeting the massive criterion, counted exactly
    massive_tokens: torch.Tensor  # (B,) tokens holding at least one such entry
    nonfinite: torch.Tensor  # (B,) NaN / ±inf entries over real tokens

    def row(self, b: int) -> "LayerStats":
        """The statistics of sequence ``b`` alone (leading dim 1)."""
        return LayerStats(**{f.name: getattr(self, f.name)[b:b + 1] for f in fields(self)})

    def to(self, device) -> "LayerStats":
        return LayerStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def reduce_hidden(h: torch.Tensor, valid: torch.Tensor, first_sel: torch.Tensor, delim_sel: torch.Tensor,
                  first: torch.Tensor, abs_threshold: float = 100.0, ratio: float = 1000.0) -> LayerStats:
    """The reduction itself (a pure function, so tests can apply it to ``output_hidden_states``).

    ``valid``, ``first_sel``, ``delim_sel``: (B, T) bool; ``first``: (B,) index of each first real token; an
    entry is massive when |h| > ``abs_threshold`` and > ``ratio`` × the median |h| of its sequence.
    """
    h = h.float()
    a = h.abs()
    batch, length, dim = a.shape
    real = valid[..., None]
    a_valid = a.masked_fill(~real, 0.0)
    flat = a_valid.reshape(batch, -1)
    max_abs, arg = flat.max(dim=1)
    median = torch.nanmedian(a.masked_fill(~real, float("nan")).reshape(batch, -1), dim=1).values
    first_vals = (h.masked_fill(~first_sel[..., None], 0.0)).sum(1)
    delim_vals = (h.masked_fill(~delim_sel[..., None], 0.0)).sum(1)
    rest = valid & ~first_sel & ~delim_sel
    rest_max, rest_arg = a.masked_fill(~rest[..., None], -1.0).max(1)
    norms = h.norm(dim=-1)
    first_norm = (norms * first_sel).sum(1)
    others = valid & ~first_sel
    rest_norm = (norms * others).sum(1) / others.sum(1).clamp(min=1)
    threshold = torch.clamp(median * ratio, min=abs_threshold)
    massive = a_valid > threshold[:, None, None]
    return LayerStats(
        max_abs=max_abs, max_pos=arg // dim - first, max_dim=arg % dim, median_abs=median,
        first=first_vals, delim=delim_vals, rest_max_abs=rest_max.clamp(min=0.0), rest_argmax=rest_arg - first[:, None],
        first_norm=first_norm, rest_norm=rest_norm, massive_count=massive.sum((1, 2)),
        massive_tokens=massive.any(-1).sum(1), nonfinite=(~torch.isfinite(h) & real).sum((1, 2)),
    )


REDUCTIONS = ("auto", "reference", "eager", "cuda_graph", "fused")


def resolve_reduction(reduction: str, device: torch.device) -> str:
    """What ``reduction="auto"`` runs on ``device``: on CUDA the graph replay, the fastest measured end to end on an
    H200 (``docs/results/bench_scan.md``; "fused" is opt-in until measured so); eager elsewhere."""
    if reduction != "auto":
        return reduction
    return "cuda_graph" if torch.device(device).type == "cuda" else "eager"


MEDIANS = ("auto", "select", "sort")


def nanmedian_rows(flat: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """``torch.nanmedian(flat, dim=1).values`` for rows of non-negative values (|h|, pads as NaN), by ``method``:
    "select" (:func:`nanmedian_by_bracket`, row by row) or "sort" (:func:`nanmedian_by_sort`), the same
    element. "auto": select on a CPU (~3x faster than ``nanmedian``); sort on CUDA, where ``nanmedian`` selects
    with one thread block per row (milliseconds for a million values) and a sort uses the whole GPU."""
    if method == "auto":
        method = "sort" if flat.is_cuda else "select"
    if method == "select":
        return torch.stack([nanmedian_by_bracket(row) for row in flat])
    return nanmedian_by_sort(flat)


def nanmedian_by_bracket(row: torch.Tensor, sample: int = 4096, margin: float = 0.02) -> torch.Tensor:
    """``torch.nanmedian`` of a 1-D tensor, exactly: a strided sample's quantiles bracket the median, the values
    below the bracket are counted and the few inside it are selected from. Where the bracket misses (the count
    proves it), the full ``nanmedian`` answers."""
    real = row[row == row] if bool(torch.isnan(row).any()) else row  # pads arrive as NaN
    m = real.numel()
    if m <= 4 * sample:
        return torch.nanmedian(row)
    rank = (m - 1) // 2  # the lower median, 0-based, as nanmedian
    probe = real[:: m // sample].float()
    q = torch.tensor([max(0.0, rank / m - margin), min(1.0, rank / m + margin)], dtype=probe.dtype)
    lo, hi = torch.quantile(probe, q).to(real.dtype)
    below = int((real < lo).sum())
    inside = real[(real >= lo) & (real <= hi)]
    if not below <= rank < below + inside.numel():
        return torch.nanmedian(row)
    return inside.kthvalue(rank - below + 1).values


def nanmedian_by_sort(flat: torch.Tensor) -> torch.Tensor:
    """The sort-based ``nanmedian`` over dim 1 (NaN where a row has no other value); no host sync."""
    non_nan = (flat == flat).sum(1)
    rank = torch.div(non_nan - 1, 2, rounding_mode="trunc")  # 0 for an all-NaN row, as nanmedian
    return flat.sort(dim=1).values.gather(1, rank[:, None])[:, 0]


class ReductionPlan:
    """One forward's token layout, built once on the host from the attention mask: the masks that
    :func:`reduce_hidden` rebuilds for every block, the first and delimiter positions as gather indices, and
    what :meth:`unpack` finishes on the host after the one transfer.

    ``delim_index`` (B,): each sequence's first delimiter position (-1 or out of range: none). The masks are
    copied to each device that asks (:meth:`on`; a device map spreads the blocks).
    """

    def __init__(self, attention_mask: torch.Tensor, delim_index: Optional[torch.Tensor] = None):
        valid = attention_mask.cpu() != 0
        batch, self.tokens = valid.shape
        positions = torch.arange(self.tokens)
        self.first = valid.int().argmax(1)  # as TokenContext: the first real token
        delim = torch.full((batch,), -1) if delim_index is None else delim_index.cpu().long()
        has_delim = (delim >= 0) & (delim < self.tokens)
        first_sel = positions == self.first[:, None]
        others = valid & ~first_sel
        self.others_count = others.sum(1).clamp(min=1)
        carrier_absent = torch.stack([torch.zeros_like(has_delim), ~has_delim], 1)[..., None]
        self._masks = {
            "pad": None if valid.all() else ~valid[..., None],
            "first_sel": first_sel,
            "others": others,
            "rest_excluded": ~(others & (positions != delim[:, None]))[..., None],
            "carrier_pos": torch.stack([self.first, torch.where(has_delim, delim, 0)], 1),
            "carrier_absent": carrier_absent if carrier_absent.any() else None,
        }
        positions_or_none = torch.stack([self.first, torch.where(has_delim, delim, -1)], 1).int()
        self._kernel_inputs = (valid.to(torch.int8), positions_or_none)
        self._on: dict[torch.device, dict] = {}
        self._kernel_inputs_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, Optional[torch.Tensor]]:
        if device not in self._on:
            self._on[device] = {k: None if m is None else m.to(device) for k, m in self._masks.items()}
        return self._on[device]

    def kernel_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What :class:`~melayer.fused_reduction.FusedReduction` reads: the (B, T) int8 mask of real tokens and
        (B, 2) int32 first and delimiter positions (-1: none), on ``device``."""
        if device not in self._kernel_inputs_on:
            self._kernel_inputs_on[device] = tuple(t.to(device) for t in self._kernel_inputs)
        return self._kernel_inputs_on[device]

    def unpack(self, floats: torch.Tensor, ints: torch.Tensor) -> list[LayerStats]:
        """(N, B, ·) stacks of :func:`reduce_packed` outputs, on the host, into N :class:`LayerStats`: the last
        steps of :func:`reduce_hidden`, done once for all blocks instead of per block on the device."""
        dim = ints.shape[-1] - 4
        max_abs, median, first_norm, rest_norm_sum = floats[..., 3 * dim:].unbind(-1)
        arg, massive_count, massive_tokens, finite = ints[..., dim:].unbind(-1)
        values = dict(
            max_abs=max_abs, max_pos=arg // dim - self.first, max_dim=arg % dim, median_abs=median,
            first=floats[..., :dim], delim=floats[..., dim:2 * dim],
            rest_max_abs=floats[..., 2 * dim:3 * dim].clamp(min=0.0), rest_argmax=ints[..., :dim] - self.first[:, None],
            first_norm=first_norm, rest_norm=rest_norm_sum / self.others_count, massive_count=massive_count,
            massive_tokens=massive_tokens, nonfinite=self.tokens * dim - finite,
        )
        return [LayerStats(**dict(zip(values, row))) for row in zip(*(v.unbind(0) for v in values.values()))]


def reduce_packed(h: torch.Tensor, masks: dict, abs_threshold: float = 100.0, ratio: float = 1000.0,
                  median: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reduce_hidden`'s values from a plan's ``masks``, packed as floats (B, 3D + 4) and ints (B, D + 4)
    for :meth:`ReductionPlan.unpack`. Same operations where floats are summed, so the values are identical;
    ``median``: how the median is selected (:func:`nanmedian_rows`)."""
    hf = h.float()
    a = hf.abs()
    batch, _, dim = a.shape
    pad = masks["pad"]
    a_real = a if pad is None else a.masked_fill(pad, 0.0)
    max_abs, arg = a_real.reshape(batch, -1).max(1)
    median = nanmedian_rows((a if pad is None else a.masked_fill(pad, float("nan"))).reshape(batch, -1), median)
    carriers = hf.gather(1, masks["carrier_pos"][..., None].expand(-1, -1, dim))  # (B, 2, D): first, delimiter
    if masks["carrier_absent"] is not None:
        carriers = carriers.masked_fill(masks["carrier_absent"], 0.0)
    norms = hf.norm(dim=-1)
    first_norm = (norms * masks["first_sel"]).sum(1)
    rest_norm_sum = (norms * masks["others"]).sum(1)
    threshold = torch.clamp(median * ratio, min=abs_threshold)
    massive = a_real > threshold[:, None, None]
    finite = torch.isfinite(a_real).sum((1, 2))  # pads are 0 here: finite
    rest_max, rest_arg = a.masked_fill_(masks["rest_excluded"], -1.0).max(1)  # in place: a's last use
    floats = torch.cat([carriers.reshape(batch, -1), rest_max,
                        torch.stack([max_abs, median, first_norm, rest_norm_sum], 1)], 1)
    ints = torch.cat([rest_arg, torch.stack([arg, massive.sum((1, 2)), massive.any(-1).sum(1), finite], 1)], 1)
    return floats, ints


def _record(fn, device: torch.device):
    """``fn`` captured as a CUDA graph on ``device``, the current device meanwhile (warmed up on a side stream first:
    lazy initialisation, workspaces); the graph's ``replay()`` runs it again. Tests swap this for ``fn`` itself to
    run on the CPU."""
    from .generation import _capture  # capture without torch.cuda.graph's cache flush; failure-safe

    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        _capture(graph, side, fn)
    return graph


class GraphedReduction:
    """:func:`reduce_packed` for one input shape and mask layout, captured as a CUDA graph: one launch replays
    its ~30 kernels. The graph reads its own copies of the input and the masks, refreshed before a replay, and
    writes its packs into the next of ``rows`` rows of two stacks, advancing a row counter kept on the device:
    a block's host work is one copy and one replay, with no allocation and no copy out per block."""

    def __init__(self, h: torch.Tensor, masks: dict, abs_threshold: float, ratio: float, median: str, rows: int):
        self.input = h.clone()
        self.masks = {k: None if m is None else m.clone() for k, m in masks.items()}
        self.masks_of = masks
        floats, ints = reduce_packed(self.input, self.masks, abs_threshold, ratio, median)  # the packs' shapes
        self.floats = floats.new_zeros((rows, *floats.shape))
        self.ints = ints.new_zeros((rows, *ints.shape))
        self.rows, self.used = rows, 0
        self.row = torch.zeros(1, dtype=torch.long, device=h.device)

        def reduce_into_next_row():
            f, i = reduce_packed(self.input, self.masks, abs_threshold, ratio, median)
            self.floats.index_copy_(0, self.row, f[None])
            self.ints.index_copy_(0, self.row, i[None])
            self.row.add_(1)

        self.graph = _record(reduce_into_next_row, h.device)

    def restart(self) -> None:
        """Back to row 0: once per forward, before its first replay."""
        self.row.zero_()
        self.used = 0

    def stacks(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rows`` rows' packs, (rows, B, ·) each."""
        return self.floats[:rows], self.ints[:rows]

    def __call__(self, h: torch.Tensor, masks: dict) -> int:
        """Reduce ``h`` into the next row; returns that row's index."""
        if masks is not self.masks_of:  # a new forward's plan
            for k, m in masks.items():
                if m is not None:
                    self.masks[k].copy_(m)
            self.masks_of = masks
        self.input.copy_(h)
        self.graph.replay()
        self.used += 1
        return self.used - 1


_GRAPHS: "OrderedDict[tuple, Optional[GraphedReduction]]" = OrderedDict()
GRAPHS_KEPT = 2  # each holds its intermediates' memory; a scan's batches mostly differ in width anyway


def graphed_reduction(h: torch.Tensor, masks: dict, abs_threshold: float, ratio: float, median: str = "auto",
                      rows: int = 1) -> Optional[GraphedReduction]:
    """The captured reduction for ``h``'s shape and the mask layout, with ``rows`` output rows, shared by every
    capture (a scan makes one per run); None where the capture failed, and the caller reduces eagerly (same
    values)."""
    key = (tuple(h.shape), h.dtype, h.device, abs_threshold, ratio, median, rows,
           tuple(m is None for m in masks.values()))
    if key not in _GRAPHS:
        try:
            _GRAPHS[key] = GraphedReduction(h, masks, abs_threshold, ratio, median, rows)
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture of the scan reduction failed ({err}); reducing eagerly", stacklevel=2)
            _GRAPHS[key] = None
        while len(_GRAPHS) > GRAPHS_KEPT:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return _GRAPHS[key]


def _graphable(h: torch.Tensor) -> bool:
    return h.is_cuda


class ResidualCapture:
    """Hooks every decoder block and keeps a :class:`LayerStats` per block for the last forward, plus the
    statistics of the embeddings (block 0's input) in ``embedding``.

    ``abs_threshold`` / ``ratio``: the massive criterion used for the exact counts. ``reduction`` (how
    :meth:`run` computes the same values): "reference" (:func:`reduce_hidden` per block), "eager"
    (:func:`reduce_packed`), "cuda_graph" (its graph replayed; eager off CUDA), "fused" (one Triton kernel per
    16-bit state, :mod:`melayer.fused_reduction`; other states, and those too large for its 32-bit offsets, as
    "cuda_graph") or "auto" (:func:`resolve_reduction`); ``median``: how the packed reductions select the median
    (:func:`nanmedian_rows`).
    A forward outside :meth:`run` is reduced by :func:`reduce_hidden`, on the device.
    """

    def __init__(self, model: nn.Module, abs_threshold: float = 100.0, ratio: float = 1000.0, reduction: str = "auto",
                 median: str = "auto"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if median not in MEDIANS:
            raise ValueError(f"median must be one of {MEDIANS}, got {median!r}")
        if reduction == "fused" and not fused_reduction.available():
            raise ValueError(f'reduction="fused" {fused_reduction.NEEDS_TRITON}')
        self.model = model
        self.abs_threshold, self.ratio = abs_threshold, ratio
        self.reduction, self.median = reduction, median
        self.hooks = HookGroup()
        self.ctx = TokenContext(model, self.hooks)
        self.delim_index: Optional[torch.Tensor] = None
        self.plan: Optional[ReductionPlan] = None
        self.graphed = self.fused = False
        self.stats: dict[int, LayerStats] = {}
        self.embedding: Optional[LayerStats] = None
        self._packs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[int, tuple] = {}  # index -> (its GraphedReduction or FusedReduction, its row there)
        self._last_source: dict[str, tuple] = {}  # "graph" / "fused" -> the last (shape key, row source) used
        layers = adapter_for(model).layers(model)
        self._states = len(layers) + 1  # the embeddings and every block's output
        self.hooks.pre(layers[0], self._embedding_hook, with_kwargs=True)
        for i, block in enumerate(layers):
            self.hooks.forward(block, self._make_hook(i))

    def _reduce(self, h: torch.Tensor) -> LayerStats:
        ctx = self.ctx
        delim = self.delim_index
        if delim is None:
            delim_sel = torch.zeros_like(ctx.valid)
        else:
            delim_sel = ctx.chunk_pos[None, :] == delim.to(ctx.chunk_pos.device)[:, None]
        return reduce_hidden(h, ctx.valid, ctx.first_token(), delim_sel, ctx.first, self.abs_threshold, self.ratio)

    def _keep(self, index: int, h: torch.Tensor) -> None:
        """Reduce one hidden state (index -1: the embeddings) on its device: no host sync."""
        h = h.detach()
        with torch.no_grad():
            if self.plan is None:
                stats = self._reduce(h)
                if index < 0:
                    self.embedding = stats
                else:
                    self.stats[index] = stats
                return
            if self.fused and fused_reduction.supports(h, self._states):
                fused = self._row_source("fused", h, lambda: fused_reduction.shared(h, self._states,
                                                                                    self.abs_threshold, self.ratio))
                self._rows[index] = (fused, fused(h, self.plan))
                return
            masks = self.plan.on(h.device)
            graph = None
            if self.graphed and _graphable(h):
                graph = self._row_source("graph", h, lambda: graphed_reduction(
                    h, masks, self.abs_threshold, self.ratio, self.median, self._states))
            if graph is not None and graph.used < graph.rows:
                self._rows[index] = (graph, graph(h, masks))
            else:
                self._packs[index] = reduce_packed(h, masks, self.abs_threshold, self.ratio, self.median)

    def _row_source(self, kind: str, h: torch.Tensor, shared):
        """The row source of ``kind`` ("graph": :class:`GraphedReduction`, "fused":
        :class:`~melayer.fused_reduction.FusedReduction`) for ``h``'s shape: ``shared()`` (every block of a model on
        one device shares one; None where a graph failed), restarted at its first use in this forward. The last one
        of each kind is remembered, so a block costs no cache lookup."""
        key = (h.shape, h.dtype, h.device)
        last = self._last_source.get(kind)
        if last is None or last[0] != key:
            source = shared()
            if source is not None and all(s is not source for s, _ in self._rows.values()):
                source.restart()
            last = self._last_source[kind] = (key, source)
        return last[1]

    def _embedding_hook(self, module, args, kwargs):
        self._keep(-1, hidden_arg(args, kwargs))

    def _make_hook(self, index: int):
        def hook(module, args, output):
            self._keep(index, block_output(output))

        return hook

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            delim_index: Optional[torch.Tensor] = None) -> list[LayerStats]:
        """One forward pass (no logits kept); returns the per-block statistics in block order (on the CPU).

        ``delim_index`` (B,): the absolute position of each sequence's first delimiter token (-1: none).
        """
        device = device_of(self.model)
        reduction = resolve_reduction(self.reduction, device)
        self.stats, self.embedding, self._packs, self._rows = {}, None, {}, {}
        self._last_source = {}
        self.delim_index = delim_index
        plan = None if reduction == "reference" else ReductionPlan(attention_mask, delim_index)
        if plan is not None:
            plan.on(device)  # host-to-device copies wait for the stream: make them before the forward, not in it
        self.plan, self.graphed, self.fused = plan, reduction in ("cuda_graph", "fused"), reduction == "fused"
        try:
            adapter_for(self.model).decoder(self.model)(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            )
        finally:
            self.plan = None
        if plan is None:
            self.embedding = self.embedding.to("cpu")
            return [self.stats[i].to("cpu") for i in range(len(self.stats))]
        rows = [self._rows[i] for i in sorted(self._rows)]  # the embeddings (-1) first
        sources = {id(g): g for g, _ in rows}  # each finishes its rows once
        stacks = {key: g.stacks(g.used) for key, g in sources.items()}
        if rows and not self._packs and all(g is rows[0][0] and r == k for k, (g, r) in enumerate(rows)):
            floats, ints = (s.cpu() for s in stacks[id(rows[0][0])])  # every state in one source's rows, in order
        else:
            packs = [self._packs[i] if i in self._packs else self._row_pack(i, stacks)
                     for i in sorted([*self._packs, *self._rows])]
            floats, ints = (torch.stack([p[k].to(device) for p in packs]).cpu() for k in (0, 1))
        self._packs, self._rows = {}, {}
        self.embedding, *layers = plan.unpack(floats, ints)
        self.stats = dict(enumerate(layers))
        return layers

    def _row_pack(self, index: int, stacks: dict) -> tuple[torch.Tensor, torch.Tensor]:
        source, row = self._rows[index]
        return tuple(s[row] for s in stacks[id(source)])

    def remove(self) -> None:
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
