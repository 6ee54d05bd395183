"""Attention sinks: how much attention lands on token 0, per layer and head (claim ``sinks_after_me``).

Probabilities need eager attention, so the model is switched to it only for these forward passes and switched
back afterwards. Sink mass is read from *late* queries (the second half of each prompt), where attending to token
0 is a choice rather than a lack of keys. The claim has two tests: co-occurrence (layers whose previous block's
output holds a large value on token 0 sink more than the others) and a causal one (zeroing token 0's massive
dims at the ME block's output lowers the sinks of the layers after it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..adapters import adapter_for, base_model
from ..hooks import HookGroup
from ..modelutils import check_layer
from ..report import markdown_table, new_figure
from .ablate import set_massive
from .claims import Check, make_claim
from .common import Inputs, InputsLike, as_inputs, run_decoder
from .registry import Analysis, Context, register_analysis

CO_OCCURRENCE = 0.1  # layers after a large token-0 value sink at least this much more attention mass
CAUSAL_DROP = 0.05  # zeroing the massive value lowers the later layers' sink mass by at least this


@dataclass
class Sinks:
    me_layer: int
    heads_late: list[list[float]]  # (L, H) mass on token 0: mean over prompts and late queries
    heads_last: list[list[float]]  # (L, H) the last query only
    layer_late: list[float]  # (L,) mean over heads and prompts
    layer_late_zeroed: list[float]  # (L,) with token 0's massive dims zeroed at the ME block's output
    co_occurrence: list[float] = field(default_factory=list)  # per prompt: sink after large − after not large
    causal_drop: list[float] = field(default_factory=list)  # per prompt: mean drop over the layers after ME


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


def late_queries(inputs: Inputs) -> torch.Tensor:
    """(B, T) bool: the real query positions in the second half of each prompt (token 0 excluded)."""
    pos = torch.arange(inputs.input_ids.shape[1])[None, :] - inputs.first[:, None]
    length = inputs.attention_mask.sum(1, keepdim=True)
    return inputs.other_sel & (2 * pos >= length)


def sink_mass(probs: torch.Tensor, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, H, T, T) -> (B, H) mass on each row's first real token: mean over late queries, and the last
    query's."""
    probs = probs.float()
    b = torch.arange(len(inputs))
    on_first = probs[b, :, :, inputs.first]  # (B, H, T): every query's mass on its row's token 0
    late = late_queries(inputs).to(on_first.device)
    mean = (on_first * late[:, None, :]).sum(-1) / late.sum(-1, keepdim=True).clamp(min=1)
    return mean, on_first[:, :, -1]


@torch.no_grad()
def attention_sinks(model, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, H) mass on token 0 per layer, prompt and head: late queries, and the last query."""
    ad = adapter_for(model)
    layers = ad.layers(model)
    late: dict[int, torch.Tensor] = {}
    last: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, output):
            late[i], last[i] = (x.cpu() for x in sink_mass(output[1].detach(), inputs))
        return fn

    with eager_attention(model), HookGroup() as hooks:
        for i, block in enumerate(layers):
            hooks.forward(ad.attn_module(block), hook(i))
        run_decoder(model, inputs)
    n = len(layers)
    return torch.stack([late[i] for i in range(n)]), torch.stack([last[i] for i in range(n)])


def sinks(model, tokenizer, me_layer: int, inputs: InputsLike, dims=(), large_token0=None) -> Sinks:
    """Sink heatmaps, and the two tests: co-occurrence with ``large_token0`` ((B, L) bool: block l's output holds
    a large token-0 value) and the drop when ``dims`` of token 0 are zeroed at the ME block's output."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    late, last = attention_sinks(model, inputs)
    per_prompt = late.mean(-1)  # (L, B)
    result = Sinks(me_layer, late.mean(1).tolist(), last.mean(1).tolist(), per_prompt.mean(1).tolist(), [])
    if dims:
        with set_massive(model, me_layer, list(dims), [0.0] * len(dims)):
            zeroed = attention_sinks(model, inputs)[0].mean(-1)
        result.layer_late_zeroed = zeroed.mean(1).tolist()
        result.causal_drop = (per_prompt[me_layer + 1:] - zeroed[me_layer + 1:]).mean(0).tolist()
    if large_token0 is not None:
        prev = torch.as_tensor(large_token0, dtype=torch.bool)[:, :-1].T  # (L-1, B): before layers 1 … L-1
        mass = per_prompt[1:]
        for b in range(mass.shape[1]):
            on, off = mass[prev[:, b], b], mass[~prev[:, b], b]
            result.co_occurrence.append(float(on.mean() - off.mean()) if len(on) and len(off) else float("nan"))
    return result


