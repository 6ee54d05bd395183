"""What WeMask changes, for every layer set and rate (claims ``wemask_weakens_sinks``, ``diversity``,
``wemask_keeps_perplexity``).

One eager forward per condition reads, per prompt: the late-query sink mass over the layers from the first
masked block on, and at that block the attention input's effective rank, token 0's key norm and its cosine with
other first tokens, and the sink log-odds (log p(token 0) − mean log p(other keys), late queries); WikiText-2
windows give the perplexity. Each claim is decided at one pre-stated condition (``claim_layers``, ``claim_rate``)
and the report says when the other layer set disagrees; every condition is plotted as a curve over the rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup, block_output
from ..masking import WeMaskConfig, wemask
from ..modelutils import hidden_arg, hidden_size, num_layers
from ..report import markdown_table, new_figure, progress as progress_bar
from ..stats import bootstrap_ci
from .claims import Check, make_claim, not_measured, verdict
from .common import Inputs, effective_rank, run_decoder
from .registry import Analysis, Context, register_analysis
from .rigidity import distinct_pair_cosines
from .sinks import eager_attention, late_queries, sink_mass

SINK_DROP = 0.05  # WeMask "weakens sinks" when the late-query mass on token 0 drops by at least 5 points
ERANK_GAIN = 0.01  # WeMask "increases diversity" when the rank where it acts rises by at least 1 %
PPL_MARGIN = 0.02  # WeMask "keeps perplexity" when WikiText-2 perplexity rises by less than 2 %


@dataclass
class Condition:
    layers: str  # layer set: after_me, from_after_me
    rate: float
    k: int  # masked dims
    target: int  # first masked block
    sink: list[float]  # per prompt: late-query sink mass, mean over layers target … L-1 and heads
    erank: list[float]  # per prompt: effective rank of the attention input at the target block
    key_norm: list[float]  # per prompt: ‖k‖ of token 0 at the target block (empty: the family fuses q/k/v)
    cross_cosine: list[float]  # per prompt: cosine of token 0's attention input with other first tokens
    sink_log_odds: list[float]  # per prompt, at the target block
    window_nll: list[float] = field(default_factory=list)  # per WikiText-2 window: summed NLL


@dataclass
class WeMaskEffects:
    me_layer: int
    window_tokens: list[int]  # predicted tokens per window
    conditions: list[Condition]

    def get(self, layers: str, rate: float) -> Condition:
        return next(c for c in self.conditions if c.layers == layers and c.rate == rate)


@torch.no_grad()
def measure_condition(model, inputs: Inputs, target: int, windows: Optional[torch.Tensor]) -> dict:
    """Everything one condition needs, from one eager forward over the prompts (and one over the windows)."""
    ad = adapter_for(model)
    layers = ad.layers(model)
    block = layers[target]
    late = late_queries(inputs)
    rows = torch.arange(len(inputs))
    seen: dict[str, torch.Tensor] = {}
    sinks: dict[int, torch.Tensor] = {}

    def attn_out(i):
        def fn(module, args, output):
            probs = output[1].detach().float()
            sinks[i] = sink_mass(probs, inputs)[0].mean(-1).cpu()  # (B,)
            if i == target:
                seen["log_odds"] = _log_odds(probs.cpu(), inputs, late)
        return fn

    with eager_attention(model), HookGroup() as hooks:
        for i in range(target, len(layers)):
            hooks.forward(ad.attn_module(layers[i]), attn_out(i))
        hooks.pre(ad.attn_module(block), lambda m, a, k: seen.__setitem__("x", hidden_arg(a, k).detach().float().cpu()),
                  with_kwargs=True)
        key = ad.get(ad.attn_module(block), ad.key) if ad.key else None
        if key is not None:
            hooks.forward(key, lambda m, a, o: seen.__setitem__("k", block_output(o).detach().float().cpu()))
        run_decoder(model, inputs)
    x = seen["x"]
    valid = inputs.valid
    t0 = x[rows, inputs.first]
    ids = inputs.input_ids[rows, inputs.first]
    out = dict(sink=torch.stack([sinks[i] for i in range(target, len(layers))]).mean(0).tolist(),
               erank=[effective_rank(x[b][valid[b]]) for b in range(len(inputs))],
               key_norm=seen["k"][rows, inputs.first].norm(dim=-1).tolist() if "k" in seen else [],
               cross_cosine=distinct_pair_cosines(t0[None], ids)[0].tolist(),
               sink_log_odds=seen["log_odds"].tolist())
    out["window_nll"] = window_nlls(model, windows) if windows is not None else []
    return out


def _log_odds(probs: torch.Tensor, inputs: Inputs, late: torch.Tensor) -> torch.Tensor:
    """(B,) mean over heads and late queries of log p(token 0) − the mean log p of the query's other keys."""
    B, H, T, _ = probs.shape
    logp = probs.clamp(min=1e-30).log()
    b = torch.arange(B)
    first = inputs.first
    keys = inputs.other_sel[:, None, :] & (torch.arange(T)[None, :, None] >= torch.arange(T)[None, None, :])
    others = (logp * keys[:, None]).sum(-1) / keys.sum(-1).clamp(min=1)[:, None]  # (B, H, T)
    odds = logp[b, :, :, first] - others  # (B, H, T)
    return (odds * late[:, None]).sum(-1).div(late.sum(-1, keepdim=True).clamp(min=1)).mean(-1)


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch: int = 4) -> list[float]:
    """Summed next-token NLL of each WikiText-2 window (fp32)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        out += nll.sum(-1).tolist()
    return out


def wemask_effects(model, tokenizer, me_layer: int, inputs: Inputs, layer_sets, rates,
                   windows: Optional[torch.Tensor] = None, progress: bool = False) -> WeMaskEffects:
    """Every (layer set, rate) condition; rate 0 (no mask) is measured once per first masked block."""
    n = num_layers(model)
    conditions, unmasked = [], {}
    grid = [(s, r) for s in layer_sets for r in sorted({0.0, *rates})]
    for layers, rate in progress_bar(grid, desc="wemask", disable=not progress):
        config = WeMaskConfig(rate=rate, layers=layers, me_layer=me_layer)
        target = config.resolve_layers(n, me_layer)[0]
        if rate == 0 and target in unmasked:
            values = unmasked[target]
        else:
            with wemask(model, config, tokenizer=tokenizer):
                values = measure_condition(model, inputs, target, windows)
            if rate == 0:
                unmasked[target] = values
        conditions.append(Condition(layers, rate, config.k(hidden_size(model)), target, **values))
    tokens = [windows.shape[1] - 1] * windows.shape[0] if windows is not None else []
    return WeMaskEffects(me_layer, tokens, conditions)


# -- per-condition estimates ----------------------------------------------------------------------------------

def sink_drop(w: WeMaskEffects, c: Condition, seed: int = 0) -> Check:
    base = w.get(c.layers, 0.0)
    return Check.measure("sink_drop", [b - m for b, m in zip(base.sink, c.sink)], SINK_DROP, ">=", seed=seed)


def erank_gain(w: WeMaskEffects, c: Condition, threshold: float, seed: int = 0) -> Check:
    base = w.get(c.layers, 0.0)
    return Check.measure("erank_gain", [m / b - 1 for b, m in zip(base.erank, c.erank) if b > 0], threshold, ">=",
                        seed=seed)


def ppl_increase(w: WeMaskEffects, c: Condition, seed: int = 0) -> Check:
    """Relative perplexity increase, exp(Δ NLL per token) − 1, with the window bootstrap's CI."""
    base = w.get(c.layers, 0.0)
    if not c.window_nll:
        return Check("ppl_increase", None, [None, None], 0, PPL_MARGIN, "<=", "inconclusive")
    diff = [m - b for b, m in zip(base.window_nll, c.window_nll)]
    per_token = sum(diff) / sum(w.window_tokens)
    lo, hi = bootstrap_ci(diff, w.window_tokens, seed=seed)
    ci = [math.expm1(lo), math.expm1(hi)]
    return Check("ppl_increase", math.expm1(per_token), ci, len(diff), PPL_MARGIN, "<=",
                verdict(ci[0], ci[1], PPL_MARGIN, "<="))


