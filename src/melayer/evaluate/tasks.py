"""The task registry: thin classes that build prompts, say how much to generate and score one output.

A task's ``gold(item)`` is everything its scorer needs, stored in each JSONL row, so ``--score-only``
works from the rows alone (no data files, no model).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from ..errors import MelayerError
from .. import data
from . import scorers
from .ifeval import score_ifeval
from .scorers import Score

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool = True
    exp: bool = False  # the value is exp(sum num / sum den) (perplexity from summed NLL)
    binary: bool = True  # each item contributes (0 or 1, 1): Wilson CI and McNemar apply


class Task:
    name: ClassVar[str]
    kind: ClassVar[str] = "generate"  # "generate" | "loglik" | "perplexity"
    data_name: ClassVar[str]
    max_new_tokens: ClassVar[int] = 0
    metrics: ClassVar[tuple[Metric, ...]]

    def items(self, data_dir: Optional[Path]) -> list[dict]:
        return data.load(self.data_name, data_dir)

    def prompt(self, item: dict) -> str:
        """The user message (before any chat template)."""
        raise NotImplementedError

    def gold(self, item: dict):
        raise NotImplementedError

    def score(self, gold, prompt: str, output) -> Score:
        raise NotImplementedError

    @property
    def primary(self) -> Metric:
        return self.metrics[0]


class GSM8K(Task):
    name, data_name, max_new_tokens = "gsm8k", "gsm8k", 512
    metrics = (Metric("exact_match"),)

    def prompt(self, item):
        return f"{item['question']}\n{BOXED_INSTRUCTION}"

    def gold(self, item):
        return scorers.gsm8k_gold(item["answer"])

    def score(self, gold, prompt, output):
        pred = scorers.extract_gsm8k(output)
        return Score(pred, {"exact_match": (float(scorers.numbers_equal(pred, gold)), 1.0)})


class Math500(Task):
    name, data_name, max_new_tokens = "math500", "math500", 1024
    metrics = (Metric("math_verify"),)

    def prompt(self, item):
        return f"{item['problem']}\n{BOXED_INSTRUCTION}"

    def gold(self, item):
        return item["answer"]

    def score(self, gold, prompt, output):
        pred = scorers.last_boxed(output)
        return Score(pred, {"math_verify": (float(scorers.math_equal(pred, gold)), 1.0)})


class AIME24(Math500):
    name, data_name, max_new_tokens = "aime24", "aime24", 2048


class IFEval(Task):
    name, data_name, max_new_tokens = "ifeval", "ifeval", 1280
    metrics = (Metric("prompt_strict"), Metric("prompt_loose"), Metric("inst_strict", binary=False),
               Metric("inst_loose", binary=False))

    def prompt(self, item):
        return item["prompt"]

    def gold(self, item):
        return {"instruction_id_list": item["instruction_id_list"], "kwargs": item["kwargs"]}

    def score(self, gold, prompt, output):
        r = score_ifeval(prompt, gold["instruction_id_list"], gold["kwargs"], output)
        n = float(len(r["inst_strict"]))
        return Score(r, {"prompt_strict": (float(r["prompt_strict"]), 1.0),
                         "prompt_loose": (float(r["prompt_loose"]), 1.0),
                         "inst_strict": (float(sum(r["inst_strict"])), n),
                         "inst_loose": (float(sum(r["inst_loose"])), n)})


class _Refusal(Task):
    """Refusal rate with the configured string-match classifier (``--refusal-classifier``)."""

    max_new_tokens = 128
    metrics = (Metric("refusal"),)
    classifier: str = "prefix"

    def prompt(self, item):
        return item["prompt"]

    def gold(self, item):
        return None

    def score(self, gold, prompt, output):
        refused = scorers.refusal_classifier(self.classifier)(output)
        return Score(refused, {self.primary.name: (float(refused), 1.0)})


class AdvBench(_Refusal):
    name = data_name = "advbench"


class HarmBench(_Refusal):
    name = data_name = "harmbench"


class XSTest(_Refusal):
    """Over-refusal on the 250 safe prompts (lower is better) and refusal on the 200 unsafe ones."""

    name = data_name = "xstest"
    metrics = (Metric("refusal_safe", higher_is_better=False), Metric("refusal_unsafe"))

    def gold(self, item):
        return item["label"]

    def score(self, gold, prompt, output):
        refused = scorers.refusal_classifier(self.classifier)(output)
        return Score(refused, {f"refusal_{gold}": (float(refused), 1.0)})


class MMLU(Task):
    """Letter log-likelihood: which of " A".." D" is most likely after "Answer:" (the official protocol)."""

    name, data_name, kind = "mmlu", "mmlu", "loglik"
    metrics = (Metric("acc"),)
    shots: ClassVar[int] = 0
    letter_mode: ClassVar[bool] = True

    def items(self, data_dir):
        items = data.load(self.data_name, data_dir)
        if self.shots:
            dev: dict[str, list[dict]] = {}
            for d in data.load("mmlu_dev", data_dir):
                dev.setdefault(d["subject"], []).append(d)
            for it in items:
                it["shots"] = dev.get(it["subject"], [])[: self.shots]
        return items

    @staticmethod
    def _block(q: dict, with_answer: bool) -> str:
        lines = [q["question"].strip()] + [f"{letter}. {c}" for letter, c in zip(scorers.LETTERS, q["choices"])]
        lines.append(f"Answer: {scorers.LETTERS[q['answer']]}" if with_answer else "Answer:")
        return "\n".join(lines)

    def prompt(self, item):
        subject = item["subject"].replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shots = "".join(self._block(s, True) + "\n\n" for s in item.get("shots", []))
        return head + shots + self._block(item, False)

    def continuations(self, item, chat: bool) -> list[str]:
        """Letters after "Answer:" (a space first unless a chat template already opened the reply), or, in
        option-text mode, " " + each option's text (the paper's protocol)."""
        if self.letter_mode:
            return [("" if chat else " ") + letter for letter in scorers.LETTERS]
        return [" " + c for c in item["choices"]]

    def gold(self, item):
        return item["answer"]

    def score(self, gold, prompt, output):
        pred = scorers.argmax_choice(output)
        return Score(scorers.LETTERS[pred], {"acc": (float(pred == gold), 1.0)})


class MMLU5Shot(MMLU):
    name, shots = "mmlu_5shot", 5


class MMLUText(MMLU):
    """The paper's option-text scoring: sum log-probability of each option's text, argmax."""

    name, letter_mode = "mmlu_text", False


class WikiText2(Task):
    """Perplexity over non-overlapping windows of the tokenised test split (items = windows)."""

    name, data_name, kind = "wikitext2", "wikitext2", "perplexity"
    metrics = (Metric("perplexity", higher_is_better=False, exp=True, binary=False),)

    def windows(self, items: list[dict], tokenizer, seq_len: int) -> list[dict]:
        ids = tokenizer(items[0]["text"], add_special_tokens=False)["input_ids"]
        n = len(ids) // seq_len
        return [{"id": f"window-{i}", "input_ids": ids[i * seq_len:(i + 1) * seq_len]} for i in range(n)]

    def prompt(self, item):
        return None

    def gold(self, item):
        return None

    def score(self, gold, prompt, output):
        return Score(None, {"perplexity": (float(output["nll"]), float(output["tokens"]))})


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (GSM8K, Math500, AIME24, IFEval, MMLU, MMLU5Shot, MMLUText,
                                                          XSTest, AdvBench, HarmBench, WikiText2)}


def get_task(name: str, refusal_classifier: str = "prefix") -> Task:
    if name not in TASKS:
        raise MelayerError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    task = TASKS[name]()
    if isinstance(task, _Refusal):
        scorers.refusal_classifier(refusal_classifier)  # fail early on a bad name
        task.classifier = refusal_classifier
    return task