# -- in the explain report ----------------------------------------------------------------------------------

def run(ctx: Context) -> Sinks:
    return sinks(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, ctx.dims,
                 ctx.results["emergence"].large_token0)


def claims(s: Sinks, ctx: Context) -> list:
    seed = ctx.config.seed
    tests = [Check.measure("co_occurrence", s.co_occurrence, CO_OCCURRENCE, ">=", seed=seed),
             Check.measure("causal_drop", s.causal_drop, CAUSAL_DROP, ">=", seed=seed)]
    return [make_claim(
        "sinks_after_me", "Attention sinks follow the massive value (they appear after the ME layer)", tests,
        "late-query attention mass on token 0, mean over heads: layers whose previous block holds a large token-0 "
        "value minus the others (per prompt)",
        f"holds when both CIs clear their thresholds: co-occurrence ≥ {CO_OCCURRENCE:g}, and the drop over the "
        f"layers after the ME layer when token 0's massive dims are zeroed at its output ≥ {CAUSAL_DROP:g}",
        f"layers 1–{len(s.layer_late) - 1}; zeroing at block {ctx.me_layer}; {len(ctx.inputs)} prompts")]


def section(s: Sinks, ctx: Context) -> list[str]:
    me = ctx.me_layer
    rows = [(l, s.layer_late[l], s.layer_late_zeroed[l] if s.layer_late_zeroed else None)
            for l in range(len(s.layer_late))]
    return [f"Attention mass on token 0, mean over heads, late queries and prompts, per layer; and with token 0's "
            f"massive dims zeroed at the ME block's output (block {me}).", "",
            markdown_table(["layer", "sink mass", "massive dims zeroed"], rows),
            "![sink heatmaps](sinks_heatmap.png)", "", "![sink curves](sinks_curves.png)", ""]


def figures(s: Sinks, ctx: Context) -> dict:
    me = ctx.me_layer
    fig, (a, b) = new_figure(1, 2, figsize=(10, 4))
    for ax, m, title in ((a, s.heads_late, "late queries"), (b, s.heads_last, "last query")):
        im = ax.imshow(list(map(list, zip(*m))), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.axvline(me, color="red", ls="--", lw=1)
        ax.set(title=f"mass on token 0: {title}", xlabel="layer", ylabel="head")
    fig.colorbar(im, ax=(a, b), shrink=0.8)
    figs = {"sinks_heatmap": fig}
    fig, a = new_figure(figsize=(8, 3.6))
    layers = range(len(s.layer_late))
    a.plot(layers, s.layer_late, "o-", ms=3, label="model")
    if s.layer_late_zeroed:
        a.plot(layers, s.layer_late_zeroed, "s--", ms=3, label=f"token 0's massive dims zeroed after block {me}")
    large = ctx.results["emergence"].large_token0
    share = torch.as_tensor(large, dtype=torch.float).mean(0).tolist()
    a.bar([l + 1 for l in range(len(share) - 1)], share[:-1], alpha=0.25, color="C3",
          label="share of prompts: previous block holds a large token-0 value")
    a.axvline(me, color="red", ls="--", lw=1, label=f"ME layer {me}")
    a.set(xlabel="layer", ylabel="attention mass on token 0", title="Sinks follow the massive value", ylim=(0, 1))
    a.legend(fontsize=7)
    figs["sinks_curves"] = fig
    return figs


ANALYSIS = register_analysis(Analysis("sinks", "Attention sinks", run, claims, section, figures,
                                      needs=("emergence",)))
