"""Rigidity: after the ME layer, do different first tokens end up with the same representation? (claim ``rigidity``)

Token 0 attends only to itself, so its state depends on its token id alone: prompts that start with the same
token (every chat-templated one) are identical by construction and prove nothing. The claim therefore compares
only prompts whose first tokens differ: the cosine between their token-0 states, after the ME layer against the
blocks before it, on the residual stream; the same with the massive dims removed is the control (is the
similarity more than the massive dims?). Cosines of token 0 with itself across layers (heatmap) and between the
ordinary tokens of different prompts are shown for reference.
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
from .common import InputsLike, as_inputs, run_decoder
from .registry import Analysis, Context, register_analysis

RIGID_GAIN = 0.1  # token 0 becomes rigid when its cross-prompt cosine rises by at least this after the ME layer


@dataclass
class StreamRigidity:
    token0_layers: list[list[float]]  # (L, L) mean over prompts of cos(token 0 at layer l, token 0 at layer m)
    token0_across: list[float]  # (L,) mean cos between token 0 of prompts with different first tokens
    token0_across_rest: list[float]  # (L,) the same with the massive dims removed (the control)
    other_across: list[float]  # (L,) mean cos between ordinary tokens of different prompts
    gain: list[float] = field(default_factory=list)  # per prompt: mean cos after the ME layer − before it
    gain_rest: list[float] = field(default_factory=list)  # the same without the massive dims


@dataclass
class Rigidity:
    me_layer: int
    dims: list[int]
    distinct_first_tokens: int
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
    return _pairs_from_sums(sums.double(), sizes)


def _pairs_from_sums(sums: torch.Tensor, sizes: torch.Tensor) -> float:
    """Mean cosine over pairs from different groups, from each group's sum of unit vectors and its size."""
    pairs = float(sizes.sum() ** 2 - (sizes ** 2).sum())
    if pairs == 0:
        return float("nan")
    total = sums.sum(0)
    return float((total @ total - (sums * sums).sum()) / pairs)


