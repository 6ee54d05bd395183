"""GSM8K for training: chat-formatted rows, the GRPO rewards (rows come from :func:`melayer.data.load_gsm8k`), and
the count of rows TRL truncates or drops at ``max_length`` (:func:`count_overlong`).

Prompts are exactly ``melayer eval``'s GSM8K prompts (the question, then "Please reason step by step,
and put your final answer within \\boxed{}."), so a trained model is evaluated on what it learnt.
Answer format taught by SFT: GSM8K's worked solution (calculator notes removed) whose ``#### N`` last
line becomes ``The final answer is \\boxed{N}.``. GRPO's format reward accepts a ``\\boxed{N}`` or a
last line ``#### N``; its correctness reward extracts the final number with ``melayer eval``'s scorer.
"""
from __future__ import annotations

import re

from ..evaluate.scorers import extract_gsm8k, gsm8k_gold, numbers_equal

# the prompt of lm-eval task melayer_gsm8k (its doc_to_text; a test holds the two together)
GSM8K_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
_NUMBER = r"-?\$?[\d,]*\.?\d+"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24
_FINAL_LINE = re.compile(r"\n?####\s*(.+?)\s*$")
_BOXED_NUMBER = re.compile(r"\\boxed\{\s*" + _NUMBER + r"\s*\}")
_HASH_LAST_LINE = re.compile(r"^\s*####\s*" + _NUMBER + r"\s*\.?\s*$")


def has_answer_format(completion: str) -> bool:
    """True when the final answer is stated as asked: a ``\\boxed{N}`` or a last line ``#### N``."""
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    return bool(_BOXED_NUMBER.search(completion)) or bool(lines and _HASH_LAST_LINE.match(lines[-1]))


def sft_target(answer: str) -> str:
    """A GSM8K solution as the answer we teach: no calculator notes, final number in ``\\boxed{}``."""
    gold = gsm8k_gold(answer)
    body = _FINAL_LINE.sub("", _CALCULATOR.sub("", answer).strip()).strip()
    return f"{body}\nThe final answer is \\boxed{{{gold}}}."


def user_prompt(row: dict) -> list[dict]:
    return [{"role": "user", "content": GSM8K_PROMPT.format(question=row["question"])}]


def sft_rows(rows: list[dict]) -> list[dict]:
    """Conversational prompt/completion rows: the loss is on the answer only."""
    return [{"prompt": user_prompt(r), "completion": [{"role": "assistant", "content": sft_target(r["answer"])}]}
            for r in rows]


def grpo_rows(rows: list[dict]) -> list[dict]:
    """Conversational prompts with the gold number in a ``gold`` column (passed to the reward functions)."""
    return [{"prompt": user_prompt(r), "gold": gsm8k_gold(r["answer"])} for r in rows]


def _text(completion) -> str:
    """TRL passes conversational completions as message lists, plain ones as strings."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def correctness_reward(prompts, completions, gold, **kwargs) -> list[float]:
    """1 when the final number (``melayer eval``'s GSM8K extraction) equals the gold as a decimal, else 0."""
    return [float(numbers_equal(extract_gsm8k(_text(c)), g)) for c, g in zip(completions, gold)]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 when the final answer is given as ``\\boxed{N}`` or as a last line ``#### N``, else 0."""
    return [float(has_answer_format(_text(c))) for c in completions]


def _token_ids(tokenizer, value, generation_prompt: bool = False) -> list[int]:
    """Token ids as TRL's dataset preparation makes them: chats through the chat template, text as is."""
    if isinstance(value, list):
        return list(tokenizer.apply_chat_template(value, tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation_prompt)["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def count_overlong(rows: list[dict], tokenizer, max_length: int, completions=("completion",)) -> tuple[int, int]:
    """``(truncated, dropped)``: rows TRL 1.16 cuts at ``max_length`` and rows it silently drops.

    TRL (SFT and DPO alike) tokenises the prompt (with the generation prompt) and prompt + completion, takes the
    completion to start where the two diverge, keeps the first ``max_length`` tokens of each sequence, and drops
    a row whose prompt alone fills ``max_length`` (no completion token left to learn from). A row is truncated
    when any of its prompt + completion sequences (DPO: chosen, rejected) is longer, and is not dropped.
    Plain-text DPO completions get the EOS token TRL appends.
    """
    from trl.data_utils import common_prefix_length

    eos = tokenizer.eos_token or ""
    truncated = dropped = 0
    for row in rows:
        prompt = _token_ids(tokenizer, row["prompt"], generation_prompt=True)
        full = []
        for key in completions:
            completion = row[key]
            if isinstance(completion, str) and len(completions) > 1 and not completion.endswith(eos):
                completion += eos
            full.append(_token_ids(tokenizer, row["prompt"] + completion))
        prompt_len = min(common_prefix_length(prompt, ids) for ids in full)
        if prompt_len >= max_length:
            dropped += 1
        elif any(len(ids) > max_length for ids in full):
            truncated += 1
    return truncated, dropped
