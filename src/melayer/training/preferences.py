"""Preference data without the hub: on-policy pairs sampled from the model and labelled by melayer's own judges.

For each prompt the model samples ``n`` responses (one ``generate`` call with ``num_return_sequences=n``, seeded
per prompt, so a prompt's samples never depend on which prompts came before it); a judge labels each response
good or bad, and a pair takes a random good response as ``chosen`` and a random bad one as ``rejected``.
``prompt_batch`` > 1 samples that many prompts in one left-padded call instead (seeded per block: a prompt's
samples then depend on its block, and a build is reproducible for the same ``prompt_batch``); on a GPU that is
the difference between seconds per prompt and a block of prompts in the same time:

* ``refusal``: harmless instructions (chosen = complies, rejected = refuses) and harmful ones (chosen = refuses,
  rejected = complies), judged by a :func:`melayer.evaluate.scorers.refusal_classifier` (``prefix`` by default:
  the classifier ``melayer eval`` reports). Prompts: ``refusal/harmful_val.json`` and ``harmless_val.json``
  only, shuffled with the seed and taken alternately harmful / harmless; the ``*_test`` splits stay held out.
* ``gsm8k``: GSM8K **train** questions (``melayer eval``'s prompt), chosen = the final number equals the gold,
  rejected = it does not (``melayer eval``'s extraction and decimal equality). The test split stays held out.

A prompt whose samples all land on one side gives no pair and is counted as skipped (``all_good``,
``all_bad``), as is one whose only good samples hit ``max_new_tokens`` (``good_but_truncated``: a cut-off text
would be taught as a finished turn). ``min_pairs`` then draws further prompts, in the same seeded order, up to
``max_prompts``: the counts say honestly how many prompts it took.

Small models rarely disagree with themselves: SmolLM2-135M-Instruct (the default) refused none of 8 samples x
39 harmful prompts at temperature 1, and almost never solves GSM8K, so strictly on-policy pairs barely exist for
it. ``fill="reference"`` then supplies the missing side from a reference response instead of skipping the
prompt: GSM8K's gold solution (as SFT teaches it) as ``chosen`` when every sample is wrong; a fixed refusal
(:data:`REFERENCE_REFUSAL`) as ``chosen`` on a harmful prompt nobody refused, or as ``rejected`` on a harmless
prompt every sample complied with. Such rows say so (``chosen_from`` / ``rejected_from``: ``sample`` or
``reference``) and are counted apart (``pairs_with_reference``); the default, ``fill="none"``, is strictly
on-policy.

On-policy for a WeMask run means sampling from the *masked* model: the model is sampled with whatever WeMask
is active on it (or with ``config.wemask`` applied for the sampling), and the mask is recorded in the config.

Output: a standard ``prompt``/``chosen``/``rejected`` JSONL (conversational; TRL's ``DPOTrainer`` reads it, and
so does ``melayer train dpo --data FILE``), plus ``preferences_config.json`` beside it (model, seed, judge, n,
temperature, splits, mask, and the pairs and skips per prompt kind), both written atomically, the config last.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import data
from ..errors import MelayerError
from ..evaluate.scorers import extract_gsm8k, gsm8k_gold, numbers_equal, refusal_classifier
from ..io import atomic_write_json, atomic_write_text, dumps, read_config_json
from ..masking import WeMaskConfig, active_wemasks, apply_wemask
from ..report import progress, say
from ..text import eos_ids, left_pad, pad_id
from .data import sft_target, user_prompt

SOURCES = ("refusal", "gsm8k")
FILLS = ("none", "reference")
REFERENCE_REFUSAL = "I'm sorry, but I can't help with that."  # a refusal for both string-match classifiers
CONFIG_NAME = "preferences_config.json"
GSM8K_JUDGE = "gsm8k_exact"
MAX_NEW_TOKENS = {"refusal": 128, "gsm8k": 256}
SPLITS = {"refusal": ["refusal/harmful_val.json", "refusal/harmless_val.json"], "gsm8k": ["gsm8k/train.jsonl"]}
# `melayer train dpo --data refusal|gsm8k`: without --limit, 4 pairs (at most 8 prompts per pair), 64 / 128 new
# tokens per sample and fill="reference". Small on purpose: on one CPU core the 135M default model samples 4 x 64
# tokens in ~13 s, so the few prompts this takes plus 2 DPO steps stay within a couple of minutes; a real run
# passes --limit, or a file from `melayer data preferences`.
TRAIN_PAIRS = 4
TRAIN_PROMPTS_PER_PAIR = 8
TRAIN_MAX_NEW_TOKENS = {"refusal": 64, "gsm8k": 128}


@dataclass
class PreferenceConfig:
    """How a preference set was (or is to be) built; saved as ``preferences_config.json`` beside the JSONL.

    ``limit`` prompts are sampled first; while fewer than ``min_pairs`` pairs came out, further prompts follow
    (same seeded order) up to ``max_prompts`` in all (None: ``4 x limit``). ``max_new_tokens`` None: 128 for
    refusal, 256 for GSM8K. ``judge`` None: ``prefix`` (refusal) or ``gsm8k_exact``. ``fill``: ``none`` (strictly
    on-policy) or ``reference`` (see the module docstring). ``wemask``: the mask active while sampling
    (resolved; None: unmasked). ``counts`` (filled in by :func:`build_preferences`): per prompt kind,
    ``{"prompts", "pairs", "pairs_with_reference", "skipped": {reason: n}}``.
    """

    source: str = "refusal"
    model: str = "default"
    data_dir: Optional[str] = None
    n: int = 4
    limit: int = 16
    min_pairs: int = 0
    max_prompts: Optional[int] = None
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    judge: Optional[str] = None
    fill: str = "none"
    prompt_batch: int = 1  # prompts sampled per generate call (1: each prompt seeded on its own)
    wemask: Optional[WeMaskConfig] = None
    splits: list = field(default_factory=list)
    file: Optional[str] = None  # the JSONL this config describes (its name, in the same folder)
    counts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.wemask, dict):
            self.wemask = WeMaskConfig(**self.wemask)
        if self.source in SOURCES:
            if self.max_new_tokens is None:
                self.max_new_tokens = MAX_NEW_TOKENS[self.source]
            if self.judge is None:
                self.judge = "prefix" if self.source == "refusal" else GSM8K_JUDGE
            if not self.splits:
                self.splits = list(SPLITS[self.source])
        if self.max_prompts is None and isinstance(self.limit, int):
            self.max_prompts = 4 * self.limit
        self.validate()

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise MelayerError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        for name in ("n", "limit", "max_new_tokens", "max_prompts", "prompt_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MelayerError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.n < 2:
            raise MelayerError("--n must be at least 2: a pair needs a good and a bad sample of the same prompt")
        if not isinstance(self.min_pairs, int) or self.min_pairs < 0:
            raise MelayerError(f"--min-pairs must be >= 0, got {self.min_pairs!r}")
        if self.max_prompts < self.limit:
            raise MelayerError(f"--max-prompts ({self.max_prompts}) must be >= --limit ({self.limit})")
        if self.fill not in FILLS:
            raise MelayerError(f"--fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise MelayerError("--temperature must be > 0 and --top-p in (0, 1]")
        if self.source == "refusal":
            refusal_classifier(self.judge)  # one-line error for an unknown classifier
        elif self.judge != GSM8K_JUDGE:
            raise MelayerError(f"GSM8K pairs are judged by {GSM8K_JUDGE} (the final number), got {self.judge!r}")

    def recipe(self) -> dict:
        """Everything that decides the pairs (not the outcome): two builds with equal recipes give equal files."""
        out = dataclasses.asdict(self)
        for name in ("counts", "file"):
            out.pop(name)
        return json.loads(dumps(out))

    @property
    def pairs(self) -> int:
        return sum(c.get("pairs", 0) for c in self.counts.values())

    def save(self, directory) -> Path:
        return atomic_write_json(Path(directory) / CONFIG_NAME, dataclasses.asdict(self))

    @classmethod
    def load(cls, path) -> "PreferenceConfig":
        return cls(**read_config_json(cls, path, CONFIG_NAME, "preference config"))


# -- prompts and judges ---------------------------------------------------------------------------------------

def prompt_items(cfg: PreferenceConfig) -> list[dict]:
    """Every usable prompt in the seeded order they are sampled: ``{"id", "kind", "prompt", "gold",
    "reference_chosen", "reference_rejected"}`` (the reference responses ``fill="reference"`` may use).

    Refusal: harmful_val and harmless_val, each shuffled with the seed, then alternated (harmful first) so any
    prefix is balanced until the 39 harmful prompts run out. GSM8K: the train split, shuffled with the seed.
    """
    rng = random.Random(cfg.seed)
    if cfg.source == "refusal":
        harmful = data.load("refusal_harmful_val", cfg.data_dir)
        harmless = data.load("refusal_harmless_val", cfg.data_dir)
        rng.shuffle(harmful)
        rng.shuffle(harmless)
        out = []
        for i in range(max(len(harmful), len(harmless))):
            for kind, rows in (("harmful", harmful), ("harmless", harmless)):
                if i < len(rows):
                    out.append({"id": rows[i]["id"], "kind": kind, "gold": None,
                                "prompt": [{"role": "user", "content": rows[i]["prompt"]}],
                                "reference_chosen": REFERENCE_REFUSAL if kind == "harmful" else None,
                                "reference_rejected": REFERENCE_REFUSAL if kind == "harmless" else None})
        return out
    rows = data.load("gsm8k_train", cfg.data_dir)
    rng.shuffle(rows)
    return [{"id": r["id"], "kind": "gsm8k", "prompt": user_prompt(r), "gold": gsm8k_gold(r["answer"]),
             "reference_chosen": sft_target(r["answer"]), "reference_rejected": None} for r in rows]


def judge(item: dict, cfg: PreferenceConfig) -> Callable[[str], bool]:
    """``is_good(text)`` for one prompt: complies on harmless, refuses on harmful, right final number on GSM8K."""
    if item["kind"] == "gsm8k":
        gold = item["gold"]
        return lambda text: numbers_equal(extract_gsm8k(text), gold)
    refused = refusal_classifier(cfg.judge)
    if item["kind"] == "harmful":
        return refused
    return lambda text: not refused(text)


def prompt_seed(seed: int, source: str, item_id: str) -> int:
    """A seed of its own for each prompt (stable across processes, unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x00{source}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# -- sampling and pairing -------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, tokenizer, messages: list[dict], n: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 128) -> list[dict]:
    """``n`` sampled responses ``{"text", "finished"}`` to one chat prompt (pure temperature / top-p sampling,
    no top-k); ``finished``: the response ended with an end-of-turn token before ``max_new_tokens``."""
    return sample_batch(model, tokenizer, [messages], n, seed, temperature, top_p, max_new_tokens)[0]


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[list[dict]], n: int, seed: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 128) -> list[list[dict]]:
    """:func:`sample` for several chat prompts in one call (left-padded; the attention mask keeps the pads out),
    one list of ``n`` responses per prompt."""
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
    ids, mask = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], pad_id(tokenizer))
    device = next(model.parameters()).device
    enc = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                         max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad_id(tokenizer))
    stops = set(eos_ids(tokenizer, model))
    samples = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():  # prompt-major: n rows per prompt
        end = next((i for i, t in enumerate(row) if t in stops), None)
        kept = row if end is None else row[:end]
        samples.append({"text": tokenizer.decode(kept, skip_special_tokens=True).strip(), "finished": end is not None})
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


