"""Emergence: which block writes the massive value, on these prompts (claim ``single_layer``).

The residual stream is captured as ``melayer scan`` does (:mod:`melayer.detect`): the dominant persistent
event's per-block increments, as shares of its peak, per prompt. This analysis also fixes the ME layer and the
massive dims every later analysis follows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..capture import ResidualCapture
from ..detect import Emergence, Profile, emergence, prompt_events, shares_of_peak
from ..errors import MelayerError
from ..modelutils import check_layer
from ..report import markdown_table, new_figure
from .claims import Check, make_claim, not_measured
from .common import massive_dims
from .registry import Analysis, Context, register_analysis


@dataclass
class EmergenceResult:
    emergence: Emergence
    me_layer_source: str  # "given" or "found"
    me_share: list[float] = field(default_factory=list)  # per prompt: share of the peak written by the ME block
    other_share: list[float] = field(default_factory=list)  # per prompt: the largest share of any other block
    large_token0: list[list[bool]] = field(default_factory=list)  # per prompt and block: token 0 holds a spike
    median: list[float] = field(default_factory=list)  # per block: mean median |h| (reference for the plots)


def measure_emergence(model, inputs, criterion) -> tuple[Emergence, list[Profile]]:
    """The emergence of ``inputs`` (a left-padded batch) and each prompt's profile."""
    with ResidualCapture(model, criterion.abs_threshold, criterion.ratio) as cap:
        layers = cap.run(inputs.input_ids, inputs.attention_mask)
        profiles = [Profile.from_stats(cap.embedding, layers, b) for b in range(len(inputs))]
    events = [prompt_events(p, criterion) for p in profiles]
    return emergence(profiles, criterion, events), profiles


def run(ctx: Context) -> EmergenceResult:
    criterion = ctx.config.criterion
    em, profiles = measure_emergence(ctx.model, ctx.inputs, criterion)
    if ctx.config.me_layer is not None:
        ctx.me_layer, source = check_layer(ctx.model, ctx.config.me_layer), "given"
    elif em.me_layer is not None:
        ctx.me_layer, source = em.me_layer, "found"
    else:
        raise MelayerError(f"no ME layer on these prompts ({em.note or em.kind}): pass --me-layer")
    ctx.dims = massive_dims(ctx.model, ctx.inputs, ctx.me_layer)
    me = ctx.me_layer
    result = EmergenceResult(em, source)
    for p in profiles:
        top = p.values["first"][1:].abs().max(-1).values
        spike = torch.clamp(p.median[1:] * criterion.spike_ratio, min=criterion.abs_threshold)
        result.large_token0.append((top > spike).tolist())
        if em.dim is not None:
            shares = shares_of_peak(torch.nan_to_num(p.values[em.carrier][:, em.dim], nan=0.0))[0]
            if shares:
                result.me_share.append(shares.get(me, 0.0))
                result.other_share.append(max([s for b, s in shares.items() if b != me], default=0.0))
    result.median = torch.stack([p.median[1:] for p in profiles]).mean(0).tolist()
    return result


def claims(r: EmergenceResult, ctx: Context) -> list:
    c = ctx.config.criterion
    statement = "A single layer (the ME layer) creates the massive activation"
    unit = "share of the dominant event's peak value written by the ME block (per prompt)"
    rule = (f"holds when the ME block writes ≥ {c.single_share:.0%} of the peak and no other block ≥ "
            f"{c.step_share:.0%} (both 95% CIs clear of their thresholds)")
    scope = f"block {ctx.me_layer} (paper: {ctx.me_layer + 1}), {len(ctx.inputs)} prompts"
    if not r.me_share:
        return [not_measured("single_layer", statement, unit, rule, scope, c.single_share,
                             f"no massive activation persists on these prompts ({r.emergence.kind})")]
    seed = ctx.config.seed
    tests = [Check.measure("me_block_share", r.me_share, c.single_share, ">=", seed=seed),
             Check.measure("largest_other_share", r.other_share, c.step_share, "<=", seed=seed)]
    em = r.emergence
    return [make_claim("single_layer", statement, tests, unit, rule, scope,
                       details={"kind": em.kind, "major_blocks": em.major_blocks,
                                "shares": {str(b): s for b, s in em.shares.items()}},
                       note=em.note)]


def section(r: EmergenceResult, ctx: Context) -> list[str]:
    em = r.emergence
    me = f"ME layer {ctx.me_layer} (paper: {ctx.me_layer + 1}, {r.me_layer_source})"
    if em.kind == "none":
        return [f"No massive activation persists on these prompts; {me}.", ""]
    rows = [(b, b + 1, s) for b, s in sorted(em.shares.items())]
    carrier = {"first": "the first token", "delimiter": "the first delimiter", "other": "another token"}[em.carrier]
    return [f"Emergence **{em.kind}**: {em.note}. Dominant event: dim {em.dim} on {carrier}, persistent in "
            f"{em.prompts_with_event} of {len(em.per_prompt_me)} prompts; {me}. Share of the peak |h| = "
            f"{em.peak:.4g} (after block {em.peak_block}) written by each block (mean trajectory; |share| ≥ 1%):",
            "", markdown_table(["block", "paper", "share"], rows), "![emergence](emergence.png)", ""]


def figures(r: EmergenceResult, ctx: Context) -> dict:
    em = r.emergence
    if not em.trajectory:
        return {}
    fig, (a, b) = new_figure(1, 2, figsize=(11, 3.6))
    blocks = list(range(len(em.trajectory) - 1))
    a.semilogy(blocks, [abs(v) + 1e-6 for v in em.trajectory[1:]], "o-", ms=3, label=f"dim {em.dim} ({em.carrier})")
    a.semilogy(blocks, r.median, ":", label="median |h|")
    a.axvline(ctx.me_layer, color="red", ls="--", lw=1, label=f"ME layer {ctx.me_layer}")
    a.set(xlabel="block (0-based)", ylabel="|h|", title="The dominant massive value")
    a.legend(fontsize=8)
    shares = [em.shares.get(i, 0.0) for i in blocks]
    b.bar(blocks, shares, color=["C3" if i == ctx.me_layer else "C0" for i in blocks])
    b.set(xlabel="block (0-based)", ylabel="share of the peak written", title="Who writes it")
    return {"emergence": fig}


ANALYSIS = register_analysis(Analysis("emergence", "Emergence: which block writes the massive value", run,
                                      claims, section, figures))

