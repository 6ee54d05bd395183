"""`melayer explain`: check, on your own model, each step of the paper's explanation of massive activations.

Each step is an analysis in :mod:`.registry` (emergence, RMSNorm, FFN, ablations, propagation, rigidity,
diversity, sinks, WeMask effects): it computes a result, states its claims with a 95% CI over prompts and a
verdict in {holds, does_not_hold, inconclusive}, and writes its report section and plots. :func:`explain` runs
them all; :func:`write` makes the report (``report.json`` with a ``claims`` list, ``report.md``, PNGs).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..adapters import adapter_for
from ..detect import MassiveCriterion
from ..errors import MelayerError
from ..io import atomic_write_json
from ..masking import LAYER_CHOICES
from ..modelutils import device_of, hidden_size, num_layers
from ..prompt_sets import explain_prompts
from ..provenance import model_source
from ..report import console_table, data_frame, markdown_table, progress as progress_bar, write_report
from ..text import read_prompts
# the analyses register themselves on import, in the order they run and appear in the report
from . import emergence, rmsnorm, ffn, ablate, propagate, rigidity, diversity, sinks, wemask_effects  # noqa: F401,I001
from .claims import Claim
from .common import Inputs, prepare_inputs
from .registry import ANALYSES, Analysis, Context, register_analysis

CONFIG_NAME = "explain_config.json"
PRESETS = {"quick": 8, "full": 64}  # texts per preset; each runs plain and chat-templated (16 / 128 prompts)

__all__ = ["ExplainConfig", "ExplainResult", "PRESETS", "explain", "write", "run_and_print", "Analysis", "Context",
           "register_analysis", "ANALYSES", "Claim", "Inputs", "prepare_inputs"]


@dataclass
class ExplainConfig:
    """Everything that decides an explain run (saved as ``explain_config.json`` beside the report)."""

    model: str = "default"
    me_layer: Optional[int] = None  # None: the block the emergence analysis finds
    prompts: Optional[str] = None  # a prompt file (.txt one per line, or .jsonl); None: the preset's built-in set
    preset: str = "quick"  # quick: 8 varied texts, plain and chat (16 prompts); full: 64 (128 prompts)
    max_prompt_tokens: int = 96
    wemask_rates: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05, 0.25, 1.0])
    wemask_layer_sets: list[str] = field(default_factory=lambda: ["after_me", "from_after_me"])
    claim_rate: float = 0.05  # the WeMask claims are decided at this rate …
    claim_layers: str = "after_me"  # … and this layer set (the others are curves)
    ppl_data_dir: Optional[str] = None  # folder with wikitext2/wiki.test.raw; None: no perplexity
    ppl_tokens: int = 2048
    ppl_window: int = 256
    gamma_alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    ffn_cap: float = 2.0  # token 0's FFN output norm capped at this × the others' median
    max_ablate_neurons: int = 32
    criterion: MassiveCriterion = field(default_factory=MassiveCriterion)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.criterion, dict):
            self.criterion = MassiveCriterion(**self.criterion)
        rates = [float(r) for r in self.wemask_rates]
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise MelayerError(f"WeMask rates must be in [0, 1], got {self.wemask_rates}")
        self.wemask_rates = sorted({0.0, *rates})
        if self.preset not in PRESETS:
            raise MelayerError(f"explain preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        bad = [s for s in self.wemask_layer_sets if s not in LAYER_CHOICES or s == "me"]
        if bad or not self.wemask_layer_sets:
            raise MelayerError(f"WeMask layer sets must be after_me and/or from_after_me, got {self.wemask_layer_sets}")
        if self.claim_layers not in self.wemask_layer_sets:
            raise MelayerError(f"the claim layer set {self.claim_layers!r} is not among {self.wemask_layer_sets}")
        if self.claim_rate not in self.wemask_rates or self.claim_rate == 0:
            raise MelayerError(f"the claim rate {self.claim_rate:g} must be one of the WeMask rates > 0 "
                               f"{[r for r in self.wemask_rates if r > 0]}")
        if any(not 0.0 <= a <= 1.0 for a in self.gamma_alphas):
            raise MelayerError(f"γ-flatten alphas must be in [0, 1], got {self.gamma_alphas}")
        if self.me_layer is not None and (isinstance(self.me_layer, bool) or not isinstance(self.me_layer, int)
                                          or self.me_layer < 0):
            raise MelayerError(f"--me-layer must be a non-negative block index, got {self.me_layer!r}")
        for name in ("max_prompt_tokens", "ppl_tokens", "ppl_window", "max_ablate_neurons"):
            if getattr(self, name) < 1:
                raise MelayerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ffn_cap <= 0:
            raise MelayerError(f"--ffn-cap must be positive, got {self.ffn_cap}")


@dataclass
class ExplainResult:
    model: str  # what was asked for
    weights: Optional[str]  # what was loaded, in words
    family: str
    num_layers: int
    hidden_size: int
    dtype: str
    me_layer: int
    me_layer_1based: int
    me_layer_source: str  # "given" or "found"
    dims: list[int]
    prompts: list[dict]  # text, chat, first token id
    config: ExplainConfig
    results: dict[str, Any]  # analysis name -> its result
    claims: list[Claim]
    seconds: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def claim(self, claim_id: str) -> Claim:
        return next(c for c in self.claims if c.id == claim_id)

    def to_pandas(self):
        """One row per claim: estimate, 95 % CI, n, threshold, verdict, scope."""
        return data_frame([{"claim": c.id, "estimate": c.estimate, "ci_low": c.ci[0], "ci_high": c.ci[1], "n": c.n,
                            "threshold": c.threshold, "verdict": c.verdict, "unit": c.unit, "scope": c.scope}
                           for c in self.claims])

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md, the plots and explain_config.json (what ``melayer explain`` writes)."""
        return write(self, out_dir)


