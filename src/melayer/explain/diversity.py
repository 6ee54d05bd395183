"""Diversity of the attention inputs: effective rank per layer, with and without WeMask.

Effective rank (Roy & Vetterli 2007) = exp(H(p)), p = σ / Σσ the normalised singular values of the
(tokens × hidden) matrix one attention layer reads. A token whose row dominates (token 0 after the ME
layer) concentrates the spectrum and lowers it; WeMask is meant to undo that.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup
from .common import InputsLike, as_inputs, check_layer, hidden_arg, hidden_size, run_decoder


@dataclass
class RankCurve:
    rate: float  # WeMask rate (0 = no WeMask)
    masked_dims: int  # k = floor(rate × hidden)
    effective_rank: list[float]  # per layer, mean over inputs


@dataclass
class Diversity:
    me_layer: int
    curves: list[RankCurve]

    def curve(self, rate: float) -> RankCurve:
        return next(c for c in self.curves if c.rate == rate)


def effective_rank(x: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values of a 2-D matrix (fp64 for stability)."""
    s = torch.linalg.svdvals(x.double())
    s = s[s > s.max() * 1e-12] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def wemask_context(model, tokenizer, rate: float, me_layer: int):
    """WeMask at ``rate`` after the ME layer (nothing for rate 0)."""
    if rate == 0:
        return contextlib.nullcontext()
    from ..wemask import wemask

    return wemask(model, rate, tokenizer=tokenizer, me_layer=me_layer)


@torch.no_grad()
def attention_input_ranks(model, inputs) -> list[float]:
    """Per layer, the mean effective rank of each input's attention-input matrix (real tokens only)."""
    ad = adapter_for(model)
    layers = ad.layers(model)
    ranks: dict[int, float] = {}
    valid = inputs.valid

    def hook(i):
        def fn(module, args, kwargs):
            x = hidden_arg(args, kwargs).detach().float().cpu()
            ranks[i] = sum(effective_rank(x[b][valid[b]]) for b in range(x.shape[0])) / x.shape[0]
        return fn

    with HookGroup() as hooks:
        for i, block in enumerate(layers):
            hooks.pre(ad.attn_module(block), hook(i), with_kwargs=True)
        run_decoder(model, inputs)
    return [ranks[i] for i in range(len(layers))]


def diversity(model, tokenizer, me_layer: int, inputs: InputsLike, rates: Sequence[float] = (0.0,)) -> Diversity:
    """Effective rank of the attention inputs per layer for each WeMask rate.

    WeMask's hooks are registered before ours, so we read the attention input *after* masking.
    """
    from ..wemask import WeMaskConfig

    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    curves = []
    for rate in rates:
        with wemask_context(model, tokenizer, rate, me_layer):
            ranks = attention_input_ranks(model, inputs)
        curves.append(RankCurve(float(rate), WeMaskConfig(rate=rate).k(hidden_size(model)), ranks))
    return Diversity(me_layer, curves)
