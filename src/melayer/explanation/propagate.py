"""Propagation: after the ME layer, does any block still write into token 0's massive dims?

Each block adds two writes to the residual stream: h_out = h_in + attn_write + ffn_write. The writes are
read where they enter the residual (the post-sandwich norm's output for Gemma-2/3 and OLMo-2, else the
attention / MLP output), so they sum to the block's residual difference for every family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup, block_output
from ..modelutils import check_layer, hidden_arg
from ..report import markdown_table, new_figure
from .claims import Check, make_claim, not_measured
from .registry import Analysis, Context, register_analysis
from .common import InputsLike, as_inputs, run_decoder, token0


CARRY_CHANGE = 0.05  # a block "carries the value unchanged" when it changes it by less than 5 %
CARRY_SHARE = 0.8  # … and the claim holds when at least 80 % of the blocks after the ME layer do


@dataclass
class BlockWrite:
    block: int
    carried: list[float]  # token 0's residual entering the block, per massive dim (mean over inputs)
    attn: list[float]  # what attention writes into those dims
    ffn: list[float]  # what the FFN writes
    out: list[float]  # the residual leaving the block
    relative_change: float  # ||attn + ffn|| / ||carried|| over the dims


@dataclass
class Propagation:
    me_layer: int
    dims: list[int]
    blocks: list[BlockWrite]  # every block, 0 … L-1
    max_residual_error: float  # max |carried + attn + ffn − out| (a self-check of the decomposition)
    steady_share: list[float] = field(default_factory=list)  # per prompt: blocks after the ME layer changing it < 5%

    def after_me(self) -> list[BlockWrite]:
        return [b for b in self.blocks if b.block > self.me_layer]


@torch.no_grad()
def propagation(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int]) -> Propagation:
    """Per block: token 0's carried value on the massive dims and the attention / FFN writes into them."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    ad = adapter_for(model)
    dims = list(dims)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str, i: int, h: torch.Tensor) -> None:
        seen[kind, i] = token0(h.detach().float().cpu(), inputs)[:, dims]

    with HookGroup() as hooks:
        for i, block in enumerate(ad.layers(model)):
            hooks.pre(block, lambda m, a, k, i=i: keep("in", i, hidden_arg(a, k)), with_kwargs=True)
            hooks.forward(block, lambda m, a, o, i=i: keep("out", i, block_output(o)))
            attn_site = ad.attn_module(block) if ad.post_attn_norm is None else ad.get(block, ad.post_attn_norm)
            ffn_site = ad.mlp_module(block) if ad.post_ffn_norm is None else ad.get(block, ad.post_ffn_norm)
            hooks.forward(attn_site, lambda m, a, o, i=i: keep("attn", i, block_output(o)))
            hooks.forward(ffn_site, lambda m, a, o, i=i: keep("ffn", i, block_output(o)))
        run_decoder(model, inputs)
    rows, err, changes = [], 0.0, []
    for i in range(len(ad.layers(model))):
        h_in, attn, ffn, out = (seen[k, i] for k in ("in", "attn", "ffn", "out"))
        err = max(err, float((h_in + attn + ffn - out).abs().max()))
        write = (attn + ffn).mean(0)
        carried = h_in.mean(0)
        rows.append(BlockWrite(i, carried.tolist(), attn.mean(0).tolist(), ffn.mean(0).tolist(),
                               out.mean(0).tolist(), float(write.norm() / carried.norm().clamp(min=1e-30))))
        if i > me_layer:
            changes.append((attn + ffn).norm(dim=-1) / h_in.norm(dim=-1).clamp(min=1e-30))  # (B,)
    steady = (torch.stack(changes) < CARRY_CHANGE).float().mean(0).tolist() if changes else []
    return Propagation(me_layer, dims, rows, err, steady)


# -- in the explain report ----------------------------------------------------------------------------------

def run(ctx: Context) -> Propagation:
    return propagation(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, ctx.dims)


def claims(p: Propagation, ctx: Context) -> list:
    statement = "The residual stream carries the massive value unchanged after the ME layer"
    unit = f"share of the blocks after the ME layer that change token 0's massive dims by < {CARRY_CHANGE:.0%}"
    rule = f"holds when that share's 95% CI (over prompts) lies above {CARRY_SHARE:.0%}"
    scope = f"blocks {ctx.me_layer + 1}–{len(p.blocks) - 1}, dims {p.dims}, {len(ctx.inputs)} prompts"
    if not p.steady_share:
        return [not_measured("residual_carries", statement, unit, rule, scope, CARRY_SHARE,
                             "the ME layer is the last block")]
    worst = max(p.after_me(), key=lambda b: b.relative_change)
    test = Check.measure("steady_share", p.steady_share, CARRY_SHARE, ">=", seed=ctx.config.seed)
    return [make_claim("residual_carries", statement, [test], unit, rule, scope,
                       details={"largest_change": worst.relative_change, "at_block": worst.block})]


def section(p: Propagation, ctx: Context) -> list[str]:
    return [f"Token 0, dim {p.dims[0]}: carried residual entering each block and what its attention and FFN "
            f"write (post-sandwich norms included). Decomposition self-check: max |in + attn + ffn − out| = "
            f"{p.max_residual_error:.3g}.", "",
            markdown_table(["block", "carried", "attention write", "FFN write", "out", "relative change"],
                           [(b.block, b.carried[0], b.attn[0], b.ffn[0], b.out[0], b.relative_change)
                            for b in p.blocks[ctx.me_layer:]]),
            "![propagation](propagation.png)", ""]


def figures(p: Propagation, ctx: Context) -> dict:
    fig, a = new_figure(figsize=(9, 3.6))
    xs = [b.block for b in p.blocks]
    a.plot(xs, [b.carried[0] for b in p.blocks], "k-", label="carried (block input)")
    a.bar([x - 0.2 for x in xs], [b.attn[0] for b in p.blocks], 0.4, label="attention write")
    a.bar([x + 0.2 for x in xs], [b.ffn[0] for b in p.blocks], 0.4, label="FFN write")
    a.set_yscale("symlog", linthresh=10)
    a.axvline(ctx.me_layer, color="red", ls="--", lw=1, label=f"ME layer {ctx.me_layer}")
    a.set(xlabel="block", ylabel=f"token 0, dim {p.dims[0]}", title="What each block writes into the massive dim")
    a.legend(fontsize=8)
    return {"propagation": fig}


ANALYSIS = register_analysis(Analysis("propagation", "Propagation after the ME layer", run, claims, section,
                                      figures, needs=("emergence",)))
