"""`melayer scan`: find the massive activations of a model and its ME layer, with the paper's plots."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .adapters import adapter_for, base_model, model_type
from .capture import LayerStats, ResidualCapture
from .detect import MassiveCriterion, consensus, me_layer_of, prompt_events
from .errors import MelayerError
from .generation import encode_prompt

DELIMITERS = set(".,;:!?\n")

# Varied built-in prompts: plain prose, code, lists, a question; each also runs chat-templated and with BOS.
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and children were playing.",
    "In 1905, Albert Einstein published four papers that changed physics: on the photoelectric effect, "
    "Brownian motion, special relativity, and mass-energy equivalence.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ingredients: two cups of flour, one egg, a pinch of salt, and milk. Mix well, then rest for an hour.",
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Summer is here; the days are long, the evenings warm, and the beaches crowded with tourists.",
]


@dataclass
class Prompt:
    text: str
    chat: bool = False  # wrap in the tokenizer's chat template (as a user turn)
    bos: bool = False  # prepend the BOS token (when the tokenizer has one and does not add it)


@dataclass
class ScanConfig:
    criterion: MassiveCriterion = field(default_factory=MassiveCriterion)
    batch_size: int = 8
    top_dims: int = 8  # how many dims of token 0 / delimiter / rest to report per layer


def default_prompts(tokenizer) -> list[Prompt]:
    prompts = [Prompt(t) for t in DEFAULT_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        prompts += [Prompt(t, chat=True) for t in DEFAULT_TEXTS[:3]]
    if tokenizer.bos_token_id is not None:
        prompts += [Prompt(t, bos=True) for t in DEFAULT_TEXTS[:3]]
    return prompts


def read_prompts(path: str | Path) -> list[Prompt]:
    """A .jsonl file ({"text"|"prompt", "chat"?, "bos"?} per line) or a text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise MelayerError(f"prompt file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MelayerError(f"prompt file is empty: {path}")
    if path.suffix != ".jsonl":
        return [Prompt(line) for line in lines]
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            prompts.append(Prompt(row.get("text", row.get("prompt")), bool(row.get("chat")), bool(row.get("bos"))))
        except (json.JSONDecodeError, AttributeError):
            raise MelayerError(f"{path}:{n}: not a JSON object with a 'text' field") from None
        if not prompts[-1].text:
            raise MelayerError(f"{path}:{n}: empty prompt")
    return prompts


def encode(tokenizer, prompt: Prompt) -> list[int]:
    ids = encode_prompt(tokenizer, prompt.text, prompt.chat)
    bos = tokenizer.bos_token_id
    if prompt.bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def first_delimiter(tokenizer, ids: Sequence[int]) -> int:
    """Index of the first token after the first one that is a delimiter (punctuation or newline); -1 if none."""
    for i, t in enumerate(ids[1:], 1):
        text = tokenizer.decode([t])
        if text.strip() in DELIMITERS or (text and not text.strip() and "\n" in text):
            return i
    return -1


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    return ids, mask


@dataclass
class ScanReport:
    model: str
    family: str
    num_layers: int
    hidden_size: int
    me_layer: Optional[int]
    me_agreement: float  # share of prompts whose own ME layer equals `me_layer`
    criterion: MassiveCriterion
    layers: list[dict]  # per block, averaged over prompts
    prompts: list[dict]  # per prompt: text, chat, bos, tokens, me_layer, events
    token0_abs: list[list[float]]  # (layers, dims) mean |h| of token 0: the paper's 3-D plot
    index_convention: str = "0-based decoder block index; block i's output is output_hidden_states[i + 1]"

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def events(self) -> list[dict]:
        return [dict(e, prompt=p["index"]) for p in self.prompts for e in p["events"]]


def scan(model, tokenizer, prompts: Optional[Sequence[Prompt | str]] = None,
         config: Optional[ScanConfig] = None, progress: bool = True) -> ScanReport:
    """Run the prompts through the model with capture hooks and find massive activations and the ME layer."""
    from .report import progress as bar

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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_prompt: list[list[LayerStats]] = []
    delims: list[int] = []
    with ResidualCapture(model) as cap:
        starts = range(0, len(prompts), config.batch_size)
        for s in bar(starts, desc="scan", total=len(starts), disable=not progress):
            chunk = encoded[s:s + config.batch_size]
            ids, mask = left_pad(chunk, pad)
            width = ids.shape[1]
            d = [first_delimiter(tokenizer, c) for c in chunk]
            delims += d
            delim_abs = torch.tensor([width - len(c) + i if i >= 0 else -1 for c, i in zip(chunk, d)])
            layers = cap.run(ids, mask, delim_abs)
            for b in range(len(chunk)):
                per_prompt.append([LayerStats(**{k: v[b:b + 1] for k, v in vars(st).items()}) for st in layers])
    return _build_report(model, tokenizer, prompts, encoded, delims, per_prompt, config, adapter.family)


def _build_report(model, tokenizer, prompts, encoded, delims, per_prompt, config, family) -> ScanReport:
    criterion = config.criterion
    num_layers = len(per_prompt[0])
    prompt_rows, me_layers = [], []
    for i, (p, ids, layers) in enumerate(zip(prompts, encoded, per_prompt)):
        events = prompt_events(layers, 0, criterion)
        me = me_layer_of(events)
        me_layers.append(me)
        rows = []
        for e in events[:20]:
            row = asdict(e)
            row["token"] = tokenizer.decode([ids[e.pos]]) if 0 <= e.pos < len(ids) else None
            rows.append(row)
        prompt_rows.append(dict(index=i, text=p.text, chat=p.chat, bos=p.bos, tokens=len(ids),
                                first_token=tokenizer.decode([ids[0]]), delimiter_pos=delims[i],
                                me_layer=me, events=rows))
    me_layer, agreement = consensus(me_layers)

    def mean(attr: str, i: int) -> torch.Tensor:
        return torch.stack([getattr(layers[i], attr)[0] for layers in per_prompt]).float().mean(0)

    k = config.top_dims
    layer_rows = []
    token0 = []
    for i in range(num_layers):
        first_abs, rest_abs, delim_abs = mean("first_abs", i), mean("rest_max_abs", i), mean("delim_abs", i)
        token0.append(first_abs)
        median = mean("median_abs", i)
        maxes = [float(layers[i].max_abs[0]) for layers in per_prompt]
        layer_rows.append(dict(
            block=i,
            max_abs=max(maxes),
            max_abs_mean=sum(maxes) / len(maxes),
            median_abs=float(median),
            ratio=max(float(layers[i].max_abs[0] / layers[i].median_abs[0].clamp(min=1e-12)) for layers in per_prompt),
            token0_max_abs=float(first_abs.max()),
            rest_max_abs=float(rest_abs.max()),
            token0_norm=float(mean("first_norm", i)),
            rest_norm=float(mean("rest_norm", i)),
            token0_top=_top(first_abs, k),
            delimiter_top=_top(delim_abs, k),
            rest_top=_top(rest_abs, k),
            massive_prompts=sum(any(e["start"] <= i <= e["end"] and e["kind"] == "massive" for e in p["events"])
                                for p in prompt_rows),
        ))
    config_obj = base_model(model).config
    return ScanReport(
        model=str(getattr(model, "name_or_path", "") or getattr(config_obj, "_name_or_path", "")),
        family=family, num_layers=num_layers, hidden_size=int(config_obj.hidden_size), me_layer=me_layer,
        me_agreement=agreement, criterion=criterion, layers=layer_rows, prompts=prompt_rows,
        token0_abs=[t.tolist() for t in token0],
    )


def _top(values: torch.Tensor, k: int) -> list[list[float]]:
    v, d = values.topk(min(k, values.numel()))
    return [[int(i), float(x)] for x, i in zip(v, d)]


def find_me_layer(model, tokenizer=None, criterion: Optional[MassiveCriterion] = None) -> int:
    """The model's ME layer from a scan of the built-in prompts, cached on the model object.

    Without a tokenizer, deterministic random token sequences are used (massive activations do not
    depend on the text).
    """
    base = base_model(model)
    cached = getattr(base, "_melayer_me_layer", None)
    if cached is not None:
        return cached
    config = ScanConfig(criterion=criterion or MassiveCriterion())
    if tokenizer is not None:
        report = scan(model, tokenizer, config=config, progress=False)
        layer = report.me_layer
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, base.config.vocab_size, (4, 48), generator=gen)
        with ResidualCapture(model) as cap:
            layers = cap.run(ids, torch.ones_like(ids))
        layer, _ = consensus([me_layer_of(prompt_events(layers, b, config.criterion)) for b in range(4)])
    if layer is None:
        raise MelayerError(f"no persistent massive activation found in {model_type(model)} model; "
                           "pass the ME layer explicitly")
    base._melayer_me_layer = layer
    return layer


