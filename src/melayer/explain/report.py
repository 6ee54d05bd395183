"""The explain report: one verdict per paper claim (with the number that decides it), tables and plots."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..report import markdown_table, new_figure

if TYPE_CHECKING:
    from . import ExplainResult

# Decision thresholds (stated in the report next to each verdict).
SPIKE_REMOVED = 0.5  # an ablation "removes" the spike when token 0's max |h| at the ME output drops below half
CARRY_CHANGE = 0.05  # a block "carries the value unchanged" when it changes it by less than 5 %
CARRY_SHARE = 0.8  # … and the claim holds when at least 80 % of the blocks after the ME layer do
RIGID_COSINE = 0.95  # token 0 is rigid when its cosine across inputs stays above this after the ME layer
RIGID_MARGIN = 0.1  # … and exceeds the ordinary tokens' cosine by at least this much


@dataclass
class Claim:
    claim: str
    verdict: str  # "holds", "does not hold", "not tested"
    number: str  # the measurement that decides it
    rule: str  # the decision rule


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _verdict(ok: Optional[bool]) -> str:
    return "not tested" if ok is None else ("holds" if ok else "does not hold")


def claims(r: "ExplainResult") -> list[Claim]:
    me = r.me_layer
    out: list[Claim] = []

    # 1. RMSNorm and FFN jointly create the spike.
    ab = r.ablations
    ffn_rows = [x for x in ab.rows if x.group == "ffn" and x.name.startswith("zero_top")]
    norm_rows = [x for x in ab.rows if x.group == "rmsnorm"]
    ffn_left = min((x.spike_left for x in ffn_rows), default=float("nan"))
    norm_best = min(norm_rows, key=lambda x: x.spike_left, default=None)
    block = r.propagation.blocks[me]
    jump = [o - c for o, c in zip(block.out, block.carried)]
    ffn_share = block.ffn[0] / jump[0] if jump[0] else float("nan")
    ok = None if norm_best is None else (ffn_left < SPIKE_REMOVED and norm_best.spike_left < SPIKE_REMOVED)
    out.append(Claim(
        "RMSNorm and FFN jointly create the spike at the ME layer",
        _verdict(ok),
        f"spike left after zeroing the top {len(ab.neurons)} FFN neurons: {ffn_left:.3f}; after the best "
        f"RMSNorm ablation ({norm_best.name if norm_best else '–'}): "
        f"{norm_best.spike_left if norm_best else float('nan'):.3f}; the FFN writes {ffn_share:.1%} of the jump "
        f"on dim {r.dims[0]} at block {me}",
        f"holds when each side alone leaves < {SPIKE_REMOVED:.0%} of token 0's max |h| at the ME output",
    ))

    # 2. The residual stream carries it unchanged.
    after = r.propagation.after_me()
    if after:
        steady = sum(b.relative_change < CARRY_CHANGE for b in after) / len(after)
        worst = max(after, key=lambda b: b.relative_change)
        out.append(Claim(
            "The residual stream carries the massive value unchanged after the ME layer",
            _verdict(steady >= CARRY_SHARE),
            f"{steady:.0%} of the {len(after)} blocks after the ME layer change token 0's massive dims by "
            f"< {CARRY_CHANGE:.0%}; largest change {worst.relative_change:.1%} at block {worst.block}",
            f"holds when at least {CARRY_SHARE:.0%} of those blocks change it by < {CARRY_CHANGE:.0%}",
        ))
    else:
        out.append(Claim("The residual stream carries the massive value unchanged after the ME layer",
                         "not tested", "the ME layer is the last block", ""))

    # 3. Token 0 becomes rigid.
    res = r.rigidity.residual
    post0 = _mean(res.token0_across[me + 1:])
    pre0 = _mean(res.token0_across[:me + 1])
    post_rest = _mean(res.other_across[me + 1:])
    ok = None if math.isnan(post0) else (post0 >= RIGID_COSINE and post0 - post_rest >= RIGID_MARGIN)
    out.append(Claim(
        "Token 0's representation becomes rigid after the ME layer",
        _verdict(ok),
        f"residual cosine between token 0 of different inputs: {post0:.4f} after the ME layer "
        f"(blocks ≤ {me}: {pre0:.4f}); ordinary tokens after it: {post_rest:.4f}",
        f"holds when token 0's cross-input cosine after the ME layer is ≥ {RIGID_COSINE} and exceeds the "
        f"ordinary tokens' by ≥ {RIGID_MARGIN}",
    ))

    # 4. Sinks appear right after the ME layer.
    s = r.sinks
    base = s.curve(0.0).mass_mean
    ok = s.onset_layer is not None and me < s.onset_layer <= me + 2
    out.append(Claim(
        "Attention sinks appear right after the ME layer",
        _verdict(ok),
        f"first layer with mean sink mass ≥ {s.threshold}: {s.onset_layer} (ME layer {me}); largest rise at "
        f"layer {s.jump_layer}; mean mass on token 0 in layers < {me + 1}: {_mean(base[:me + 1]):.3f}, "
        f"after: {_mean(base[me + 1:]):.3f}",
        f"holds when the first layer whose mean mass on token 0 reaches {s.threshold} is ME+1 or ME+2",
    ))

    # 5-6. WeMask: diversity and sinks, decided at the largest rate.
    rates = [c.rate for c in r.diversity.curves if c.rate > 0]
    if rates:
        top = max(rates)
        d0, d1 = _mean(r.diversity.curve(0.0).effective_rank[me + 1:]), _mean(r.diversity.curve(top).effective_rank[me + 1:])
        at0, at1 = r.diversity.curve(0.0).effective_rank[me + 1], r.diversity.curve(top).effective_rank[me + 1]
        out.append(Claim(
            "WeMask increases the diversity of attention inputs",
            _verdict(d1 > d0),
            f"mean effective rank of attention inputs after the ME layer: {d0:.3f} without, {d1:.3f} with "
            f"WeMask {top:g} (masked layer {me + 1}: {at0:.3f} → {at1:.3f})",
            "holds when the mean effective rank after the ME layer is higher with WeMask (largest rate)",
        ))
        s0, s1 = _mean(s.curve(0.0).mass_mean[me + 1:]), _mean(s.curve(top).mass_mean[me + 1:])
        m0, m1 = s.curve(0.0).mass_mean[me + 1], s.curve(top).mass_mean[me + 1]
        out.append(Claim(
            "WeMask reduces attention sinks",
            _verdict(s1 < s0),
            f"mean sink mass after the ME layer: {s0:.3f} without, {s1:.3f} with WeMask {top:g} "
            f"(masked layer {me + 1}: {m0:.3f} → {m1:.3f})",
            "holds when the mean mass on token 0 over the layers after the ME layer is lower with WeMask "
            "(largest rate)",
        ))
    else:
        for text in ("WeMask increases the diversity of attention inputs", "WeMask reduces attention sinks"):
            out.append(Claim(text, "not tested", "no WeMask rate > 0 was given", ""))
    return out


# -- markdown -----------------------------------------------------------------------------------------

def markdown(r: "ExplainResult", verdicts: list[Claim]) -> str:
    me, dims = r.me_layer, r.dims
    lines = [f"# melayer explain: {Path(r.model).name}", "",
             f"Family `{r.family}`, {r.num_layers} blocks, hidden size {r.hidden_size}. ME layer: **block {me}** "
             f"(0-based, {r.me_layer_source}). Massive dims of token 0: {dims}. "
             f"{len(r.prompts)} prompts, fp32 statistics. Config: `explain_config.json`.", "",
             "## Paper claims", "",
             markdown_table(["claim", "verdict", "deciding number", "rule"],
                            [(c.claim, f"**{c.verdict}**", c.number, c.rule) for c in verdicts])]

    n = r.rmsnorm
    lines += ["## 1. RMSNorm at the ME layer (pre-FFN norm)", ""]
    if not n.applicable:
        lines += [n.note, ""]
    else:
        lines += [f"Scale 1/rms(h): token 0 {n.scale_token0:.4g}, other tokens (median) {n.scale_others:.4g}, "
                  f"ratio {n.scale_ratio:.3f} (rms {n.rms_token0:.4g} vs {n.rms_others:.4g}). "
                  f"‖γ⊙x̂‖ (the FFN input): token 0 {n.ffn_input_norm_token0:.4g}, others {n.ffn_input_norm_others:.4g}. "
                  f"Median |γ| = {n.gamma_abs_median:.4g}.", "",
                  markdown_table(["dim", "γ", "|γ| percentile", "h tok0", "|h| others", "x̂ tok0", "|x̂| others",
                                  "γ⊙x̂ tok0", "|γ⊙x̂| others"],
                                 zip(n.dims, n.gamma_dims, n.gamma_percentile, n.h_token0, n.h_others,
                                     n.xhat_token0, n.xhat_others, n.gxhat_token0, n.gxhat_others)),
                  "![RMSNorm](rmsnorm.png)", ""]

    f = r.ffn
    lines += ["## 2. FFN neurons at the ME layer", "",
              f"contribution_j = act_j × W_down[dim, j], act = σ(gate)·up; token 0, mean over prompts "
              f"({f.intermediate_size} neurons).", "",
              markdown_table(["dim", "FFN out tok0", "Σ contributions", "|FFN out| others", "top neurons",
                              "neurons for 50/90/99 %"],
                             [(d.dim, d.ffn_output, d.attributed, d.others_abs, ", ".join(map(str, d.top_neurons[:5])),
                               "/".join(str(d.neurons_for_share[k]) for k in ("0.5", "0.9", "0.99")))
                              for d in f.dims]),
              f"Ablated neurons (90 % of each dim): {f.ablate_neurons}", "", "![FFN](ffn.png)", ""]

    ab = r.ablations
    ppl_note = (f"WikiText-2 perplexity on {ab.ppl_windows} windows of {ab.ppl_window_tokens} tokens"
                if ab.ppl_windows else "perplexity not measured (no --ppl-data-dir)")
    lines += ["## 3. Ablations at the ME layer", "",
              f"Token 0's max |h| at the ME output (block {me}) and the last block, mean over the {ab.measured_on}; "
              f"{ppl_note}. {ab.alpha_convention}. FFN cap c = {ab.cap:g}. Sun et al.'s mean values: "
              f"{[round(v, 2) for v in ab.sun_mean_values]}.", "",
              markdown_table(["setting", "group", "max |h| tok0 @ME", "spike left", "max |h| tok0 @last",
                              f"dim {dims[0]} @ME", f"dim {dims[0]} @last", "PPL"],
                             [(x.name, x.group, x.token0_max_me, x.spike_left, x.token0_max_last,
                               x.token0_dims_me[0], x.token0_dims_last[0], x.ppl) for x in ab.rows]),
              "![ablations](ablations.png)", ""]

    p = r.propagation
    lines += ["## 4. Propagation after the ME layer", "",
              f"Token 0, dim {dims[0]}: carried residual entering each block and what its attention and FFN "
              f"write (post-sandwich norms included). Decomposition self-check: max |in + attn + ffn − out| = "
              f"{p.max_residual_error:.3g}.", "",
              markdown_table(["block", "carried", "attention write", "FFN write", "out", "relative change"],
                             [(b.block, b.carried[0], b.attn[0], b.ffn[0], b.out[0], b.relative_change)
                              for b in p.blocks[me:]]),
              "![propagation](propagation.png)", ""]

    g = r.rigidity
    lines += ["## 5. Rigidity", "",
              "Cosine similarity of token 0 across layers (heatmaps) and between token 0 of different prompts "
              "at each layer (curves); ordinary tokens for reference.", "",
              markdown_table(["stream", "tok0 across inputs ≤ME", "tok0 across inputs >ME",
                              "ordinary ≤ME", "ordinary >ME"],
                             [(name, _mean(s.token0_across[:me + 1]), _mean(s.token0_across[me + 1:]),
                               _mean(s.other_across[:me + 1]), _mean(s.other_across[me + 1:]))
                              for name, s in (("residual", g.residual), ("attention input", g.attention_input))]),
              "![rigidity heatmaps](rigidity_heatmaps.png)", "", "![rigidity across inputs](rigidity_inputs.png)", ""]

    d = r.diversity
    lines += ["## 6. Diversity of attention inputs (effective rank)", "",
              markdown_table(["WeMask rate", "masked dims", f"layer {me + 1}", "mean ≤ME", "mean >ME"],
                             [(c.rate, c.masked_dims, c.effective_rank[min(me + 1, r.num_layers - 1)],
                               _mean(c.effective_rank[:me + 1]), _mean(c.effective_rank[me + 1:]))
                              for c in d.curves]),
              "![effective rank](diversity.png)", ""]

    s = r.sinks
    lines += ["## 7. Attention sinks", "",
              f"Mass on token 0, mean over heads (and prompts). Onset (first layer ≥ {s.threshold}): "
              f"mean over queries {s.onset_layer}, last query {s.onset_layer_last}; largest rise at layer "
              f"{s.jump_layer}; ME layer {me}.", "",
              markdown_table(["WeMask rate", f"layer {me + 1} (mean q)", "mean >ME (mean q)",
                              f"layer {me + 1} (last q)", "mean >ME (last q)"],
                             [(c.rate, c.mass_mean[min(me + 1, r.num_layers - 1)], _mean(c.mass_mean[me + 1:]),
                               c.mass_last[min(me + 1, r.num_layers - 1)], _mean(c.mass_last[me + 1:]))
                              for c in s.curves]),
              "![sink heatmaps](sinks_heatmap.png)", "", "![sink curves](sinks_curves.png)", ""]
    lines += ["## Prompts", ""] + [f"{i}. {t[:100]!r}" for i, t in enumerate(r.prompts)] + [""]
    return "\n".join(lines)


# -- figures ------------------------------------------------------------------------------------------

def _me_line(ax, me: int, label: bool = True) -> None:
    ax.axvline(me, color="red", ls="--", lw=1, label=f"ME layer {me}" if label else None)


def figures(r: "ExplainResult") -> dict:
    me, dims = r.me_layer, r.dims
    figs = {}

    n = r.rmsnorm
    if n.applicable:
        fig, (a, b) = new_figure(1, 2, figsize=(10, 3.6))
        pos = list(range(len(n.scale_by_position)))
        a.bar(pos, n.scale_by_position, color=["C3"] + ["C0"] * (len(pos) - 1))
        a.set(xlabel="position (0 = token 0)", ylabel="1 / rms(h)", title=f"RMS scale at block {me}'s pre-FFN norm")
        b.hist(n.gamma, bins=60, color="C0")
        for dd, gv in zip(n.dims, n.gamma_dims):
            b.axvline(gv, color="C3", lw=1.5, label=f"dim {dd}: γ={gv:.3g}")
        b.set(xlabel="γ (effective gain)", ylabel="dims", title="γ of the pre-FFN norm")
        b.legend(fontsize=8)
        figs["rmsnorm"] = fig

    d = r.ffn.dims[0]
    fig, a = new_figure(figsize=(8, 3.6))
    k = min(20, len(d.top_neurons))
    a.bar(range(k), d.top_contributions[:k], color="C0")
    a.set_xticks(range(k), [str(j) for j in d.top_neurons[:k]], rotation=70, fontsize=7)
    a.set(xlabel="FFN neuron", ylabel=f"contribution to dim {d.dim}", title=f"Block {me}: neuron attribution (token 0)")
    t = a.twinx()
    t.plot(range(k), d.cumulative_share[:k], "o-", color="C3", ms=3)
    t.set_ylabel("cumulative share", color="C3")
    figs["ffn"] = fig

    ab = r.ablations
    fig, (a, b) = new_figure(1, 2, figsize=(11, 0.35 * len(ab.rows) + 1.5), sharey=True)
    names = [x.name for x in ab.rows][::-1]
    y = range(len(names))
    a.barh([v - 0.2 for v in y], [x.token0_max_me for x in ab.rows][::-1], 0.4, label=f"ME output (block {me})")
    a.barh([v + 0.2 for v in y], [x.token0_max_last for x in ab.rows][::-1], 0.4, label="last block")
    a.set_xscale("log")
    a.set_yticks(list(y), names, fontsize=8)
    a.set(xlabel="token 0 max |h|")
    a.legend(fontsize=8)
    if ab.ppl_windows:
        b.barh(list(y), [x.ppl for x in ab.rows][::-1], color="C2")
        b.set_xscale("log")
        b.set(xlabel="WikiText-2 perplexity")
    figs["ablations"] = fig

    p = r.propagation
    fig, a = new_figure(figsize=(9, 3.6))
    xs = [b.block for b in p.blocks]
    a.plot(xs, [b.carried[0] for b in p.blocks], "k-", label="carried (block input)")
    a.bar([x - 0.2 for x in xs], [b.attn[0] for b in p.blocks], 0.4, label="attention write")
    a.bar([x + 0.2 for x in xs], [b.ffn[0] for b in p.blocks], 0.4, label="FFN write")
    a.set_yscale("symlog", linthresh=10)
    _me_line(a, me)
    a.set(xlabel="block", ylabel=f"token 0, dim {dims[0]}", title="What each block writes into the massive dim")
    a.legend(fontsize=8)
    figs["propagation"] = fig

    g = r.rigidity
    fig, axes = new_figure(2, 2, figsize=(9, 8))
    for ax, (title, m) in zip(axes.flat, (("residual, token 0", g.residual.token0_layers),
                                          ("residual, ordinary tokens", g.residual.other_layers),
                                          ("attention input, token 0", g.attention_input.token0_layers),
                                          ("attention input, ordinary tokens", g.attention_input.other_layers))):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r", origin="lower")
        ax.axvline(me, color="k", ls=":", lw=0.8)
        ax.axhline(me, color="k", ls=":", lw=0.8)
        ax.set(title=title, xlabel="layer", ylabel="layer")
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine")
    figs["rigidity_heatmaps"] = fig

    fig, a = new_figure(figsize=(8, 3.6))
    layers = range(r.num_layers)
    a.plot(layers, g.residual.token0_across, "C3-", label="token 0, residual")
    a.plot(layers, g.attention_input.token0_across, "C3--", label="token 0, attention input")
    a.plot(layers, g.residual.other_across, "C0-", label="ordinary, residual")
    a.plot(layers, g.attention_input.other_across, "C0--", label="ordinary, attention input")
    _me_line(a, me)
    a.set(xlabel="layer", ylabel="mean cosine across prompts", title="Similarity between different prompts")
    a.legend(fontsize=8)
    figs["rigidity_inputs"] = fig

    fig, a = new_figure(figsize=(8, 3.6))
    for c in r.diversity.curves:
        a.plot(layers, c.effective_rank, marker=".", label=f"WeMask {c.rate:g} (k={c.masked_dims})")
    _me_line(a, me)
    a.set(xlabel="layer", ylabel="effective rank", title="Diversity of attention inputs")
    a.legend(fontsize=8)
    figs["diversity"] = fig

    s = r.sinks
    fig, (a, b) = new_figure(1, 2, figsize=(10, 4))
    for ax, m, title in ((a, s.heads_mean, "mean over queries"), (b, s.heads_last, "last query")):
        im = ax.imshow(list(map(list, zip(*m))), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.axvline(me, color="red", ls="--", lw=1)
        ax.set(title=f"mass on token 0: {title}", xlabel="layer", ylabel="head")
    fig.colorbar(im, ax=(a, b), shrink=0.8)
    figs["sinks_heatmap"] = fig

    fig, (a, b) = new_figure(1, 2, figsize=(11, 3.6), sharey=True)
    for c in s.curves:
        a.plot(layers, c.mass_mean, marker=".", label=f"WeMask {c.rate:g}")
        b.plot(layers, c.mass_last, marker=".", label=f"WeMask {c.rate:g}")
    for ax, title in ((a, "mean over queries"), (b, "last query")):
        _me_line(ax, me)
        ax.set(xlabel="layer", title=f"sink mass ({title})")
    a.set_ylabel("attention mass on token 0")
    a.legend(fontsize=8)
    figs["sinks_curves"] = fig
    return figs
