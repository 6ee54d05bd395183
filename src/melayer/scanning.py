"""`melayer scan`: find the massive activations of a model and its ME layer, with the paper's plots."""
from __future__ import annotations

import warnings
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import fused_reduction
from .adapters import adapter_for, base_model, model_type
from .capture import REDUCTIONS, LayerStats, ResidualCapture
from .detect import Emergence, MassiveCriterion, Profile, emergence, prompt_events
from .errors import MelayerError
from .report import console_table, data_frame, markdown_table, new_figure, progress as progress_bar, write_report
from .prompt_sets import default_prompts
from .provenance import model_source
from .text import Prompt, encode, first_delimiter, left_pad, pad_id


@dataclass
class ScanConfig:
    criterion: MassiveCriterion = field(default_factory=MassiveCriterion)
    batch_size: int = 8
    top_dims: int = 8  # how many dims of token 0 / delimiter / rest to report per layer
    reduction: str = "auto"  # how the capture computes its statistics (capture.REDUCTIONS); the values are the same

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise MelayerError(f"scan batch size must be a positive integer, got {self.batch_size!r}")
        if self.reduction not in REDUCTIONS:
            raise MelayerError(f"scan reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.reduction == "fused" and not fused_reduction.available():
            raise MelayerError(f'scan reduction "fused" {fused_reduction.NEEDS_TRITON}')


@dataclass
class ScanReport:
    model: str  # what was asked for ("default", a hub id, a folder, a .gguf file)
    weights: Optional[str]  # what was loaded, in words (hub original, 4-bit GGUF dequantised, ...)
    family: str
    num_layers: int
    hidden_size: int
    me_layer: Optional[int]  # 0-based; None when nothing persists or the emergence is gradual
    me_layer_1based: Optional[int]  # the paper's numbering
    me_agreement: float  # share of prompts whose own ME layer equals `me_layer`
    emergence: Emergence
    criterion: MassiveCriterion
    layers: list[dict]  # per block, averaged over prompts
    prompts: list[dict]  # per prompt: text, chat, bos, tokens, first token, me_layer, events
    token0_abs: list[list[float]]  # (layers, dims) mean |h| of token 0: the paper's 3-D plot
    warnings: list[str] = field(default_factory=list)
    index_convention: str = ("0-based decoder block index (the paper counts from 1); block i's output is "
                             "output_hidden_states[i + 1]")

    def to_json(self) -> dict:
        return asdict(self)

    def to_pandas(self):
        """One row per block: max/median |h|, token-0 and other tokens' maxima, massive counts, top dims."""
        return data_frame(self.layers)

    def save(self, out_dir: str | Path, config: Optional["ScanConfig"] = None) -> dict:
        """Write report.json, report.md and the plots to ``out_dir`` (what ``melayer scan --out`` writes)."""
        return write_scan_report(self, out_dir, config or ScanConfig(criterion=self.criterion))

    @property
    def events(self) -> list[dict]:
        return [dict(e, prompt=p["index"]) for p in self.prompts for e in p["events"]]


def scan(model, tokenizer, prompts: Optional[Sequence[Prompt | str]] = None,
         config: Optional[ScanConfig] = None, progress: bool = True) -> ScanReport:
    """Run the prompts through the model with capture hooks: massive activations, how they emerge, the ME layer.

    The model's ME layer is remembered (for this criterion), so a later ``wemask(model, rate)`` needs no rescan.
    Non-finite values and a massive value carried by another token than the first one are warned about.
    """
    config = config or ScanConfig()
    adapter = adapter_for(model)
    prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in (prompts or default_prompts(tokenizer))]
    if not prompts:
        raise MelayerError("no prompts to scan")
    encoded = [encode(tokenizer, p) for p in prompts]
    limit = getattr(base_model(model).config, "max_position_embeddings", None)
    for p, ids in zip(prompts, encoded):
        if not ids:
            raise MelayerError(f"prompt encodes to no tokens: {p.text!r}")
        if limit and len(ids) > limit:
            raise MelayerError(f"prompt of {len(ids)} tokens is longer than the model's context ({limit}): "
                               f"{p.text[:40]!r}…")
    pad = pad_id(tokenizer)
    c = config.criterion
    per_prompt: list[list[LayerStats]] = []
    profiles: list[Profile] = []
    delims: list[int] = []
    with ResidualCapture(model, c.abs_threshold, c.ratio, reduction=config.reduction) as cap:
        starts = range(0, len(prompts), config.batch_size)
        for s in progress_bar(starts, desc="scan", total=len(starts), disable=not progress):
            chunk = encoded[s:s + config.batch_size]
            ids, mask = left_pad(chunk, pad)
            width = ids.shape[1]
            d = [first_delimiter(tokenizer, c) for c in chunk]
            delims += d
            delim_abs = torch.tensor([width - len(c) + i if i >= 0 else -1 for c, i in zip(chunk, d)])
            layers = cap.run(ids, mask, delim_abs)
            for b in range(len(chunk)):
                per_prompt.append([st.row(b) for st in layers])
                profiles.append(Profile.from_stats(cap.embedding, layers, b, d[b]))
    report = _build_report(model, tokenizer, prompts, encoded, delims, per_prompt, profiles, config, adapter.family)
    for message in report.warnings:
        warnings.warn(message, stacklevel=2)
    if report.me_layer is not None:
        _ME_LAYERS.setdefault(base_model(model), {})[config.criterion] = report.me_layer
    return report