# -- report ------------------------------------------------------------------------------------

def _markdown(report: ScanReport) -> str:
    from .report import markdown_table

    c = report.criterion
    lines = [f"# melayer scan: {report.model}", "",
             f"- family: `{report.family}`, {report.num_layers} decoder blocks, hidden size {report.hidden_size}",
             f"- **ME layer: block {report.me_layer}** (0-based; {report.me_agreement:.0%} of "
             f"{len(report.prompts)} prompts agree)" if report.me_layer is not None else
             "- **no ME layer**: no massive activation persists in this model",
             f"- criterion: |a| > {c.abs_threshold:g} and > {c.ratio:g} × the median |h| of the block output "
             f"(Sun et al. 2024); *persists* = still massive at the same (token, dim) in ≥ "
             f"{c.persist_fraction:.0%} of the blocks from its start to the last block; *spikes* (> "
             f"{c.spike_ratio:g} × median) that do not persist are transient.",
             f"- indices: {report.index_convention}; `output_hidden_states` has {report.num_layers + 1} entries "
             "and its last one is after the final norm, so it is never used as a block output.",
             f"- prompts: {sum(not p['chat'] for p in report.prompts)} plain, "
             f"{sum(p['chat'] for p in report.prompts)} chat-templated, {sum(p['bos'] for p in report.prompts)} "
             "with an explicit BOS token.", ""]
    me = report.me_layer
    if me is not None:
        first = report.prompts[0]
        persistent = [e for e in first["events"] if e["persistent"]]
        transient = [e for e in first["events"] if not e["persistent"] and e["pos"] == 0]
        lines.append("## Why this block")
        if persistent:
            e = persistent[0]
            lines.append(f"In prompt 0, token {e['pos']} ({e['token']!r}) dim {e['dim']} becomes massive after block "
                         f"{e['start']} (peak {e['peak']:.0f} at block {e['peak_block']}) and stays massive in "
                         f"{e['fraction']:.0%} of the blocks after it (until block {e['end']}).")
        for e in transient[:3]:
            lines.append(f"- Earlier transient {e['kind']} on token 0 dim {e['dim']}: blocks {e['start']}–{e['end']}, "
                         f"peak {e['peak']:.0f} at block {e['peak_block']}; it fades, so block {e['start']} is not "
                         "the ME layer.")
        lines.append("")
    lines += ["## Per block (mean over prompts; max over prompts for `max |h|`)", "",
              markdown_table(["block", "max |h|", "median |h|", "max/median", "token-0 max", "rest max",
                              "‖token 0‖", "‖rest‖", "token-0 top dims"],
                             [[r["block"] if r["block"] != me else f"**{me} (ME)**", r["max_abs"], r["median_abs"],
                               r["ratio"], r["token0_max_abs"], r["rest_max_abs"], r["token0_norm"], r["rest_norm"],
                               ", ".join(f"{d}:{v:.0f}" for d, v in r["token0_top"][:3])] for r in report.layers]),
              "## Massive events per prompt", "",
              markdown_table(["prompt", "chat", "BOS", "tokens", "ME", "token", "dim", "blocks", "peak", "kind"],
                             [[p["index"], p["chat"], p["bos"], p["tokens"], p["me_layer"], repr(e["token"]), e["dim"],
                               f"{e['start']}–{e['end']}", e["peak"],
                               "persistent" if e["persistent"] else f"transient {e['kind']}"]
                              for p in report.prompts for e in p["events"][:3]]),
              "## Plots", "", "![token-0 |h| per dim and block](token0_3d.png)", "",
              "![max |h| per block](max_per_layer.png)", "", "![massive dims](massive_dims_heatmap.png)", ""]
    return "\n".join(lines)


