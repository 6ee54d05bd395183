"""Rigidity: once token 0 carries the massive value, does its representation stop changing?

Two views, for the residual stream (block outputs) and the attention input (what each block's attention
reads): cosine of token 0 with itself across layers (layer × layer), and cosine between token 0 of
*different* inputs at the same layer. The same numbers for ordinary tokens are the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup, block_output
from .common import Inputs, InputsLike, as_inputs, check_layer, hidden_arg, run_decoder


@dataclass
class StreamRigidity:
    token0_layers: list[list[float]]  # (L, L) mean over inputs of cos(token0 at layer l, token0 at layer m)
    other_layers: list[list[float]]  # (L, L) the same for ordinary tokens (mean over tokens)
    token0_across: list[float]  # (L,) mean cos between token 0 of different inputs at each layer
    other_across: list[float]  # (L,) mean cos between ordinary tokens of different inputs


@dataclass
class Rigidity:
    me_layer: int
    residual: StreamRigidity  # layer l = block l's output
    attention_input: StreamRigidity  # layer l = block l's attention input


def layer_cosine(states: torch.Tensor) -> torch.Tensor:
    """(L, N, D) -> (L, L): mean over the N vectors of the cosine between layers l and m."""
    u = torch.nn.functional.normalize(states.float(), dim=-1)
    return torch.einsum("lnd,mnd->lm", u, u) / states.shape[1]


def cross_input_cosine(vectors: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean cosine over all pairs of vectors (N, D) that come from different groups (inputs); NaN if none."""
    u = torch.nn.functional.normalize(vectors.float(), dim=-1)
    ids = groups.unique()
    sums = torch.stack([u[groups == g].sum(0) for g in ids])
    sizes = torch.stack([(groups == g).sum() for g in ids]).double()
    pairs = float(sizes.sum() ** 2 - (sizes ** 2).sum())
    if pairs == 0:
        return float("nan")
    total = sums.sum(0)
    return float((total @ total - (sums * sums).sum()) / pairs)


def _stream(states: torch.Tensor, inputs: Inputs) -> StreamRigidity:
    """states (L, B, T, D) -> the four rigidity views."""
    first, other = inputs.first_sel, inputs.other_sel
    rows = torch.arange(len(inputs))[:, None].expand_as(other)
    t0 = states[:, first]  # (L, B, D)
    rest = states[:, other]  # (L, N, D)
    t0_groups = torch.arange(len(inputs))
    return StreamRigidity(
        token0_layers=layer_cosine(t0).tolist(), other_layers=layer_cosine(rest).tolist(),
        token0_across=[cross_input_cosine(t0[l], t0_groups) for l in range(states.shape[0])],
        other_across=[cross_input_cosine(rest[l], rows[other]) for l in range(states.shape[0])],
    )


@torch.no_grad()
def rigidity(model, tokenizer, me_layer: int, inputs: InputsLike) -> Rigidity:
    """Cosine similarities of token 0 (and of ordinary tokens) across layers and across inputs."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    ad = adapter_for(model)
    layers = ad.layers(model)
    resid: dict[int, torch.Tensor] = {}
    attn_in: dict[int, torch.Tensor] = {}
    with HookGroup() as hooks:
        for i, block in enumerate(layers):
            hooks.forward(block, lambda m, a, o, i=i: resid.__setitem__(i, block_output(o).detach().float().cpu()))
            hooks.pre(ad.attn_module(block),
                      lambda m, a, k, i=i: attn_in.__setitem__(i, hidden_arg(a, k).detach().float().cpu()),
                      with_kwargs=True)
        run_decoder(model, inputs)
    n = len(layers)
    return Rigidity(me_layer, _stream(torch.stack([resid[i] for i in range(n)]), inputs),
                    _stream(torch.stack([attn_in[i] for i in range(n)]), inputs))
