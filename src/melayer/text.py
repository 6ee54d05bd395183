"""Prompts and their token ids: one place for chat templates, BOS, EOS ids, the pad id and left padding.

Every command encodes text through :func:`encode_prompt` / :func:`encode` and pads with :func:`left_pad` and
:func:`pad_id`, so scan, explain, WeMask, generation and evaluation all see the same tokens for the same text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import MelayerError

DELIMITERS = set(".,;:!?\n")

@dataclass
class Prompt:
    """One input text and how it is wrapped: the chat template (as a user turn) and/or an explicit BOS token."""

    text: str
    chat: bool = False
    bos: bool = False  # prepend the BOS token (when the tokenizer has one and does not add it)


def read_prompts(path: str | Path) -> list[Prompt]:
    """A .jsonl file ({"text"|"prompt", "chat"?, "bos"?} per line) or a text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise MelayerError(f"prompt file not found: {path}")
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise MelayerError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not lines:
        raise MelayerError(f"prompt file is empty: {path}")
    if path.suffix != ".jsonl":
        return [Prompt(line) for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MelayerError(f"{path}:{n}: not a JSON object with a 'text' field") from None
        text = row.get("text", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise MelayerError(f"{path}:{n}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise MelayerError(f"{path}:{n}: empty prompt")
        prompts.append(Prompt(text, bool(row.get("chat")), bool(row.get("bos"))))
    return prompts


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a user message: through the chat template (which supplies its own special tokens) or raw."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MelayerError("chat: this tokenizer has no chat template (run without chat)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a :class:`Prompt` (chat template and/or BOS as it asks)."""
    ids = encode_prompt(tokenizer, prompt.text, prompt.chat)
    bos = tokenizer.bos_token_id
    if prompt.bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def eos_ids(tokenizer, model=None) -> list[int]:
    """All end-of-turn ids: the tokenizer's EOS plus the generation config's (chat models end turns differently)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if extra is not None:
        ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return sorted(ids)


def pad_id(tokenizer) -> int:
    """The id that fills left padding: the tokenizer's pad token, else its EOS, else 0 (never attended to)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch: every sequence ends in the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids, mask


def first_delimiter(tokenizer, ids: Sequence[int]) -> int:
    """Index of the first token after the first one that is a delimiter (punctuation or newline); -1 if none."""
    for i, t in enumerate(ids[1:], 1):
        text = tokenizer.decode([t])
        if text.strip() in DELIMITERS or (text and not text.strip() and "\n" in text):
            return i
    return -1