def distinct_pair_cosines(t0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(L, B, D) token-0 states -> (L, B): each prompt's mean cosine with the prompts whose first token differs
    (NaN where every other prompt starts with the same token)."""
    u = torch.nn.functional.normalize(t0.float(), dim=-1)
    cos = torch.einsum("lbd,lcd->lbc", u, u)
    other = (ids[:, None] != ids[None, :]).float()
    count = other.sum(1)
    return (cos * other).sum(-1) / count.where(count > 0, torch.full_like(count, float("nan")))


def _stream(t0: torch.Tensor, other_sums: torch.Tensor, other_counts: torch.Tensor, ids: torch.Tensor,
            me_layer: int, dims: Sequence[int]) -> StreamRigidity:
    keep = torch.ones(t0.shape[-1], dtype=torch.bool)
    keep[list(dims)] = False
    across = distinct_pair_cosines(t0, ids)  # (L, B)
    across_rest = distinct_pair_cosines(t0[..., keep], ids)

    def gain(c: torch.Tensor) -> list[float]:
        if me_layer == 0 or me_layer + 1 >= c.shape[0]:
            return []
        return (c[me_layer + 1:].mean(0) - c[:me_layer].mean(0)).tolist()

    return StreamRigidity(
        token0_layers=layer_cosine(t0).tolist(), token0_across=across.nanmean(1).tolist(),
        token0_across_rest=across_rest.nanmean(1).tolist(),
        other_across=[_pairs_from_sums(other_sums[l], other_counts) for l in range(t0.shape[0])],
        gain=gain(across), gain_rest=gain(across_rest))


@torch.no_grad()
def rigidity(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int] = ()) -> Rigidity:
    """Cosines of token 0 across layers and across prompts (distinct first tokens), with and without ``dims``."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    ad = adapter_for(model)
    layers = ad.layers(model)
    rows = torch.arange(len(inputs))
    kept: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    ordinary = inputs.other_sel

    def keep(kind: str, i: int, h: torch.Tensor) -> None:
        h = h.detach().float().cpu()
        u = torch.nn.functional.normalize(h, dim=-1) * ordinary[..., None]
        kept[kind, i] = (h[rows, inputs.first], u.sum(1).double())  # token 0 (B, D); per-prompt sums (B, D)

    with HookGroup() as hooks:
        for i, block in enumerate(layers):
            hooks.forward(block, lambda m, a, o, i=i: keep("residual", i, block_output(o)))
            hooks.pre(ad.attn_module(block), lambda m, a, k, i=i: keep("attention", i, hidden_arg(a, k)),
                      with_kwargs=True)
        run_decoder(model, inputs)
    ids = inputs.input_ids[rows, inputs.first]
    counts = ordinary.sum(1).double()
    streams = []
    for kind in ("residual", "attention"):
        t0 = torch.stack([kept[kind, i][0] for i in range(len(layers))])
        sums = torch.stack([kept[kind, i][1] for i in range(len(layers))])
        streams.append(_stream(t0, sums, counts, ids, me_layer, dims))
    return Rigidity(me_layer, list(dims), int(ids.unique().numel()), *streams)


# -- in the explain report ----------------------------------------------------------------------------------

def run(ctx: Context) -> Rigidity:
    return rigidity(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, ctx.dims)


def claims(g: Rigidity, ctx: Context) -> list:
    statement = "Token 0 becomes rigid after the ME layer: different first tokens converge to one representation"
    unit = ("per prompt: mean residual cosine with the prompts whose first token differs, blocks after the ME "
            "layer minus blocks before it")
    rule = f"holds when the gain's 95% CI lies above {RIGID_GAIN:g}"
    scope = (f"blocks < {ctx.me_layer} vs > {ctx.me_layer}, {len(ctx.inputs)} prompts with "
             f"{g.distinct_first_tokens} distinct first tokens")
    if g.distinct_first_tokens < 2:
        return [not_measured("rigidity", statement, unit, rule, scope, RIGID_GAIN,
                             "every prompt starts with the same token, whose state cannot depend on the input: "
                             "add prompts without the chat template")]
    if not g.residual.gain:
        return [not_measured("rigidity", statement, unit, rule, scope, RIGID_GAIN,
                             "no block before or after the ME layer to compare")]
    seed = ctx.config.seed
    test = Check.measure("cosine_gain", g.residual.gain, RIGID_GAIN, ">=", seed=seed)
    control = Check.measure("cosine_gain_without_massive_dims", g.residual.gain_rest, RIGID_GAIN, ">=", seed=seed)
    note = ("" if control.verdict == test.verdict else
            f"without the massive dims {g.dims} the gain is {control.estimate:.3g} ({control.verdict}): the "
            "similarity is carried by the massive dims")
    return [make_claim("rigidity", statement, [test], unit, rule, scope,
                       details={"control_without_massive_dims": control.__dict__}, note=note)]


def section(g: Rigidity, ctx: Context) -> list[str]:
    me = ctx.me_layer

    def m(xs, a, b):
        xs = [x for x in xs[a:b] if x == x]
        return sum(xs) / len(xs) if xs else float("nan")

    rows = []
    for name, s in (("residual", g.residual), ("attention input", g.attention_input)):
        rows.append((name, m(s.token0_across, 0, me), m(s.token0_across, me + 1, None),
                     m(s.token0_across_rest, 0, me), m(s.token0_across_rest, me + 1, None),
                     m(s.other_across, 0, me), m(s.other_across, me + 1, None)))
    return [f"Cosine between token 0 of prompts with different first tokens ({g.distinct_first_tokens} distinct), "
            f"before (< {me}) and after (> {me}) the ME layer; without the massive dims {g.dims}; ordinary tokens "
            "for reference.", "",
            markdown_table(["stream", "tok0 <ME", "tok0 >ME", "tok0 w/o massive <ME", "tok0 w/o massive >ME",
                            "ordinary <ME", "ordinary >ME"], rows),
            "![rigidity heatmaps](rigidity_heatmaps.png)", "", "![rigidity across inputs](rigidity_inputs.png)", ""]


def figures(g: Rigidity, ctx: Context) -> dict:
    me = ctx.me_layer
    fig, axes = new_figure(1, 2, figsize=(9, 4))
    for ax, (title, m) in zip(axes.flat, (("residual, token 0", g.residual.token0_layers),
                                          ("attention input, token 0", g.attention_input.token0_layers))):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r", origin="lower")
        ax.axvline(me, color="k", ls=":", lw=0.8)
        ax.axhline(me, color="k", ls=":", lw=0.8)
        ax.set(title=title, xlabel="layer", ylabel="layer")
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine")
    figs = {"rigidity_heatmaps": fig}
    fig, a = new_figure(figsize=(8, 3.6))
    layers = range(len(g.residual.token0_across))
    a.plot(layers, g.residual.token0_across, "C3-", label="token 0, residual")
    a.plot(layers, g.residual.token0_across_rest, "C3:", label="token 0, residual, without massive dims")
    a.plot(layers, g.attention_input.token0_across, "C3--", label="token 0, attention input")
    a.plot(layers, g.residual.other_across, "C0-", label="ordinary, residual")
    a.axvline(me, color="red", ls="--", lw=1, label=f"ME layer {me}")
    a.set(xlabel="layer", ylabel="mean cosine across prompts", title="Similarity between different prompts")
    a.legend(fontsize=8)
    figs["rigidity_inputs"] = fig
    return figs


ANALYSIS = register_analysis(Analysis("rigidity", "Rigidity of token 0", run, claims, section, figures,
                                      needs=("emergence",)))
