"""Data loaders and scorers of melayer's lm-eval tasks (the YAML files beside this one).

Every loader is a ``custom_dataset`` function: lm-eval calls it with the task's metadata and ``dataset_kwargs``
(``--metadata '{"data_dir": ...}'`` on lm-eval's command line, ``TaskManager(metadata=...)`` from Python, which is
what ``melayer eval --data-dir`` does). With a ``data_dir`` (the layout of ``shared/data``) the files are read
offline; without one the same data comes from the Hugging Face Hub. Scoring is melayer's: one final number for
GSM8K, the last ``\\boxed{}`` under math-verify for MATH/AIME, documented string matching for refusals, lm-eval's
IFEval checkers with offline sentence splitting.
"""
from __future__ import annotations

import re
from pathlib import Path

import datasets

from melayer import data
from melayer.evaluate import scorers

LETTERS = "ABCD"
MMLU_SYSTEM = ("You are a helpful assistant for multiple choice QA. Answer with the single letter of the correct "
               "option.")  # the official MMLU evaluation's system message


def _dd(rows: list[dict], split: str = "test") -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _dir(data_dir):
    return Path(data_dir).expanduser() if data_dir else None


# -- math --------------------------------------------------------------------------------------------------

def load_gsm8k(data_dir=None, **_):
    return _dd(data.load("gsm8k", _dir(data_dir)))


def gsm8k_gold(doc) -> str:
    return scorers.gsm8k_gold(doc["answer"])


def gsm8k_process_results(doc, results):
    pred = scorers.extract_gsm8k(results[0])
    return {"exact_match": float(scorers.numbers_equal(pred, scorers.gsm8k_gold(doc["answer"])))}


def load_math500(data_dir=None, **_):
    return _dd(data.load("math500", _dir(data_dir)))


def load_aime24(data_dir=None, **_):
    return _dd(data.load("aime24", _dir(data_dir)))


def load_aime(data_dir=None, **_):
    """AIME 2022-2024 (90 problems), the official evaluation's set."""
    return _dd(data.load("aime", _dir(data_dir)))


def math_process_results(doc, results):
    return {"math_verify": float(scorers.math_equal(scorers.last_boxed(results[0]), doc["answer"]))}


# -- instruction following -----------------------------------------------------------------------------------

def load_ifeval(data_dir=None, **_):
    return _dd(data.load("ifeval", _dir(data_dir)))


def ifeval_process_results(doc, results):
    from melayer.evaluate.ifeval import score_ifeval

    r = score_ifeval(doc["prompt"], doc["instruction_id_list"], doc["kwargs"], results[0])
    return {"prompt_level_strict_acc": float(r["prompt_strict"]), "prompt_level_loose_acc": float(r["prompt_loose"]),
            "inst_level_strict_acc": [float(x) for x in r["inst_strict"]],
            "inst_level_loose_acc": [float(x) for x in r["inst_loose"]]}


def inst_level_acc(items) -> float:
    flat = [x for item in items for x in item]
    return sum(flat) / len(flat) if flat else float("nan")


# -- refusal ---------------------------------------------------------------------------------------------------

def _refusal_rows(rows, classifier: str) -> datasets.DatasetDict:
    """Each row names the refusal classifier its ``refusal`` metric uses (lm-eval hands metadata to loaders only);
    ``rows`` is called after the name is checked, so an unknown one fails before any data is read."""
    scorers.refusal_classifier(classifier)
    return _dd([{**r, "classifier": classifier} for r in rows()])


def load_xstest(data_dir=None, label=None, refusal_classifier="prefix", **_):
    """``label`` (safe / unsafe, from the YAML's dataset_kwargs) keeps one half."""
    return _refusal_rows(lambda: [r for r in data.load("xstest", _dir(data_dir)) if label is None or r["label"] == label],
                         refusal_classifier)


def load_advbench(data_dir=None, refusal_classifier="prefix", **_):
    return _refusal_rows(lambda: data.load("advbench", _dir(data_dir)), refusal_classifier)


def load_harmbench(data_dir=None, refusal_classifier="prefix", **_):
    return _refusal_rows(lambda: data.load("harmbench", _dir(data_dir)), refusal_classifier)


def load_harmless(data_dir=None, refusal_classifier="prefix", **_):
    """The held-out harmless instructions (refusal/harmless_test.json): over-refusal on benign requests."""
    return _refusal_rows(lambda: data.load("refusal_harmless_test", _dir(data_dir)), refusal_classifier)


def refusal_process_results(doc, results):
    """``refusal``: the run's classifier (XSTest's prefix match unless ``refusal_classifier`` says otherwise);
    ``refusal_substring``: the GCG list anywhere in the answer."""
    out = results[0]
    classify = scorers.refusal_classifier(doc.get("classifier", "prefix"))
    return {"refusal": float(classify(out)), "refusal_substring": float(scorers.refusal_substring(out))}


# -- MMLU (one task over the 57 subjects; the subject is in each prompt) ----------------------------------------

def load_mmlu(data_dir=None, shots=0, **_):
    """MMLU test rows; ``shots`` > 0 attaches that many dev examples of the same subject to each row."""
    rows = data.load("mmlu", _dir(data_dir))
    dev: dict[str, list[dict]] = {}
    if shots:
        for d in data.load("mmlu_dev", _dir(data_dir)):
            dev.setdefault(d["subject"], []).append(d)
    return _dd([{**r, "shots": dev.get(r["subject"], [])[:shots]} for r in rows])


def _block(q: dict, with_answer: bool, question_prefix: str = "") -> str:
    lines = [question_prefix + q["question"].strip()] + [f"{l}. {c}" for l, c in zip(LETTERS, q["choices"])]
    lines.append(f"Answer: {LETTERS[q['answer']]}" if with_answer else "Answer:")
    return "\n".join(lines)


def mmlu_text(doc) -> str:
    """The classic MMLU prompt: subject header, the subject's dev shots (if any), the question, "Answer:"."""
    head = f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
    return head + "".join(_block(s, True) + "\n\n" for s in doc["shots"]) + _block(doc, False)


def mmlu_paper_text(doc) -> str:
    """The official MMLU evaluation's user message (0-shot, "Question: " prefix, raw subject name)."""
    return (f"The following are multiple choice questions (with answers) about {doc['subject']}.\n\n"
            + _block(doc, False, "Question: "))


def mmlu_option_texts(doc) -> list[str]:
    """The paper's option-text protocol: " " + each option's text (target_delimiter "" keeps the space)."""
    return [" " + c for c in doc["choices"]]


# -- WikiText-2 (the raw test split cut into its articles) --------------------------------------------------------

_TITLE = re.compile(r"^ = [^=].* = $")


def load_wikitext2(data_dir=None, **_):
    text = data.load("wikitext2", _dir(data_dir))[0]["text"]
    pages, cur = [], []
    for line in text.splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")) and cur:
            pages.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        pages.append("".join(cur))
    return _dd([{"id": f"page-{i}", "page": p} for i, p in enumerate(pages) if p.strip()])