def _token_text(tokenizer, ids: Sequence[int], pos: int) -> Optional[str]:
    return tokenizer.decode([ids[pos]]) if 0 <= pos < len(ids) else None


def _build_report(model, tokenizer, prompts, encoded, delims, per_prompt, profiles, config, family) -> ScanReport:
    criterion = config.criterion
    num_layers = len(per_prompt[0])
    events = [prompt_events(p, criterion) for p in profiles]
    em = emergence(profiles, criterion, events)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if em.carrier is not None:
        carried = Counter(_token_text(tokenizer, ids, e.pos) for ids, evs in zip(encoded, events) for e in evs
                          if e.persistent and (e.carrier, e.dim) == (em.carrier, em.dim))
        em.token = {"carrier": em.carrier, "texts": dict(carried.most_common(8))}
    prompt_rows = []
    for i, (p, ids, evs) in enumerate(zip(prompts, encoded, events)):
        rows = []
        for e in evs[:20]:
            row = asdict(e)
            row["token"] = _token_text(tokenizer, ids, e.pos)
            rows.append(row)
        prompt_rows.append(dict(index=i, text=p.text, chat=p.chat, bos=p.bos, tokens=len(ids),
                                first_token=tokenizer.decode([ids[0]]), first_token_id=int(ids[0]),
                                first_token_special=int(ids[0]) in special, delimiter_pos=delims[i],
                                me_layer=em.per_prompt_me[i] if em.per_prompt_me else None,
                                nonfinite_block=profiles[i].first_nonfinite_block(), events=rows))

    def mean(attr: str, i: int, absolute: bool = False) -> torch.Tensor:
        rows = torch.stack([getattr(layers[i], attr)[0] for layers in per_prompt]).float()
        return (rows.abs() if absolute else rows).mean(0)

    k = config.top_dims
    layer_rows = []
    token0 = []
    for i in range(num_layers):
        first_abs, rest_abs, delim_abs = mean("first", i, True), mean("rest_max_abs", i), mean("delim", i, True)
        token0.append(first_abs)
        maxes = [float(layers[i].max_abs[0]) for layers in per_prompt]
        counts = [int(layers[i].massive_count[0]) for layers in per_prompt]
        layer_rows.append(dict(
            block=i,
            block_1based=i + 1,
            max_abs=max(maxes),
            max_abs_mean=sum(maxes) / len(maxes),
            median_abs=float(mean("median_abs", i)),
            ratio=max(float(layers[i].max_abs[0] / layers[i].median_abs[0].clamp(min=1e-12)) for layers in per_prompt),
            token0_max_abs=float(first_abs.max()),
            delimiter_max_abs=float(delim_abs.max()),
            rest_max_abs=float(rest_abs.max()),
            token0_norm=float(mean("first_norm", i)),
            rest_norm=float(mean("rest_norm", i)),
            massive_entries_mean=sum(counts) / len(counts),
            massive_entries_max=max(counts),
            massive_tokens_max=max(int(layers[i].massive_tokens[0]) for layers in per_prompt),
            nonfinite=sum(int(layers[i].nonfinite[0]) for layers in per_prompt),
            token0_top=_top(first_abs, k),
            delimiter_top=_top(delim_abs, k),
            rest_top=_top(rest_abs, k),
            massive_prompts=sum(any(e["start"] <= i <= e["end"] and e["kind"] == "massive" for e in p["events"])
                                for p in prompt_rows),
        ))
    config_obj = base_model(model).config
    source = model_source(model)
    return ScanReport(
        model=source.spec if source else str(getattr(config_obj, "_name_or_path", "")),
        weights=source.describe() if source else None, family=family, num_layers=num_layers, hidden_size=int(config_obj.hidden_size), me_layer=em.me_layer,
        me_layer_1based=em.me_layer_1based, me_agreement=em.agreement, emergence=em, criterion=criterion,
        layers=layer_rows, prompts=prompt_rows, token0_abs=[t.tolist() for t in token0],
        warnings=_warnings(em, prompt_rows),
    )