def make_pair(prompt, samples: list[dict], is_good: Callable[[str], bool], rng: random.Random,
              require_finished_chosen: bool = True, reference_chosen: Optional[str] = None,
              reference_rejected: Optional[str] = None) -> tuple[Optional[dict], Optional[str]]:
    """``(row, None)`` with a random good sample as chosen and a random bad one as rejected, or ``(None, why)``:
    ``all_bad``, ``all_good``, or ``good_but_truncated`` (the only good samples never finished).

    A reference response given for the missing side stands in for it instead (the row's ``chosen_from`` /
    ``rejected_from`` say ``reference``): ``reference_chosen`` when no finished good sample exists,
    ``reference_rejected`` when no bad one does. Both sides are never references.
    """
    verdicts = [bool(is_good(s["text"])) for s in samples]
    good = [s for s, v in zip(samples, verdicts) if v and s["text"] and (s["finished"] or not require_finished_chosen)]
    bad = [s for s, v in zip(samples, verdicts) if not v]
    if good and bad:
        chosen, rejected, origin = rng.choice(good)["text"], rng.choice(bad)["text"], ("sample", "sample")
    elif bad and reference_chosen is not None:
        chosen, rejected, origin = reference_chosen, rng.choice(bad)["text"], ("reference", "sample")
    elif good and reference_rejected is not None:
        chosen, rejected, origin = rng.choice(good)["text"], reference_rejected, ("sample", "reference")
    elif any(verdicts) and not good and (bad or reference_rejected is not None):
        return None, "good_but_truncated"  # a rejected side exists, but every good sample was cut off
    else:
        return None, "all_good" if any(verdicts) else "all_bad"
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "chosen_from": origin[0], "rejected_from": origin[1]}, None


