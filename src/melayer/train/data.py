"""GSM8K for training: loading (local folder or hub), chat-formatted rows, and the GRPO rewards.

Answer format taught by SFT and rewarded by GRPO: the reasoning, then a last line ``#### N``
(GSM8K's own convention). ``\\boxed{N}`` is accepted as the same final answer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import MelayerError

INSTRUCTION = "Solve the problem step by step. Give the final answer on the last line as '#### <number>'."
GSM8K_HUB = ("openai/gsm8k", "main")

_NUMBER = r"-?[\d,]*\.?\d+"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24
_HASH_ANSWER = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")
_BOXED_ANSWER = re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")\s*\}")
_ANY_NUMBER = re.compile(_NUMBER)
_FORMAT_LAST_LINE = re.compile(r"^\s*####\s*\$?\s*" + _NUMBER + r"\s*\.?\s*$")


def load_gsm8k(split: str = "train", data_dir: Optional[str] = None) -> list[dict]:
    """Rows ``{"question", "answer"}``: from ``data_dir`` (``gsm8k/<split>.jsonl`` or ``<split>.jsonl``) or the hub."""
    if data_dir is None:
        try:
            from datasets import load_dataset

            ds = load_dataset(*GSM8K_HUB, split=split)
        except Exception as e:  # offline, missing dataset: one readable line
            raise MelayerError(f"cannot load GSM8K {split} from the hub ({type(e).__name__}); "
                               f"pass --data-dir with gsm8k/{split}.jsonl") from None
        return [{"question": r["question"], "answer": r["answer"]} for r in ds]
    root = Path(data_dir).expanduser()
    for path in (root / "gsm8k" / f"{split}.jsonl", root / f"{split}.jsonl"):
        if path.is_file():
            break
    else:
        raise MelayerError(f"GSM8K {split} not found under {root} (expected gsm8k/{split}.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"question": row["question"], "answer": row["answer"]})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MelayerError(f"{path}:{n}: not a GSM8K row (JSON with 'question' and 'answer')") from None
    if not rows:
        raise MelayerError(f"{path} is empty")
    return rows


def gold_number(answer: str) -> str:
    """The reference final number of a GSM8K answer (the text after ``####``), normalised."""
    m = _HASH_ANSWER.search(answer)
    if m is None:
        raise MelayerError(f"GSM8K answer without '#### N': {answer[-80:]!r}")
    return normalize_number(m.group(1))


def normalize_number(text: str) -> str:
    """'1,000' -> '1000', '3.50' -> '3.5', '7.0' -> '7': exact match on the number, not its spelling."""
    text = text.replace(",", "").strip()
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("", "-", "-0"):
        text = "0"
    return text


def final_answer(completion: str) -> Optional[str]:
    """The model's final number: the last ``#### N`` or ``\\boxed{N}``, else the last number in the text."""
    marked = [(m.start(), m.group(1)) for rx in (_HASH_ANSWER, _BOXED_ANSWER) for m in rx.finditer(completion)]
    if marked:
        return normalize_number(max(marked)[1])
    numbers = _ANY_NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def has_answer_format(completion: str) -> bool:
    """True when the final answer is stated as asked: a last line ``#### N`` or a ``\\boxed{N}``."""
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    return bool(lines and _FORMAT_LAST_LINE.match(lines[-1])) or bool(_BOXED_ANSWER.search(completion))


def user_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]


def sft_rows(rows: list[dict]) -> list[dict]:
    """Conversational prompt/completion rows: the loss is on the answer only (calculator notes removed)."""
    return [{"prompt": user_prompt(r["question"]),
             "completion": [{"role": "assistant", "content": _CALCULATOR.sub("", r["answer"]).strip()}]}
            for r in rows]


def grpo_rows(rows: list[dict]) -> list[dict]:
    """Conversational prompts with the gold number in a ``gold`` column (passed to the reward functions)."""
    return [{"prompt": user_prompt(r["question"]), "gold": gold_number(r["answer"])} for r in rows]


def _text(completion) -> str:
    """TRL passes conversational completions as message lists, plain ones as strings."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def correctness_reward(prompts, completions, gold, **kwargs) -> list[float]:
    """1 when the final number equals the gold number exactly (after normalisation), else 0."""
    return [float(final_answer(_text(c)) == g) for c, g in zip(completions, gold)]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 when the final answer is given as ``#### N`` on the last line or as ``\\boxed{N}``, else 0."""
    return [float(has_answer_format(_text(c))) for c in completions]


def subset(rows: list[dict], limit: Optional[int], seed: int) -> list[dict]:
    """A seeded random subset (the same for a baseline and its WeMask run)."""
    if limit is None or limit >= len(rows):
        return rows
    import random

    idx = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in idx]