def _warnings(em: Emergence, prompt_rows: list[dict]) -> list[str]:
    out = []
    bad = [p["nonfinite_block"] for p in prompt_rows if p["nonfinite_block"] is not None]
    if bad:
        first = min(bad)
        where = "the embeddings" if first < 0 else f"block {first} (paper: {first + 1})"
        out.append(f"non-finite values (NaN/inf) first appear in {where} in {len(bad)} of {len(prompt_rows)} prompts: "
                   "the weights or the dtype overflow; statistics from there on are meaningless")
    if em.carrier not in (None, "first"):
        carrier = "the first delimiter token" if em.carrier == "delimiter" else "a token other than the first"
        out.append(f"the dominant massive value (dim {em.dim}) sits on {carrier}, not the first token: "
                   "explain and WeMask act on the first token")
    return out


def _top(values: torch.Tensor, k: int) -> list[list[float]]:
    v, d = values.topk(min(k, values.numel()))
    return [[int(i), float(x)] for x, i in zip(v, d)]


# model -> {criterion: ME layer}: what scans found, without attributes on the model (weak: the model can go)
_ME_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def find_me_layer(model, tokenizer=None, criterion: Optional[MassiveCriterion] = None, refresh: bool = False) -> int:
    """The model's ME layer: remembered from an earlier :func:`scan` or ``find_me_layer`` of this model (same
    criterion), else found by a scan of the built-in prompts.

    Without a tokenizer, deterministic random token sequences are used (massive activations do not
    depend on the text). ``refresh`` ignores what was remembered.
    """
    base = base_model(model)
    config = ScanConfig(criterion=criterion or MassiveCriterion())
    cached = _ME_LAYERS.get(base, {}).get(config.criterion)
    if cached is not None and not refresh:
        return cached
    c = config.criterion
    if tokenizer is not None:
        em = scan(model, tokenizer, config=config, progress=False).emergence
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, base.config.vocab_size, (4, 48), generator=gen)
        with ResidualCapture(model, c.abs_threshold, c.ratio, reduction=config.reduction) as cap:
            layers = cap.run(ids, torch.ones_like(ids))
            em = emergence([Profile.from_stats(cap.embedding, layers, b) for b in range(4)], c)
        for message in _warnings(em, []):
            warnings.warn(message, stacklevel=2)
    if em.me_layer is None:
        why = em.note or "no persistent massive activation"
        raise MelayerError(f"no ME layer in this {model_type(model)} model ({why}): pass the ME layer explicitly")
    _ME_LAYERS.setdefault(base, {})[c] = em.me_layer
    return em.me_layer


# -- report ------------------------------------------------------------------------------------

def describe_me_layer(me: Optional[int]) -> str:
    """'block 11 (paper: 12)': melayer counts blocks from 0, the paper from 1."""
    return "none" if me is None else f"block {me} (paper: {me + 1})"