def build_preferences(model, tokenizer, cfg: PreferenceConfig) -> tuple[list[dict], PreferenceConfig]:
    """Sample, judge and pair: ``(rows, config with counts and the mask used)``. Rows carry ``id`` and ``kind``
    beside ``prompt``/``chosen``/``rejected`` (TRL ignores extra columns)."""
    if not getattr(tokenizer, "chat_template", None):
        raise MelayerError("preference pairs are chats: this tokenizer has no chat template")
    items = prompt_items(cfg)
    handle = None
    if cfg.wemask is not None and cfg.wemask.rate > 0:
        if active_wemasks(model):
            raise MelayerError("the model already has a WeMask applied: pass wemask=None to sample with it")
        handle = apply_wemask(model, cfg.wemask, tokenizer=tokenizer)
    masks = [h.config for h in active_wemasks(model) if h.k]
    if len(masks) > 1:
        raise MelayerError(f"{len(masks)} WeMasks are active on the model: sample with one at most")
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    counts: dict[str, dict] = {}
    try:
        cap = min(cfg.max_prompts, len(items))
        bar = progress(None, desc=f"sampling {cfg.source} preferences",
                       total=min(cfg.limit if not cfg.min_pairs else cfg.max_prompts, len(items)))
        i = 0
        while i < cap and (i < cfg.limit or len(rows) < cfg.min_pairs):
            # the first `limit` prompts, then more (block by block) while pairs are missing
            block = items[i:min(i + cfg.prompt_batch, cap, cfg.limit if i < cfg.limit else cap)]
            seeds = [prompt_seed(cfg.seed, cfg.source, item["id"]) for item in block]
            block_seed = seeds[0] if len(block) == 1 else prompt_seed(cfg.seed, cfg.source,
                                                                      "\x00".join(it["id"] for it in block))
            drawn = sample_batch(model, tokenizer, [item["prompt"] for item in block], cfg.n, block_seed,
                                 cfg.temperature, cfg.top_p, cfg.max_new_tokens)
            for item, s, samples in zip(block, seeds, drawn):
                count = counts.setdefault(item["kind"], {"prompts": 0, "pairs": 0, "pairs_with_reference": 0,
                                                         "skipped": {}})
                count["prompts"] += 1
                fill = cfg.fill == "reference"
                row, why = make_pair(item["prompt"], samples, judge(item, cfg), random.Random(s),
                                     reference_chosen=item["reference_chosen"] if fill else None,
                                     reference_rejected=item["reference_rejected"] if fill else None)
                if row is None:
                    count["skipped"][why] = count["skipped"].get(why, 0) + 1
                else:
                    count["pairs"] += 1
                    count["pairs_with_reference"] += "reference" in (row["chosen_from"], row["rejected_from"])
                    rows.append({**row, "id": item["id"], "kind": item["kind"]})
            i += len(block)
            bar.update(len(block))
        bar.close()
    finally:
        model.train(was_training)
        if handle is not None:
            handle.remove()
    built = dataclasses.replace(cfg, wemask=masks[0] if masks else None, counts=counts)
    tried = sum(c["prompts"] for c in counts.values())
    skipped = Counter()
    for c in counts.values():
        skipped.update(c["skipped"])
    filled = sum(c["pairs_with_reference"] for c in counts.values())
    say(f"{len(rows)} {cfg.source} preference pairs from {tried} prompts x {cfg.n} samples"
        + (f", {filled} of them with a reference response on one side (every sample of the prompt was judged "
           f"alike)" if filled else "")
        + (f"; skipped: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))}" if skipped else ""))
    if len(rows) < cfg.min_pairs:
        say(f"only {len(rows)} of the {cfg.min_pairs} pairs asked for: the prompt cap ({cfg.max_prompts}) was reached")
    return rows, built


