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
from ..modelutils import check_layer, hidden_arg
from ..report import markdown_table, new_figure
from .claims import Check, make_claim
from .common import InputsLike, as_inputs, run_decoder
from .registry import Analysis, Context, register_analysis

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
    write_share: list[float] = field(default_factory=list)  # per prompt: FFN write ÷ the block's jump (first dim)


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
    write_site = mlp if ad.post_ffn_norm is None else ad.get(block, ad.post_ffn_norm)  # what enters the residual
    with HookGroup() as hooks:
        hooks.pre(mlp, lambda m, a, k: seen.__setitem__("x", hidden_arg(a, k).detach()), with_kwargs=True)
        hooks.forward(mlp, lambda m, a, o: seen.__setitem__("out", block_output(o).detach().float().cpu()))
        hooks.forward(write_site, lambda m, a, o: seen.__setitem__("write", block_output(o).detach().float().cpu()))
        hooks.pre(block, lambda m, a, k: seen.__setitem__("in", hidden_arg(a, k).detach().float().cpu()),
                  with_kwargs=True)
        hooks.forward(block, lambda m, a, o: seen.__setitem__("block_out", block_output(o).detach().float().cpu()))
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
    first, d0 = inputs.first, dims[0]
    jump = seen["block_out"][rows, first, d0] - seen["in"][rows, first, d0]
    share = seen["write"][rows, first, d0] / jump
    return FFNRole(me_layer, int(w_down.shape[1]), result, ablate, share.tolist())


# -- in the explain report ----------------------------------------------------------------------------------

WRITES = 0.5  # the FFN "writes" the massive value when it writes at least half of the ME block's jump


def run(ctx: Context) -> FFNRole:
    return ffn_role(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, ctx.dims,
                    max_ablate=ctx.config.max_ablate_neurons)


def claims(f: FFNRole, ctx: Context) -> list:
    d = f.dims[0]
    details = {"neurons_for_share": d.neurons_for_share, "top_neurons": d.top_neurons[:8]}
    ab = ctx.results.get("ablations")
    if ab is not None:
        details["spike_left"] = {r.name: r.spike_left for r in ab.rows if r.group in ("ffn", "control")}
    test = Check.measure("ffn_write_share", f.write_share, WRITES, ">=", seed=ctx.config.seed)
    return [make_claim(
        "ffn_writes", "The FFN of the ME block writes the massive value", [test],
        f"FFN write into dim {d.dim} of token 0 ÷ the ME block's jump on that dim (per prompt)",
        f"holds when the share's 95% CI lies above {WRITES:g}",
        f"block {ctx.me_layer} (paper: {ctx.me_layer + 1}), dim {d.dim}, {len(ctx.inputs)} prompts", details=details)]


def section(f: FFNRole, ctx: Context) -> list[str]:
    return [f"contribution_j = act_j × W_down[dim, j], act = σ(gate)·up; token 0, mean over prompts "
            f"({f.intermediate_size} neurons).", "",
            markdown_table(["dim", "FFN out tok0", "Σ contributions", "|FFN out| others", "top neurons",
                            "neurons for 50/90/99 %"],
                           [(d.dim, d.ffn_output, d.attributed, d.others_abs, ", ".join(map(str, d.top_neurons[:5])),
                             "/".join(str(d.neurons_for_share[k]) for k in ("0.5", "0.9", "0.99")))
                            for d in f.dims]),
            f"Ablated neurons (90 % of each dim): {f.ablate_neurons}", "", "![FFN](ffn.png)", ""]


def figures(f: FFNRole, ctx: Context) -> dict:
    d = f.dims[0]
    fig, a = new_figure(figsize=(8, 3.6))
    k = min(20, len(d.top_neurons))
    a.bar(range(k), d.top_contributions[:k], color="C0")
    a.set_xticks(range(k), [str(j) for j in d.top_neurons[:k]], rotation=70, fontsize=7)
    a.set(xlabel="FFN neuron", ylabel=f"contribution to dim {d.dim}",
          title=f"Block {ctx.me_layer}: neuron attribution (token 0)")
    t = a.twinx()
    t.plot(range(k), d.cumulative_share[:k], "o-", color="C3", ms=3)
    t.set_ylabel("cumulative share", color="C3")
    return {"ffn": fig}


ANALYSIS = register_analysis(Analysis("ffn", "FFN neurons at the ME layer", run, claims, section, figures,
                                      needs=("emergence",)))