def _inputs(tokenizer, config: ExplainConfig) -> Inputs:
    prompts = read_prompts(config.prompts) if config.prompts else explain_prompts(tokenizer, PRESETS[config.preset])
    return prepare_inputs(tokenizer, prompts, config.max_prompt_tokens)


def explain(model, tokenizer, config: Optional[ExplainConfig] = None, progress: bool = True,
            inputs: Optional[Inputs] = None) -> ExplainResult:
    """Run every registered analysis on ``model`` and return their results and claims (no files written).

    ``inputs`` (already encoded) replaces the config's prompts.
    """
    from .ablate import wikitext_windows

    config = config or ExplainConfig()
    ad = adapter_for(model)
    inputs = inputs if inputs is not None else _inputs(tokenizer, config)
    windows = (wikitext_windows(tokenizer, config.ppl_data_dir, config.ppl_tokens, config.ppl_window)
               if config.ppl_data_dir else None)
    ctx = Context(model, tokenizer, config, inputs, me_layer=-1, dims=[], windows=windows, progress=progress)
    seconds: dict[str, float] = {}
    for analysis in progress_bar(list(ANALYSES.values()), desc="explain", disable=not progress):
        start = time.perf_counter()
        ctx.results[analysis.name] = analysis.run(ctx)
        seconds[analysis.name] = round(time.perf_counter() - start, 2)
    claims = [c for a in ANALYSES.values() for c in a.claims(ctx.results[a.name], ctx)]
    first_ids = inputs.input_ids[range(len(inputs)), inputs.first].tolist()
    source = model_source(model)
    result = ExplainResult(
        model=source.spec if source else config.model, weights=source.describe() if source else None,
        family=ad.family, num_layers=num_layers(model),
        hidden_size=hidden_size(model), dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        me_layer=ctx.me_layer, me_layer_1based=ctx.me_layer + 1,
        me_layer_source=ctx.results["emergence"].me_layer_source, dims=ctx.dims,
        prompts=[dict(text=t, first_token_id=i) for t, i in zip(inputs.texts, first_ids)],
        config=config, results=ctx.results, claims=claims, seconds=seconds)
    result._context = ctx  # what the sections and plots read (not part of the saved result)
    return result