def curve(w: WeMaskEffects, fn) -> list[dict]:
    return [dict(layers=c.layers, rate=c.rate, k=c.k, estimate=t.estimate, ci=t.ci, verdict=t.verdict)
            for c in w.conditions if c.rate > 0 for t in [fn(c)]]


def decided(w: WeMaskEffects, ctx: Context, fn, claim_id: str, statement: str, unit: str, rule: str) -> list:
    """The claim at the pre-stated condition, with the other layer set's verdict and the curves as details."""
    cfg = ctx.config
    sets = [s for s in cfg.wemask_layer_sets if any(c.layers == s and c.rate == cfg.claim_rate
                                                    for c in w.conditions)]
    if cfg.claim_layers not in sets:
        return [not_measured(claim_id, statement, unit, rule, f"{cfg.claim_layers}, rate {cfg.claim_rate:g}",
                             0.0, "the deciding condition was not measured")]
    main = w.get(cfg.claim_layers, cfg.claim_rate)
    test = fn(main)
    others = {s: fn(w.get(s, cfg.claim_rate)).verdict for s in sets if s != cfg.claim_layers}
    disagree = [s for s, v in others.items() if v != test.verdict]
    note = (f"the {', '.join(disagree)} layer set disagrees ({', '.join(others[s] for s in disagree)})"
            if disagree else "")
    scope = (f"{cfg.claim_layers} (blocks from {main.target}), rate {cfg.claim_rate:g} (k = {main.k}), "
             f"{test.n} {'windows' if test.name == 'ppl_increase' else 'prompts'}")
    return [make_claim(claim_id, statement, [test], unit, rule, scope,
                       details={"other_layer_sets": others, "curve": curve(w, fn)}, note=note)]