def _figures(report: ScanReport) -> dict:
    import numpy as np

    from .report import new_figure

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
    ax.semilogy(layers, [r["rest_max_abs"] for r in report.layers], "s-", label="other tokens (max)")
    ax.semilogy(layers, [r["median_abs"] for r in report.layers], ":", label="median |h|")
    if report.me_layer is not None:
        ax.axvline(report.me_layer, color="red", linestyle="--", label=f"ME layer (block {report.me_layer})")
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
    from .report import write_report

    data = dict(report.to_json(), config=asdict(config))
    return write_report(out_dir, data, _markdown(report), _figures(report))


def print_summary(report: ScanReport) -> None:
    from .report import console_table

    me = report.me_layer
    console_table(
        f"{report.model} — ME layer: {me if me is not None else 'none'} (0-based block)",
        ["block", "token-0 max |h|", "rest max |h|", "median |h|", "max/median", ""],
        [[r["block"], r["token0_max_abs"], r["rest_max_abs"], r["median_abs"], r["ratio"],
          "← ME" if r["block"] == me else ""] for r in report.layers],
    )


def register_cli(sub) -> None:
    from .cli import model_argument

    p = sub.add_parser("scan", help="find massive activations and the ME layer")
    model_argument(p)
    p.add_argument("--prompts", help="text file (one prompt per line) or JSONL ({'text', 'chat', 'bos'})")
    p.add_argument("--out", default="out/scan", help="report folder (default: out/scan)")
    p.add_argument("--abs-threshold", type=float, default=100.0)
    p.add_argument("--ratio", type=float, default=1000.0)
    p.add_argument("--persist-fraction", type=float, default=0.8)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(handler=_run_cli)


def _run_cli(args) -> int:
    from .load import load_model

    criterion = MassiveCriterion(abs_threshold=args.abs_threshold, ratio=args.ratio,
                                 persist_fraction=args.persist_fraction)
    config = ScanConfig(criterion=criterion, batch_size=args.batch_size)
    prompts = read_prompts(args.prompts) if args.prompts else None  # validate before the slow load
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    report = scan(model, tokenizer, prompts, config)
    print_summary(report)
    paths = write_scan_report(report, args.out, config)
    print(f"ME layer: {report.me_layer} (0-based block)  report: {paths['markdown']}")
    return 0
