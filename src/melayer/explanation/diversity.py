"""Diversity of the attention inputs: effective rank per layer, with and without token 0 (claim ``diversity``).

Effective rank (Roy & Vetterli 2007) = exp(H(p)), p = σ / Σσ the normalised singular values of the
(tokens × hidden) matrix one attention layer reads. A token whose row dominates (token 0 after the ME layer)
concentrates the spectrum and lowers it; the rank without token 0's row shows how much. The paper's claim that
WeMask raises the rank where it acts (``diversity``) is measured with the other WeMask effects (``wemask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup
from ..modelutils import check_layer, hidden_arg
from ..report import new_figure
from .common import Inputs, InputsLike, as_inputs, effective_rank, run_decoder
from .registry import Analysis, Context, register_analysis

@dataclass
class Diversity:
    me_layer: int
    effective_rank: list[float]  # per layer, mean over prompts (real tokens)
    without_token0: list[float]  # per layer, the same without token 0's row


@torch.no_grad()
def attention_input_ranks(model, inputs: Inputs) -> tuple[list[float], list[float]]:
    """Per layer, the mean effective rank of each prompt's attention-input matrix, with and without token 0."""
    ad = adapter_for(model)
    layers = ad.layers(model)
    ranks: dict[int, tuple[float, float]] = {}
    valid, other = inputs.valid, inputs.other_sel

    def hook(i):
        def fn(module, args, kwargs):
            x = hidden_arg(args, kwargs).detach().float().cpu()
            n = x.shape[0]
            ranks[i] = (sum(effective_rank(x[b][valid[b]]) for b in range(n)) / n,
                        sum(effective_rank(x[b][other[b]]) for b in range(n)) / n)
        return fn

    with HookGroup() as hooks:
        for i, block in enumerate(layers):
            hooks.pre(ad.attn_module(block), hook(i), with_kwargs=True)
        run_decoder(model, inputs)
    return [ranks[i][0] for i in range(len(layers))], [ranks[i][1] for i in range(len(layers))]


def diversity(model, tokenizer, me_layer: int, inputs: InputsLike) -> Diversity:
    """Effective rank of the attention inputs per layer, with and without token 0's row."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    return Diversity(me_layer, *attention_input_ranks(model, inputs))


# -- in the explain report ----------------------------------------------------------------------------------

def run(ctx: Context) -> Diversity:
    return diversity(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs)


def section(d: Diversity, ctx: Context) -> list[str]:
    me = ctx.me_layer
    n = len(d.effective_rank)
    at = min(me + 1, n - 1)
    return [f"Mean effective rank of the attention inputs: {d.effective_rank[at]:.3f} at block {at} with token 0, "
            f"{d.without_token0[at]:.3f} without its row (blocks before the ME layer: "
            f"{sum(d.effective_rank[:me + 1]) / (me + 1):.3f} with, {sum(d.without_token0[:me + 1]) / (me + 1):.3f} "
            "without). What WeMask changes is in the next section.", "", "![effective rank](diversity.png)", ""]


def figures(d: Diversity, ctx: Context) -> dict:
    fig, a = new_figure(figsize=(8, 3.6))
    layers = range(len(d.effective_rank))
    a.plot(layers, d.effective_rank, marker=".", label="all tokens")
    a.plot(layers, d.without_token0, marker=".", label="without token 0")
    a.axvline(ctx.me_layer, color="red", ls="--", lw=1, label=f"ME layer {ctx.me_layer}")
    a.set(xlabel="layer", ylabel="effective rank", title="Diversity of attention inputs")
    a.legend(fontsize=8)
    return {"diversity": fig}


ANALYSIS = register_analysis(Analysis("diversity", "Diversity of the attention inputs (effective rank)", run,
                                      section=section, figures=figures, needs=("emergence",)))
