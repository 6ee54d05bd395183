"""Reduce the residual stream to per-layer statistics *while* the forward pass runs.

A forward hook on every decoder block turns the block's output (B, T, D) into a few fp32 numbers per
sequence and discards it, so memory is O(layers × dims) per prompt instead of every hidden state.
Pad tokens are excluded using the attention mask (left padding aware, via :class:`TokenContext`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .adapters import adapter_for
from .hooks import HookGroup, TokenContext, block_output


@dataclass
class LayerStats:
    """Statistics of one decoder block's output for a batch; leading dim is the batch."""

    max_abs: torch.Tensor  # (B,) largest |h| over real tokens and dims
    max_pos: torch.Tensor  # (B,) its token position, relative to the first real token
    max_dim: torch.Tensor  # (B,) its hidden dimension
    median_abs: torch.Tensor  # (B,) median |h| over real tokens and dims
    first_abs: torch.Tensor  # (B, D) |h| of the first real token
    delim_abs: torch.Tensor  # (B, D) |h| of the first delimiter token (zeros where none)
    rest_max_abs: torch.Tensor  # (B, D) per-dim max |h| over the other real tokens
    first_norm: torch.Tensor  # (B,) L2 norm of the first token
    rest_norm: torch.Tensor  # (B,) mean L2 norm of the other real tokens
    top_values: torch.Tensor  # (B, K) the K largest |h| (candidates for massive events)
    top_pos: torch.Tensor  # (B, K) their token positions (relative to the first real token)
    top_dims: torch.Tensor  # (B, K) their dims


def reduce_hidden(h: torch.Tensor, valid: torch.Tensor, first_sel: torch.Tensor,
                  delim_sel: torch.Tensor, first: torch.Tensor, top_k: int = 32) -> LayerStats:
    """The reduction itself (pure function, so tests can apply it to ``output_hidden_states``)."""
    h = h.float()
    a = h.abs()
    batch, length, dim = a.shape
    a_valid = a.masked_fill(~valid[..., None], 0.0)
    flat = a_valid.reshape(batch, -1)
    max_abs, arg = flat.max(dim=1)
    median = torch.nanmedian(a.masked_fill(~valid[..., None], float("nan")).reshape(batch, -1), dim=1).values
    first_abs = (a * first_sel[..., None]).sum(1)
    delim_abs = (a * delim_sel[..., None]).sum(1)
    rest = valid & ~first_sel
    rest_max = a.masked_fill(~rest[..., None], 0.0).amax(1)
    norms = h.norm(dim=-1)
    first_norm = (norms * first_sel).sum(1)
    rest_norm = (norms * rest).sum(1) / rest.sum(1).clamp(min=1)
    k = min(top_k, flat.shape[1])
    top_values, top_idx = flat.topk(k, dim=1)
    return LayerStats(
        max_abs=max_abs, max_pos=arg // dim - first, max_dim=arg % dim, median_abs=median,
        first_abs=first_abs, delim_abs=delim_abs, rest_max_abs=rest_max, first_norm=first_norm,
        rest_norm=rest_norm, top_values=top_values, top_pos=top_idx // dim - first[:, None], top_dims=top_idx % dim,
    )


class ResidualCapture:
    """Hooks every decoder block and keeps a :class:`LayerStats` per block for the last forward.

    ``delim_index`` (B,) — the absolute position of each sequence's first delimiter token (-1: none) —
    must be set before the forward pass.
    """

    def __init__(self, model: nn.Module, top_k: int = 32):
        self.model = model
        self.top_k = top_k
        self.hooks = HookGroup()
        self.ctx = TokenContext(model, self.hooks)
        self.delim_index: Optional[torch.Tensor] = None
        self.stats: dict[int, LayerStats] = {}
        for i, block in enumerate(adapter_for(model).layers(model)):
            self.hooks.forward(block, self._make_hook(i))

    def _make_hook(self, index: int):
        def hook(module, args, output):
            ctx = self.ctx
            delim = self.delim_index
            if delim is None:
                delim_sel = torch.zeros_like(ctx.valid)
            else:
                delim_sel = ctx.chunk_pos[None, :] == delim.to(ctx.chunk_pos.device)[:, None]
            with torch.no_grad():  # stays on the device: one transfer after the forward, no per-block sync
                self.stats[index] = reduce_hidden(block_output(output).detach(), ctx.valid, ctx.first_token(),
                                                  delim_sel, ctx.first, self.top_k)

        return hook

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            delim_index: Optional[torch.Tensor] = None) -> list[LayerStats]:
        """One forward pass (no logits kept); returns the per-block statistics in block order."""
        self.stats = {}
        self.delim_index = delim_index
        device = next(self.model.parameters()).device
        adapter_for(self.model).decoder(self.model)(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        )
        return [LayerStats(**{k: v.cpu() for k, v in vars(self.stats[i]).items()}) for i in range(len(self.stats))]

    def remove(self) -> None:
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
