"""The FFN's role at the ME layer: which neurons write the massive value, and how few of them it takes.

The FFN output on dim d is a sum over neurons: out_d = Σ_j act_j · W_down[d, j], act = σ(gate x) ⊙ (up x).
Each term is neuron j's contribution; sorting them shows whether a handful of neurons carry the spike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup, block_output
from .common import InputsLike, as_inputs, check_layer, hidden_arg, run_decoder

SHARES = (0.5, 0.9, 0.99)


@dataclass
class DimAttribution:
    dim: int
    ffn_output: float  # token 0's FFN output on this dim, mean over inputs (from the module itself)
    attributed: float  # Σ_j contribution_j (equals ffn_output up to rounding)
    others_abs: float  # mean |FFN output| of the other tokens on this dim
    top_neurons: list[int] = field(default_factory=list)  # sorted by contribution toward the sign of the total
    top_contributions: list[float] = field(default_factory=list)
    cumulative_share: list[float] = field(default_factory=list)  # Σ of the top 1..n contributions / total
    neurons_for_share: dict[str, int] = field(default_factory=dict)  # "0.9" -> n neurons reaching 90 %


@dataclass
class FFNRole:
    me_layer: int
    intermediate_size: int
    dims: list[DimAttribution]
    ablate_neurons: list[int]  # the neurons the ablations zero: enough for 90 % of each dim (capped)


def contributions(act: torch.Tensor, w_down: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """(..., len(dims), inter) per-neuron contributions act_j · W_down[d, j] in fp32."""
    return act.float()[..., None, :] * w_down.float()[list(dims)].to(act.device)


def _neurons_for(cum: torch.Tensor, share: float) -> int:
    hit = (cum >= share).nonzero()
    return int(hit[0]) + 1 if len(hit) else len(cum)


@torch.no_grad()
def ffn_role(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int], top: int = 32,
             max_ablate: int = 32) -> FFNRole:
    """Attribute token 0's FFN output on each massive dim to individual neurons of the ME block."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    ad = adapter_for(model)
    block = ad.block(model, me_layer)
    mlp = ad.mlp_module(block)
    seen: dict[str, torch.Tensor] = {}
    with HookGroup() as hooks:
        hooks.pre(mlp, lambda m, a, k: seen.__setitem__("x", hidden_arg(a, k).detach()), with_kwargs=True)
        hooks.forward(mlp, lambda m, a, o: seen.__setitem__("out", block_output(o).detach().float().cpu()))
        run_decoder(model, inputs)
    rows = torch.arange(len(inputs))
    x0 = seen["x"][rows, inputs.first.to(seen["x"].device)]  # (B, D) FFN input of token 0
    act0 = ad.ffn_activation(block, x0).float().cpu()  # (B, inter)
    w_down = ad.ffn_weights(block)[2].detach().float().cpu()
    contrib = contributions(act0, w_down, dims).mean(0)  # (n_dims, inter)
    others = inputs.other_sel
    result = []
    for i, d in enumerate(dims):
        c = contrib[i]
        total = c.sum()
        sign = 1.0 if total >= 0 else -1.0
        order = (c * sign).argsort(descending=True)
        cum = c[order].cumsum(0) / total
        out = seen["out"][..., d]
        result.append(DimAttribution(
            dim=int(d), ffn_output=float(out[rows, inputs.first].mean()), attributed=float(total),
            others_abs=float(out.abs()[others].mean()),
            top_neurons=order[:top].tolist(), top_contributions=c[order[:top]].tolist(),
            cumulative_share=cum[:top].tolist(),
            neurons_for_share={str(s): _neurons_for(cum, s) for s in SHARES},
        ))
    ablate: list[int] = []
    for r in result:
        for j in r.top_neurons[:r.neurons_for_share["0.9"]]:
            if j not in ablate and len(ablate) < max_ablate:
                ablate.append(j)
    return FFNRole(me_layer, int(w_down.shape[1]), result, ablate)