# -- in the explain report ----------------------------------------------------------------------------------

def run(ctx: Context) -> WeMaskEffects:
    c = ctx.config
    return wemask_effects(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, c.wemask_layer_sets, c.wemask_rates,
                          ctx.windows, ctx.progress)


def claims(w: WeMaskEffects, ctx: Context) -> list:
    seed = ctx.config.seed
    out = decided(w, ctx, lambda c: sink_drop(w, c, seed), "wemask_weakens_sinks", "WeMask weakens attention sinks",
                  "per prompt: late-query attention mass on token 0, mean over the masked block and those after "
                  "it, without minus with WeMask", f"holds when the drop's 95% CI lies above {SINK_DROP:g}")
    out += decided(w, ctx, lambda c: erank_gain(w, c, ERANK_GAIN, seed), "diversity",
                   "WeMask increases the diversity of the attention inputs where it acts",
                   "per prompt: effective rank of the first masked block's attention input with WeMask ÷ without − 1",
                   f"holds when the relative gain's 95% CI lies above {ERANK_GAIN:.0%}")
    if w.window_tokens:
        out += decided(w, ctx, lambda c: ppl_increase(w, c, seed), "wemask_keeps_perplexity",
                       "WeMask keeps language-modelling quality (WikiText-2 perplexity)",
                       "relative perplexity increase with WeMask, exp(Δ NLL per token) − 1 (bootstrap over windows)",
                       f"holds when the increase's 95% CI lies below {PPL_MARGIN:.0%}; does not hold when it lies "
                       "above")
    else:
        out.append(not_measured("wemask_keeps_perplexity", "WeMask keeps language-modelling quality (WikiText-2 "
                                "perplexity)", "relative perplexity increase", f"below {PPL_MARGIN:.0%}",
                                "–", PPL_MARGIN, "no WikiText-2 windows (pass --ppl-data-dir)"))
    return out


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else None


def section(w: WeMaskEffects, ctx: Context) -> list[str]:
    rows = []
    for c in w.conditions:
        ppl = ppl_increase(w, c).estimate if c.rate > 0 else None
        rows.append((c.layers, c.rate, c.k, c.target, _mean(c.sink), _mean(c.erank), _mean(c.key_norm),
                     _mean(c.cross_cosine), _mean(c.sink_log_odds), ppl))
    return ["Correct-mode WeMask at every layer set and rate (rate 0 = no mask; its target block is where the set "
            "would start). Means over prompts; perplexity change over WikiText-2 windows.", "",
            markdown_table(["layers", "rate", "k", "first masked block", "sink mass (from it)", "eff. rank there",
                            "‖k‖ tok0 there", "tok0 cos across prompts there", "sink log-odds there",
                            "PPL change"], rows),
            "![WeMask curves](wemask_curves.png)", ""]


def figures(w: WeMaskEffects, ctx: Context) -> dict:
    seed = ctx.config.seed
    panels = [("sink mass drop", lambda c: sink_drop(w, c, seed)),
              ("eff. rank change (relative)", lambda c: erank_gain(w, c, 0.0, seed))]
    if w.window_tokens:
        panels.append(("perplexity change (relative)", lambda c: ppl_increase(w, c, seed)))
    fig, axes = new_figure(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    rates = sorted({c.rate for c in w.conditions if c.rate > 0})
    for ax, (title, fn) in zip(axes[0], panels):
        for layers in dict.fromkeys(c.layers for c in w.conditions):
            pts = [(c.rate, fn(c)) for c in w.conditions if c.layers == layers and c.rate > 0]
            pts = [(r, t) for r, t in pts if t.estimate is not None]
            if not pts:
                continue
            x = [rates.index(r) for r, _ in pts]
            y = [t.estimate for _, t in pts]
            err = [[max(0.0, t.estimate - t.ci[0]) for _, t in pts], [max(0.0, t.ci[1] - t.estimate) for _, t in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=layers)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set(xlabel="WeMask rate", title=title)
        ax.legend(fontsize=7)
    return {"wemask_curves": fig}


ANALYSIS = register_analysis(Analysis("wemask", "What WeMask changes (both layer sets, every rate)", run, claims,
                                      section, figures, needs=("emergence",)))