def write_preferences(rows: list[dict], cfg: PreferenceConfig, path) -> Path:
    """The JSONL at ``path`` and ``preferences_config.json`` beside it (atomic; the config last, so it marks a
    complete set). One preference set per folder: a config there describing another file is an error."""
    path = Path(path)
    existing = path.parent / CONFIG_NAME
    if existing.is_file():
        try:
            other = json.loads(existing.read_text(encoding="utf-8")).get("file")
        except (OSError, ValueError, AttributeError):
            other = None
        if other not in (None, path.name):
            raise MelayerError(f"{existing} describes {other}: write {path.name} to a folder of its own")
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))
    dataclasses.replace(cfg, file=path.name).save(path.parent)
    return path


def check_preference_rows(rows: list[dict], where: str) -> None:
    """One-line error unless every row is a preference pair TRL reads (``chosen`` and ``rejected``, both chats
    or both texts; ``prompt`` optional: TRL then takes the shared start of the two)."""
    if not rows:
        raise MelayerError(f"{where}: no preference pairs")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "chosen" not in r or "rejected" not in r:
            raise MelayerError(f"{where}: row {i} is not a preference pair (needs 'chosen' and 'rejected', "
                               "and usually 'prompt')")
        kinds = {type(r[k]) for k in ("prompt", "chosen", "rejected") if k in r}
        if not (kinds <= {str} or kinds <= {list}):
            raise MelayerError(f"{where}: row {i} mixes plain text and chat messages in prompt/chosen/rejected")
