"""Attention sinks: how much attention mass lands on token 0, per layer and head, and when it starts.

Probabilities need eager attention, so the model is switched to it only for these forward passes and
switched back afterwards. Two statistics: the mean over all queries after token 0, and the last query
alone (the variant the paper's code reports).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..adapters import adapter_for, base_model
from ..hooks import HookGroup
from .common import Inputs, InputsLike, as_inputs, check_layer, run_decoder
from .diversity import wemask_context


@dataclass
class SinkCurve:
    rate: float  # WeMask rate (0 = none)
    mass_mean: list[float]  # per layer: mean over heads, queries and inputs of the mass on token 0
    mass_last: list[float]  # per layer: the same for the last query only


@dataclass
class Sinks:
    me_layer: int
    threshold: float  # a layer "has a sink" when its mean mass on token 0 reaches this
    heads_mean: list[list[float]]  # (L, H) without WeMask: mean over queries
    heads_last: list[list[float]]  # (L, H) without WeMask: last query
    onset_layer: Optional[int]  # first layer whose head-mean mass reaches the threshold
    onset_layer_last: Optional[int]
    jump_layer: int  # layer with the largest increase of the head-mean mass over the previous layer
    curves: list[SinkCurve] = field(default_factory=list)

    def curve(self, rate: float) -> SinkCurve:
        return next(c for c in self.curves if c.rate == rate)


@contextlib.contextmanager
def eager_attention(model):
    """Temporarily switch to eager attention (the only one that materialises probabilities)."""
    base = base_model(model)
    previous = base.config._attn_implementation
    if previous != "eager":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            base.set_attn_implementation(previous)


def sink_mass(probs: torch.Tensor, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, H, T, T) -> per head (H,) mass on each row's first real token: mean over queries after it,
    and the last query's; both averaged over the batch."""
    probs = probs.float()
    b = torch.arange(len(inputs))
    on_first = probs[b, :, :, inputs.first]  # (B, H, T): every query's mass on its row's token 0
    queries = inputs.other_sel  # real queries after token 0
    mean = (on_first * queries[:, None, :]).sum(-1) / queries.sum(-1, keepdim=True)
    return mean.mean(0), on_first[:, :, -1].mean(0)


@torch.no_grad()
def attention_sink_heads(model, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, H) mass on token 0 per layer and head: mean over queries, and last query."""
    ad = adapter_for(model)
    layers = ad.layers(model)
    mean: dict[int, torch.Tensor] = {}
    last: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, output):
            mean[i], last[i] = sink_mass(output[1].detach().cpu(), inputs)
        return fn

    with eager_attention(model), HookGroup() as hooks:
        for i, block in enumerate(layers):
            hooks.forward(ad.attn_module(block), hook(i))
        run_decoder(model, inputs)
    n = len(layers)
    return torch.stack([mean[i] for i in range(n)]), torch.stack([last[i] for i in range(n)])


def _onset(curve: torch.Tensor, threshold: float) -> Optional[int]:
    hit = (curve >= threshold).nonzero()
    return int(hit[0]) if len(hit) else None


def sinks(model, tokenizer, me_layer: int, inputs: InputsLike, rates: Sequence[float] = (0.0,),
          threshold: float = 0.5) -> Sinks:
    """Sink heatmaps without WeMask, the sink onset vs the ME layer, and sink curves per WeMask rate."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    rates = sorted({0.0, *map(float, rates)})
    heads: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    for rate in rates:
        with wemask_context(model, tokenizer, rate, me_layer):
            heads[rate] = attention_sink_heads(model, inputs)
    mean, last = heads[0.0]
    layer_mean, layer_last = mean.mean(1), last.mean(1)
    jumps = torch.diff(layer_mean, prepend=layer_mean.new_zeros(1))
    return Sinks(
        me_layer=me_layer, threshold=threshold, heads_mean=mean.tolist(), heads_last=last.tolist(),
        onset_layer=_onset(layer_mean, threshold), onset_layer_last=_onset(layer_last, threshold),
        jump_layer=int(jumps.argmax()),
        curves=[SinkCurve(r, heads[r][0].mean(1).tolist(), heads[r][1].mean(1).tolist()) for r in rates],
    )
