"""The evaluation runner: every task at every WeMask condition on the same items, logged row by row.

Rows go to ``samples.jsonl`` through :class:`melayer.io.JsonlLog` one fsynced batch at a time, keyed by
(task, item id, condition): a run killed at any point (even SIGKILL) restarts where it stopped, with no
lost and no duplicated rows. Generation is batched with left padding through
:func:`melayer.generation.generate_batch`; log-likelihood tasks score all options of a batch in one forward.
This module imports only torch/transformers/melayer core, so ``--generate-only`` runs on a machine without
the scoring libraries.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..errors import MelayerError
from ..generation import GenerationConfig, generate_from_ids
from ..io import JsonlLog, atomic_write_json
from ..load import load_model, saved_wemask
from ..modelutils import device_of
from ..report import progress, say
from ..text import encode_prompt, left_pad, pad_id
from ..masking import MODES, WeMaskConfig, wemask
from .. import data
from .tasks import Task, get_task

SAMPLES_NAME = "samples.jsonl"
ROW_FIELDS = ("task", "item_id", "cond", "rate", "mode", "output")
CONFIG_NAME = "eval_config.json"
# Settings that change what a row contains: an out dir can only be resumed with the same values.
OUTPUT_FIELDS = ("model", "chat", "max_new_tokens", "sample", "temperature", "top_p", "seed", "limit", "dtype",
                 "wemask_layers", "me_layer", "ppl_seq_len")


@dataclass
class EvalConfig:
    """One ``melayer eval`` run; saved as ``eval_config.json`` next to its results."""

    model: str = "default"
    tasks: list[str] = field(default_factory=lambda: ["gsm8k"])
    wemask_rates: Optional[list[float]] = None  # None: [0], or [0, saved rate] for a model saved with WeMask
    wemask_modes: list[str] = field(default_factory=lambda: ["correct"])
    wemask_layers: Union[str, list[int]] = "after_me"
    me_layer: Optional[int] = None
    limit: Optional[int] = None
    seed: int = 0
    data_dir: Optional[str] = None
    out: str = "out/eval"
    batch_size: int = 64  # CPU: the compact engine drops finished rows, so big batches pay (bench_eval.md)
    chat: bool = True
    max_new_tokens: Optional[int] = None  # None: each task's default
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "auto"
    compile: bool = False  # static engine: torch.compile the decode step (GPU: ~2x faster steps, ~30 s per shape)
    refusal_classifier: str = "prefix"
    ppl_seq_len: int = 1024
    generate_only: bool = False
    score_only: bool = False
    device: Optional[str] = None
    dtype: Optional[str] = None

    def validate(self) -> None:
        if not self.tasks:
            raise MelayerError("--tasks: give at least one task")
        for name in self.tasks:
            get_task(name, self.refusal_classifier)
        if self.wemask_rates is not None and not self.wemask_rates:
            raise MelayerError("--wemask-rates: give at least one rate")
        for r in self.wemask_rates or []:
            if not 0.0 <= r <= 1.0:
                raise MelayerError(f"--wemask-rates: every rate must be in [0, 1], got {r}")
        for m in self.wemask_modes:
            if m not in ("correct", "paper"):
                raise MelayerError(f"--wemask-mode must be correct or paper, got {m!r}")
        if self.batch_size < 1:
            raise MelayerError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise MelayerError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise MelayerError(f"--limit must be at least 1, got {self.limit}")
        if self.ppl_seq_len < 2:
            raise MelayerError(f"--ppl-seq-len must be at least 2, got {self.ppl_seq_len}")
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise MelayerError("--sample needs --temperature > 0 and 0 < --top-p <= 1")
        if self.generate_only and self.score_only:
            raise MelayerError("--generate-only and --score-only exclude each other")


@dataclass(frozen=True)
class Condition:
    """One WeMask setting of the sweep; rate 0 is the unmasked baseline whatever the mode."""

    rate: float
    mode: str = "correct"

    @property
    def key(self) -> str:
        return "0" if self.rate == 0 else f"{self.rate:g}/{self.mode}"


def conditions(cfg: EvalConfig) -> list[Condition]:
    out: list[Condition] = []
    for rate in cfg.wemask_rates or [0.0]:
        for mode in (["correct"] if rate == 0 else cfg.wemask_modes):
            c = Condition(float(rate), mode)
            if c not in out:
                out.append(c)
    return out


def saved_config(out: Path) -> EvalConfig:
    import json

    path = out / CONFIG_NAME
    if not path.exists():
        raise MelayerError(f"{out} has no {CONFIG_NAME}: is it an eval out dir?")
    saved = json.loads(path.read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in saved.items() if k in names})


def check_resumable(cfg: EvalConfig, out: Path) -> None:
    """Refuse to mix rows made with different output-changing settings in one out dir."""
    import json

    path = out / CONFIG_NAME
    if not path.exists() or not (out / SAMPLES_NAME).exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    new = dataclasses.asdict(cfg)
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in OUTPUT_FIELDS if old.get(k) != new[k]]
    if diff:
        raise MelayerError(f"{out} holds rows made with other settings ({'; '.join(diff)}): use another --out")


def row_key(row: dict) -> tuple[str, str, str]:
    return (row["task"], row["item_id"], row["cond"])


# -- encoding -----------------------------------------------------------------------------------------

def _batches(seq: list, size: int) -> Iterable[list]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# -- the three kinds of work --------------------------------------------------------------------------

@torch.no_grad()
def continuation_logliks(model, contexts: list[list[int]], continuations: list[list[list[int]]],
                         pad: int) -> list[list[float]]:
    """Sum log-probability of each continuation given its context, for a batch of items.

    When every continuation of an item is one token (MMLU letters) the item costs one sequence; otherwise
    each (context + continuation) is its own sequence. Sequences are left padded, so the scored tokens sit
    at the right end and only the last few positions' logits are computed.
    """
    seqs, reads = [], []  # reads[i]: per continuation, (sequence index, tokens) to score
    for ctx, conts in zip(contexts, continuations):
        if all(len(c) == 1 for c in conts):
            seqs.append(ctx)
            reads.append([(len(seqs) - 1, c) for c in conts])
        else:
            item = []
            for c in conts:
                seqs.append(ctx + c[:-1])
                item.append((len(seqs) - 1, c))
            reads.append(item)
    keep = max(len(c) for conts in continuations for c in conts)
    ids, mask = left_pad(seqs, pad)
    dev = device_of(model)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, -keep:, :].float(), dim=-1)
    out = []
    for item in reads:
        vals = []
        for s, c in item:
            pos = torch.arange(keep - len(c), keep, device=logp.device)
            vals.append(float(logp[s, pos, torch.tensor(c, device=logp.device)].sum()))
        out.append(vals)
    return out


@torch.no_grad()
def window_nll(model, windows: list[list[int]]) -> list[tuple[float, int]]:
    """(summed NLL in fp32, predicted tokens) of each equal-length window (every token but the first)."""
    ids = torch.tensor(windows, dtype=torch.long, device=device_of(model))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    out = []
    for b in range(ids.shape[0]):
        logp = torch.log_softmax(logits[b, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[b, 1:].unsqueeze(-1)).sum()
        out.append((float(nll), ids.shape[1] - 1))
    return out


# -- scoring --------------------------------------------------------------------------------------------

def score_row(task: Task, row: dict) -> dict:
    """The row with its extracted answer, per-metric (numerator, denominator) and ``score`` (its first metric)."""
    s = task.score(row["gold"], row["prompt"], row["output"])
    num, den = next(iter(s.metrics.values()))
    return {**row, "extracted": s.extracted, "metrics": {k: list(v) for k, v in s.metrics.items()},
            "score": num / den if den else None}


def score_existing(out: Path, refusal_classifier: str = "prefix") -> int:
    """Score every unscored row of ``out/samples.jsonl`` in place (atomic, under the log's lock: a command
    appending to the same log meanwhile loses nothing); returns how many rows were scored."""
    log = open_log(out)
    if not log.read():
        raise MelayerError(f"nothing to score: {out / SAMPLES_NAME} is missing or empty")
    tasks: dict[str, Task] = {}
    scored = 0

    def score(rows: list[dict]) -> list[dict]:
        nonlocal scored
        todo = [i for i, r in enumerate(rows) if r.get("metrics") is None]
        for i in progress(todo, desc="scoring", disable=not todo):
            name = rows[i]["task"]
            task = tasks.setdefault(name, get_task(name, refusal_classifier))
            rows[i] = score_row(task, rows[i])
        scored = len(todo)
        return rows

    log.update(score)
    return scored


def open_log(out: Path) -> JsonlLog:
    """The sample log of an eval out dir (every row must name its task, item, condition and output)."""
    return JsonlLog(out / SAMPLES_NAME, required=ROW_FIELDS)


# -- the run --------------------------------------------------------------------------------------------

@dataclass
class _Work:
    task: Task
    cond: Condition
    items: list[dict]


def _items_for(task: Task, cfg: EvalConfig, tokenizer, cache: dict) -> list[dict]:
    if task.data_name not in cache:
        cache[task.data_name] = task.items(Path(cfg.data_dir) if cfg.data_dir else None)
    items = cache[task.data_name]
    if task.kind == "perplexity":
        items = task.windows(items, tokenizer, cfg.ppl_seq_len)
    return data.select(items, cfg.limit, cfg.seed)


def _row(task: Task, cond: Condition, cfg: EvalConfig, item: dict, prompt, output, max_new: int) -> dict:
    return {"task": task.name, "item_id": item["id"], "cond": cond.key, "rate": cond.rate, "mode": cond.mode,
            "prompt": prompt, "output": output, "gold": task.gold(item), "extracted": None, "score": None,
            "metrics": None,
            "config": {"chat": cfg.chat, "max_new_tokens": max_new, "sample": cfg.sample, "seed": cfg.seed,
                       "layers": cfg.wemask_layers, "engine": cfg.engine,
                       "compile": cfg.compile}}


def _batch_seed(cfg: EvalConfig, cond: Condition, ids: list[str]) -> int:
    """Sampling seed of one batch, from its items and condition (stable across resumes)."""
    return (cfg.seed * 1_000_003 + zlib.crc32(("|".join(ids) + cond.key).encode())) % (2 ** 31)


def _run_work(model, tokenizer, w: _Work, cfg: EvalConfig, log: JsonlLog, bar) -> None:
    task, cond = w.task, w.cond
    score = not cfg.generate_only
    size = cfg.batch_size
    if task.kind == "generate":
        max_new = cfg.max_new_tokens or task.max_new_tokens
        enc = [(it, task.prompt(it)) for it in w.items]
        enc = [(it, p, encode_prompt(tokenizer, p, cfg.chat)) for it, p in enc]
        enc.sort(key=lambda t: -len(t[2]))  # similar lengths together: little padding
        for batch in _batches(enc, size):
            gen = GenerationConfig(max_new_tokens=max_new, do_sample=cfg.sample, temperature=cfg.temperature,
                                   top_p=cfg.top_p, engine=cfg.engine, compile=cfg.compile,
                                   seed=_batch_seed(cfg, cond, [b[0]["id"] for b in batch]) if cfg.sample else None)
            texts = generate_from_ids(model, tokenizer, [b[2] for b in batch], gen)
            rows = [_row(task, cond, cfg, it, p, t, max_new) for (it, p, _), t in zip(batch, texts)]
            log.extend([score_row(task, r) for r in rows] if score else rows)
            bar.update(len(batch))
    elif task.kind == "loglik":
        enc = []
        for it in w.items:
            p = task.prompt(it)
            conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in task.continuations(it, cfg.chat)]
            enc.append((it, p, encode_prompt(tokenizer, p, cfg.chat), conts))
        enc.sort(key=lambda t: -len(t[2]))
        for batch in _batches(enc, size):
            lls = continuation_logliks(model, [b[2] for b in batch], [b[3] for b in batch], pad_id(tokenizer))
            rows = [score_row(task, _row(task, cond, cfg, it, p, ll, 0)) for (it, p, _, _), ll in zip(batch, lls)]
            log.extend(rows)  # the log-likelihoods are the measurement: scoring them needs no extra library
            bar.update(len(batch))
    else:
        for batch in _batches(w.items, min(size, 4)):
            res = window_nll(model, [it["input_ids"] for it in batch])
            rows = [score_row(task, _row(task, cond, cfg, it, None, {"nll": nll, "tokens": n}, 0))
                    for it, (nll, n) in zip(batch, res)]
            log.extend(rows)
            bar.update(len(batch))


def _wemask_context(model, tokenizer, cond: Condition, cfg: EvalConfig):
    import contextlib

    if cond.rate == 0:
        return contextlib.nullcontext()
    # paper mode runs batched with the official mask applied to each item as if it ran alone (the paper's
    # protocol was one item at a time; its literal index-0 mask would hit pads in a left-padded batch)
    return wemask(model, WeMaskConfig(rate=cond.rate, layers=cfg.wemask_layers, mode=cond.mode,
                                      me_layer=cfg.me_layer), tokenizer=tokenizer, per_sequence=True)


def load_for_eval(cfg: EvalConfig):
    """The model and tokenizer, bare: a WeMask saved with the model becomes the sweep's condition when no
    rates were asked for, so every row says exactly which mask produced it."""
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    saved = saved_wemask(model)
    if saved is not None:
        where = f"rate {saved.rate:g}, blocks {saved.layers}, {saved.mode} mode"
        if cfg.wemask_rates is None:
            cfg.wemask_rates, cfg.wemask_modes = [0.0, saved.rate], [saved.mode]
            cfg.wemask_layers, cfg.me_layer = saved.layers, saved.me_layer
            say(f"the model was saved with WeMask ({where}): evaluated without it and with it")
        else:
            say(f"the model was saved with WeMask ({where}): not applied; --wemask-rates decide the conditions")
    return model, tokenizer


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, progress_bar: bool = True) -> Optional[dict]:
    """Run (or resume) ``cfg`` and return the summary (None with ``generate_only``)."""
    cfg.validate()
    out = Path(cfg.out)
    if cfg.score_only:  # the generating runs' tasks and conditions: every one that has rows in the log
        cfg = dataclasses.replace(saved_config(out), refusal_classifier=cfg.refusal_classifier, score_only=True,
                                  generate_only=False)
        score_existing(out, cfg.refusal_classifier)
        rows = list(open_log(out))
        _cover_logged(cfg, rows)
        atomic_write_json(out / CONFIG_NAME, cfg)
        return _summarise(cfg, out, rows)
    if model is None:
        model, tokenizer = load_for_eval(cfg)
    model.eval()
    if cfg.wemask_rates is None:
        cfg.wemask_rates = [0.0]
    check_resumable(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, cfg)
    log = open_log(out)
    done = {row_key(r) for r in log}
    cache: dict = {}
    work = []
    for name in cfg.tasks:
        task = get_task(name, cfg.refusal_classifier)
        items = _items_for(task, cfg, tokenizer, cache)
        for cond in conditions(cfg):
            todo = [it for it in items if (task.name, it["id"], cond.key) not in done]
            if todo:
                work.append(_Work(task, cond, todo))
    total = sum(len(w.items) for w in work)
    bar = progress(None, desc="eval", total=total, disable=not progress_bar, unit="item")
    try:
        for cond in conditions(cfg):
            mine = [w for w in work if w.cond == cond]
            if not mine:
                continue
            with _wemask_context(model, tokenizer, cond, cfg):
                for w in mine:
                    bar.set_description(f"{w.task.name} @ {cond.key}")
                    _run_work(model, tokenizer, w, cfg, log, bar)
    finally:
        bar.close()
    if cfg.generate_only:
        return None
    return _summarise(cfg, out)


def _cover_logged(cfg: EvalConfig, rows: list[dict]) -> None:
    """Extend ``cfg`` with the tasks, rates and modes found in the log: an out dir filled by several commands
    (say one task each) keeps only the last command's config, but its report must cover every row."""
    def add(seq: list, value) -> None:
        if value not in seq:
            seq.append(value)

    cfg.wemask_rates = list(cfg.wemask_rates or [0.0])
    for r in rows:
        add(cfg.tasks, r["task"])
        add(cfg.wemask_rates, float(r["rate"]))
        if r["rate"]:
            add(cfg.wemask_modes, r["mode"])
    cfg.wemask_rates.sort()
    cfg.wemask_modes.sort(key=lambda m: MODES.index(m))


def _summarise(cfg: EvalConfig, out: Path, rows: Optional[list[dict]] = None) -> dict:
    from .summary import summarise, write_summary

    rows = list(open_log(out)) if rows is None else rows
    summary = summarise(rows, cfg)
    write_summary(out, summary, cfg)
    return summary
