"""Reduce the residual stream to per-block statistics *while* the forward pass runs.

A forward hook on every decoder block turns the block's output (B, T, D) into a few fp32 numbers per
sequence and discards it, so memory is O(layers × dims) per prompt instead of every hidden state. The
first token, the first delimiter and every dim's largest value over the other tokens are kept per dim
(signed for the first two), so any massive value on any token is seen, and massive entries are counted
exactly. Pad tokens are excluded using the attention mask (left padding aware, via :class:`TokenContext`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn

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


class ResidualCapture:
    """Hooks every decoder block and keeps a :class:`LayerStats` per block for the last forward, plus the
    statistics of the embeddings (block 0's input) in ``embedding``.

    ``abs_threshold`` / ``ratio``: the massive criterion used for the exact counts.
    """

    def __init__(self, model: nn.Module, abs_threshold: float = 100.0, ratio: float = 1000.0):
        self.model = model
        self.abs_threshold, self.ratio = abs_threshold, ratio
        self.hooks = HookGroup()
        self.ctx = TokenContext(model, self.hooks)
        self.delim_index: Optional[torch.Tensor] = None
        self.stats: dict[int, LayerStats] = {}
        self.embedding: Optional[LayerStats] = None
        layers = adapter_for(model).layers(model)
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
        with torch.no_grad():  # stays on the device: one transfer after the forward, no per-block sync
            return reduce_hidden(h.detach(), ctx.valid, ctx.first_token(), delim_sel, ctx.first,
                                 self.abs_threshold, self.ratio)

    def _embedding_hook(self, module, args, kwargs):
        self.embedding = self._reduce(hidden_arg(args, kwargs))

    def _make_hook(self, index: int):
        def hook(module, args, output):
            self.stats[index] = self._reduce(block_output(output))

        return hook

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            delim_index: Optional[torch.Tensor] = None) -> list[LayerStats]:
        """One forward pass (no logits kept); returns the per-block statistics in block order (on the CPU).

        ``delim_index`` (B,): the absolute position of each sequence's first delimiter token (-1: none).
        """
        self.stats, self.embedding = {}, None
        self.delim_index = delim_index
        device = device_of(self.model)
        adapter_for(self.model).decoder(self.model)(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        )
        self.embedding = self.embedding.to("cpu")
        return [self.stats[i].to("cpu") for i in range(len(self.stats))]

    def remove(self) -> None:
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