def markdown(r: ExplainResult, ctx: Context) -> str:
    em = r.results["emergence"].emergence
    counts = {v: sum(c.verdict == v for c in r.claims) for v in ("holds", "does_not_hold", "inconclusive")}
    lines = [f"# melayer explain: {Path(r.model).name}", "",
             f"Weights: {r.weights or 'a model built in Python'}. Family `{r.family}`, {r.num_layers} blocks, hidden "
             f"size {r.hidden_size}, run in {r.dtype}, statistics in fp32. ME layer: **block {r.me_layer}** (0-based; the paper's numbering: "
             f"{r.me_layer_1based}; {r.me_layer_source}); emergence **{em.kind}**. Massive dims of token 0: "
             f"{r.dims}. {len(r.prompts)} prompts ({len({p['first_token_id'] for p in r.prompts})} distinct first "
             f"tokens). WeMask claims are decided at {r.config.claim_layers}, rate {r.config.claim_rate:g}; every "
             "layer set and rate is in the curves. Config: `explain_config.json`.", "",
             "## Paper claims", "",
             f"{counts['holds']} hold, {counts['does_not_hold']} do not hold, {counts['inconclusive']} inconclusive. "
             "Estimates are means over prompts (windows for perplexity) with percentile-bootstrap 95% CIs; a "
             "verdict needs the whole interval on one side of the pre-stated threshold.", "",
             markdown_table(["claim", "estimate", "95% CI", "n", "threshold", "verdict", "scope"],
                            [(c.id, c.estimate, _ci(c.ci), c.n, c.threshold, f"**{c.verdict}**", c.scope)
                             for c in r.claims]), ""]
    for c in r.claims:
        extra = "; ".join(f"{t.name} {_num(t.estimate)} {_ci(t.ci)} vs {t.threshold:g}: {t.verdict}"
                          for t in c.tests[1:])
        lines.append(f"- **{c.id}**: {c.statement}. Estimate: {c.unit}. Rule: {c.rule}."
                     + (f" Also: {extra}." if extra else "") + (f" Note: {c.note}." if c.note else ""))
    lines.append("")
    for i, analysis in enumerate(ANALYSES.values(), 1):
        lines += [f"## {i}. {analysis.title}", ""] + analysis.section(r.results[analysis.name], ctx)
    lines += ["## Prompts", ""] + [f"{i}. {p['text'][:100]!r}" for i, p in enumerate(r.prompts)] + [""]
    return "\n".join(lines)


def _num(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _ci(ci) -> str:
    return "–" if ci is None or ci[0] is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def write(result: ExplainResult, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json (with its ``claims`` list), report.md, the plots and explain_config.json."""
    ctx = result._context
    figures = {}
    for analysis in ANALYSES.values():
        figures.update(analysis.figures(result.results[analysis.name], ctx))
    text = markdown(result, ctx)
    paths = write_report(out_dir, dataclasses.asdict(result), text, figures)
    atomic_write_json(Path(out_dir) / CONFIG_NAME, result.config)
    return paths


def run_and_print(model, tokenizer, config: ExplainConfig, out_dir: str | Path) -> ExplainResult:
    """Explain ``model``, write the report to ``out_dir`` and print the verdicts."""
    result = explain(model, tokenizer, config)
    paths = write(result, out_dir)
    console_table(f"Paper claims (ME layer: block {result.me_layer}, paper {result.me_layer_1based}; "
                  f"{len(result.prompts)} prompts; device {device_of(model)})",
                  ["claim", "estimate", "95% CI", "n", "threshold", "verdict"],
                  [(c.id, c.estimate, _ci(c.ci), c.n, c.threshold, c.verdict) for c in result.claims])
    print(f"Report: {paths['markdown']} (JSON: {paths['json']})")
    return result