def _markdown(report: ScanReport) -> str:
    c = report.criterion
    em = report.emergence
    n = len(report.prompts)
    if report.me_layer is not None:
        headline = (f"- **ME layer: {describe_me_layer(report.me_layer)}**, 0-based; emergence **{em.kind}**; "
                    f"{report.me_agreement:.0%} of {n} prompts agree")
    elif em.kind == "gradual":
        headline = f"- **no single ME layer: gradual emergence** ({em.note})"
    else:
        headline = "- **no ME layer**: no massive activation persists in this model"
    lines = [f"# melayer scan: {report.model}", "",
             f"- weights: {report.weights or 'a model built in Python'}; family `{report.family}`, "
             f"{report.num_layers} decoder blocks, hidden size {report.hidden_size}",
             headline]
    if em.kind != "none":
        carrier = {"first": "the first token", "delimiter": "the first delimiter token",
                   "other": "a token other than the first"}[em.carrier]
        shares = ", ".join(f"{b} (paper {b + 1}): {v:+.0%}" for b, v in sorted(em.shares.items()))
        lines += [f"- dominant event: dim {em.dim} on {carrier}, in {em.prompts_with_event} of {n} prompts; first "
                  f"massive after block {em.first_massive_block}; peak |h| {em.peak:.4g} after block "
                  f"{em.peak_block}; {em.note}.",
                  f"- share of the peak written by each block (0-based, |share| ≥ 1%): {shares}"]
    lines += [f"- criterion: |a| > {c.abs_threshold:g} and > {c.ratio:g} × the median |h| of the block output "
              f"(Sun et al. 2024), followed on the first token, the first delimiter and every dim's largest other "
              f"token; an event *persists* when it holds (still massive, or ≥ {c.keep_fraction:.0%} of its own "
              f"running peak) in ≥ {c.persist_fraction:.0%} of the blocks from its birth to the last block; "
              f"*spikes* (> {c.spike_ratio:g} × median) that do not persist are transient. Emergence: single = one "
              f"block writes ≥ {c.single_share:.0%} of the peak and no other ≥ {c.step_share:.0%}; multi_step = "
              f"several blocks write ≥ {c.step_share:.0%}; gradual = none does.",
              f"- indices: {report.index_convention}; `output_hidden_states` has {report.num_layers + 1} entries "
              "and its last one is after the final norm, so it is never used as a block output.",
              f"- prompts: {sum(not p['chat'] for p in report.prompts)} plain, "
              f"{sum(p['chat'] for p in report.prompts)} chat-templated, {sum(p['bos'] for p in report.prompts)} "
              f"with an explicit BOS token; {len({p['first_token_id'] for p in report.prompts})} distinct first "
              "tokens.", ""]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    me = report.me_layer
    if me is not None:
        first = report.prompts[0]
        persistent = [e for e in first["events"] if e["persistent"]]
        transient = [e for e in first["events"] if not e["persistent"] and e["carrier"] == "first"]
        lines.append("## Why this block")
        if persistent:
            e = persistent[0]
            lines.append(f"In prompt 0, token {e['pos']} ({e['token']!r}) dim {e['dim']} becomes massive after block "
                         f"{e['start']} (peak {e['peak']:.0f} after block {e['peak_block']}) and holds in "
                         f"{e['fraction']:.0%} of the blocks after it (until block {e['end']}).")
        for e in transient[:3]:
            lines.append(f"- Earlier transient {e['kind']} on token 0 dim {e['dim']}: blocks {e['start']}–{e['end']}, "
                         f"peak {e['peak']:.0f} after block {e['peak_block']}; it fades, so block {e['start']} is not "
                         "the ME layer.")
        lines.append("")
    lines += ["## Per block (mean over prompts; max over prompts for `max |h|` and the counts)", "",
              markdown_table(["block", "paper", "max |h|", "median |h|", "max/median", "token-0 max", "delim max",
                              "rest max", "massive entries", "massive tokens", "token-0 top dims"],
                             [[r["block"] if r["block"] != me else f"**{me} (ME)**", r["block_1based"], r["max_abs"],
                               r["median_abs"], r["ratio"], r["token0_max_abs"], r["delimiter_max_abs"],
                               r["rest_max_abs"], r["massive_entries_max"], r["massive_tokens_max"],
                               ", ".join(f"{d}:{v:.0f}" for d, v in r["token0_top"][:3])] for r in report.layers]),
              "## Massive events per prompt", "",
              markdown_table(["prompt", "chat", "BOS", "tokens", "ME", "carrier", "token", "dim", "blocks", "peak",
                              "kind"],
                             [[p["index"], p["chat"], p["bos"], p["tokens"], p["me_layer"], e["carrier"],
                               repr(e["token"]), e["dim"], f"{e['start']}–{e['end']}", e["peak"],
                               "persistent" if e["persistent"] else f"transient {e['kind']}"]
                              for p in report.prompts for e in p["events"][:3]]),
              "## Plots", "", "![token-0 |h| per dim and block](token0_3d.png)", "",
              "![max |h| per block](max_per_layer.png)", "", "![massive dims](massive_dims_heatmap.png)", ""]
    return "\n".join(lines)


