"""Benchmark and training data from a local folder (the layout of ``shared/data``) or else the Hugging Face Hub.

Every loader returns plain dict rows with a stable string ``id``; local and hub rows are normalised to the
same fields, so evaluation and training never care where data came from. ``datasets`` (hub) and ``pandas``
(AIME's parquet) are imported only when needed.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import MelayerError
from .io import read_jsonl

# task data name -> (hub dataset, config, split)
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "gsm8k_train": ("openai/gsm8k", "main", "train"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "aime24": ("Maxwell-Jia/AIME_2024", None, "train"),
    "aime": ("AI-MO/aimo-validation-aime", None, "train"),
    "ifeval": ("google/IFEval", None, "train"),
    "mmlu": ("cais/mmlu", "all", "test"),
    "mmlu_dev": ("cais/mmlu", "all", "dev"),
    "xstest": ("walledai/XSTest", None, "test"),
    "advbench": ("walledai/AdvBench", None, "train"),
    "harmbench": ("walledai/HarmBench", "standard", "train"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
}


def _hub_rows(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise MelayerError("loading from the Hugging Face Hub needs `datasets` (pip install -r requirements/eval.txt),"
                           " or pass --data-dir") from None
    path, config, split = HUB[name]
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # network, auth, missing dataset: one line for the user
        raise MelayerError(f"cannot load {path} from the hub ({type(e).__name__}: {e}); pass --data-dir") from None
    return [dict(r) for r in ds]


_READ: set[Path] = set()  # every local data file this process read: their checksums go into provenance.json


def files_read() -> list[Path]:
    return sorted(_READ)


def _local(data_dir: Path, rel: str) -> Path:
    path = data_dir / rel
    if not path.exists():
        raise MelayerError(f"data file missing: {path} (expected the layout of shared/data, see its MANIFEST.md)")
    if path.is_file():
        _READ.add(path.resolve())
    return path


def _csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_gsm8k(data_dir: Optional[Path], split: str = "test") -> list[dict]:
    """GSM8K rows ``{"id", "question", "answer"}`` (the answer ends in ``#### N``); ``split`` test or train."""
    if data_dir is None:
        rows = _hub_rows("gsm8k" if split == "test" else f"gsm8k_{split}")
        where = "the hub"
    else:
        path = _local(data_dir, f"gsm8k/{split}.jsonl")
        rows, where = read_jsonl(path), str(path)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or "####" not in str(r.get("answer")):
            raise MelayerError(f"{where}: row {i + 1} is not a GSM8K row (a 'question' and an 'answer' ending in "
                               "'#### N')")
        out.append({"id": f"{split}-{i}", "question": r["question"], "answer": r["answer"]})
    if not out:
        raise MelayerError(f"{where}: no GSM8K rows")
    return out


def load_gsm8k_train(data_dir: Optional[Path]) -> list[dict]:
    return load_gsm8k(data_dir, "train")


def load_math500(data_dir: Optional[Path]) -> list[dict]:
    rows = read_jsonl(_local(data_dir, "math500/test.jsonl")) if data_dir else _hub_rows("math500")
    return [{"id": r["unique_id"], "problem": r["problem"], "answer": r["answer"]} for r in rows]


def _aime_local(data_dir: Path, years: tuple[str, ...]) -> list[dict]:
    try:
        import pandas as pd
    except ImportError:
        raise MelayerError("reading AIME's parquet file needs pandas and pyarrow "
                           "(pip install -r requirements/eval.txt)") from None
    frame = pd.read_parquet(_local(data_dir, "aime/aime_2022_2024.parquet"))
    rows = [r for r in frame.to_dict(orient="records") if any(f"{y}_AIME" in str(r["url"]) for y in years)]
    return [{"id": str(r["url"]).rsplit("/", 2)[-2].replace("_Problems", "") + "-" + str(r["url"]).rsplit("_", 1)[-1],
             "problem": r["problem"], "answer": str(r["answer"])} for r in rows]


def load_aime24(data_dir: Optional[Path]) -> list[dict]:
    """AIME 2024 (30 problems)."""
    if data_dir:
        return _aime_local(data_dir, ("2024",))
    return [{"id": str(r["ID"]), "problem": r["Problem"], "answer": str(r["Answer"])} for r in _hub_rows("aime24")]


def load_aime(data_dir: Optional[Path]) -> list[dict]:
    """AIME 2022, 2023 and 2024 (90 problems): the set of the paper's official evaluation."""
    if data_dir:
        return _aime_local(data_dir, ("2022", "2023", "2024"))
    return [{"id": str(r["id"]), "problem": r["problem"], "answer": str(r["answer"])} for r in _hub_rows("aime")]


def load_ifeval(data_dir: Optional[Path]) -> list[dict]:
    rows = read_jsonl(_local(data_dir, "ifeval/input_data.jsonl")) if data_dir else _hub_rows("ifeval")
    return [{"id": str(r["key"]), "prompt": r["prompt"], "instruction_id_list": list(r["instruction_id_list"]),
             "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]]} for r in rows]


def _mmlu_local(data_dir: Path, split: str) -> list[dict]:
    folder = _local(data_dir, f"mmlu/{split}")
    out = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        _READ.add(path.resolve())
        subject = path.name[: -len(f"_{split}.csv")]
        for i, r in enumerate(_csv(path)):
            out.append({"id": f"{subject}-{i}", "subject": subject, "question": r["question"],
                        "choices": [r[f"choice{j}"] for j in range(4)], "answer": int(r["answer"])})
    return out


def _mmlu_hub(name: str) -> list[dict]:
    out, seen = [], {}
    for r in _hub_rows(name):
        i = seen.get(r["subject"], 0)
        seen[r["subject"]] = i + 1
        out.append({"id": f"{r['subject']}-{i}", "subject": r["subject"], "question": r["question"],
                    "choices": list(r["choices"]), "answer": int(r["answer"])})
    return out


def load_mmlu(data_dir: Optional[Path]) -> list[dict]:
    return _mmlu_local(data_dir, "test") if data_dir else _mmlu_hub("mmlu")


def load_mmlu_dev(data_dir: Optional[Path]) -> list[dict]:
    """The 5 dev examples per subject used as few-shot context (the official MMLU protocol)."""
    return _mmlu_local(data_dir, "dev") if data_dir else _mmlu_hub("mmlu_dev")


def load_xstest(data_dir: Optional[Path]) -> list[dict]:
    if data_dir:
        rows = _csv(_local(data_dir, "xstest/xstest_prompts.csv"))
        return [{"id": str(r["id"]), "prompt": r["prompt"], "label": r["label"], "type": r["type"]} for r in rows]
    return [{"id": str(i + 1), "prompt": r["prompt"], "label": r["label"], "type": r["type"]}
            for i, r in enumerate(_hub_rows("xstest"))]


def load_advbench(data_dir: Optional[Path]) -> list[dict]:
    if data_dir:
        return [{"id": str(i), "prompt": r["goal"]} for i, r in enumerate(_csv(_local(data_dir,
                                                                                         "advbench/harmful_behaviors.csv")))]
    return [{"id": str(i), "prompt": r["prompt"]} for i, r in enumerate(_hub_rows("advbench"))]


def load_harmbench(data_dir: Optional[Path]) -> list[dict]:
    """Standard and contextual behaviours (copyright ones ask for lyrics/book passages, not harm: left out);
    a contextual behaviour is shown after its context, as HarmBench does."""
    if not data_dir:
        return [{"id": str(i), "prompt": r["prompt"]} for i, r in enumerate(_hub_rows("harmbench"))]
    out = []
    for r in _csv(_local(data_dir, "harmbench/harmbench_behaviors_text_all.csv")):
        if r["FunctionalCategory"] not in ("standard", "contextual"):
            continue
        prompt = r["Behavior"]
        if r["ContextString"].strip():
            prompt = f"{r['ContextString']}\n\n---\n\n{prompt}"
        out.append({"id": r["BehaviorID"], "prompt": prompt})
    return out


def load_wikitext2(data_dir: Optional[Path]) -> list[dict]:
    """The whole test split as one text (windows are cut after tokenisation)."""
    if data_dir:
        text = _local(data_dir, "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    else:
        text = "".join(r["text"] for r in _hub_rows("wikitext2"))
    return [{"id": "wiki.test", "text": text}]


REFUSAL_KINDS = ("harmful", "harmless")
REFUSAL_SPLITS = ("val", "test")


def load_refusal(data_dir: Optional[Path], kind: str, split: str) -> list[dict]:
    """Instruction-only prompts ``{"id", "prompt", "category"}`` of ``refusal/{kind}_{split}.json`` (the
    refusal-direction sets: harmful vs harmless Alpaca instructions).

    ``val`` (39 harmful, 6,264 harmless) is what training data is built from (``melayer data preferences``,
    ``melayer train dpo --data refusal``); ``test`` (572 / 6,266) stays held out for evaluation. There is no hub
    copy of these files: they need ``--data-dir``.
    """
    if kind not in REFUSAL_KINDS or split not in REFUSAL_SPLITS:
        raise MelayerError(f"refusal prompts are {'/'.join(REFUSAL_KINDS)} x {'/'.join(REFUSAL_SPLITS)}, "
                           f"got {kind}_{split}")
    if data_dir is None:
        raise MelayerError("the refusal prompt sets have no Hugging Face Hub copy: pass --data-dir (a folder with "
                           "refusal/{harmful,harmless}_{val,test}.json, the layout of shared/data)")
    path = _local(data_dir, f"refusal/{kind}_{split}.json")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MelayerError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("instruction"), str)
                                             and r["instruction"].strip() for r in rows):
        raise MelayerError(f"{path}: expected a JSON list of objects with a non-empty 'instruction'")
    return [{"id": f"{kind}_{split}-{i}", "prompt": r["instruction"], "category": r.get("category")}
            for i, r in enumerate(rows)]


def _refusal_loader(kind: str, split: str) -> Callable[[Optional[Path]], list[dict]]:
    return lambda data_dir: load_refusal(data_dir, kind, split)


LOADERS: dict[str, Callable[[Optional[Path]], list[dict]]] = {
    "gsm8k": load_gsm8k, "gsm8k_train": load_gsm8k_train, "math500": load_math500, "aime24": load_aime24,
    "aime": load_aime, "ifeval": load_ifeval,
    "mmlu": load_mmlu, "mmlu_dev": load_mmlu_dev, "xstest": load_xstest, "advbench": load_advbench,
    "harmbench": load_harmbench, "wikitext2": load_wikitext2,
    **{f"refusal_{k}_{s}": _refusal_loader(k, s) for k in REFUSAL_KINDS for s in REFUSAL_SPLITS},
}


def load(name: str, data_dir: Optional[str | Path]) -> list[dict]:
    data = Path(data_dir) if data_dir else None
    if data is not None and not data.is_dir():
        raise MelayerError(f"--data-dir {data} is not a folder")
    return LOADERS[name](data)


def select(items: Sequence[dict], limit: Optional[int], seed: int) -> list[dict]:
    """A deterministic subset of ``limit`` items drawn with ``seed``, in the data's order (all items if no limit).

    It depends only on the item count, the limit and the seed, so every rate sees the very same items.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise MelayerError(f"--limit must be at least 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