def _figures(report: ScanReport) -> dict:
    import numpy as np

    figs = {}
    t0 = np.array(report.token0_abs)  # (layers, dims)
    layers = np.arange(report.num_layers)
    dims = np.arange(t0.shape[1])
    fig = new_figure(figsize=(9, 6))[0]
    fig.clf()
    ax = fig.add_subplot(projection="3d")
    X, Y = np.meshgrid(dims, layers)
    ax.plot_wireframe(X, Y, t0, rstride=1, cstride=max(1, len(dims) // 200), linewidth=0.4)
    ax.set_xlabel("hidden dim")
    ax.set_ylabel("block (0-based)")
    ax.set_zlabel("|h| of token 0")
    ax.set_title(f"{report.model}: token 0, block outputs")
    figs["token0_3d"] = fig

    fig, ax = new_figure(figsize=(8, 4))
    ax.semilogy(layers, [r["token0_max_abs"] for r in report.layers], "o-", label="token 0 (max over dims)")
    ax.semilogy(layers, [r["delimiter_max_abs"] for r in report.layers], "^-", label="first delimiter (max)")
    ax.semilogy(layers, [r["rest_max_abs"] for r in report.layers], "s-", label="other tokens (max)")
    ax.semilogy(layers, [r["median_abs"] for r in report.layers], ":", label="median |h|")
    if report.me_layer is not None:
        ax.axvline(report.me_layer, color="red", linestyle="--",
                   label=f"ME layer ({describe_me_layer(report.me_layer)})")
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("|h|")
    ax.legend()
    ax.set_title("Largest activation per block")
    figs["max_per_layer"] = fig

    top = sorted({d for r in report.layers for d, _ in r["token0_top"][:3]})
    fig, ax = new_figure(figsize=(8, 0.4 * len(top) + 2))
    im = ax.imshow(np.log10(t0[:, top].T + 1e-3), aspect="auto", cmap="magma")
    ax.set_yticks(range(len(top)), [str(d) for d in top])
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("dim")
    ax.set_title("token-0 log10 |h| on its largest dims")
    fig.colorbar(im, ax=ax)
    figs["massive_dims_heatmap"] = fig
    return figs


def write_scan_report(report: ScanReport, out_dir: str | Path, config: ScanConfig) -> dict:
    data = dict(report.to_json(), config=asdict(config))
    return write_report(out_dir, data, _markdown(report), _figures(report))


def print_summary(report: ScanReport) -> None:
    me = report.me_layer
    em = report.emergence
    console_table(
        f"{report.model} — ME layer: {describe_me_layer(me)}, 0-based; emergence: {em.kind}",
        ["block", "paper", "token-0 max |h|", "delim max |h|", "rest max |h|", "median |h|", "max/median",
         "massive entries", ""],
        [[r["block"], r["block_1based"], r["token0_max_abs"], r["delimiter_max_abs"], r["rest_max_abs"],
          r["median_abs"], r["ratio"], r["massive_entries_max"], "← ME" if r["block"] == me else ""]
         for r in report.layers],
    )
