"""The pre-registered analyses (benchmarks/confirmatory.py): the documents they drop and the one-sided tests."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")

from melayer.evaluate.runner import seeded_subset  # noqa: E402

SPEC = importlib.util.spec_from_file_location(
    "confirmatory", Path(__file__).resolve().parents[1] / "benchmarks" / "confirmatory.py")
confirmatory = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(confirmatory)


def test_dropped_mmlu_documents_are_the_ones_the_exploratory_run_scored():
    """The exploratory curves scored `--limit 500 --seed 0` of melayer_mmlu_paper: the runner's own draw."""
    drawn = seeded_subset({"melayer_mmlu_paper": 14042}, 500, 0)["melayer_mmlu_paper"]
    assert confirmatory.exploratory_docs() == set(drawn)
    assert confirmatory.exploratory_docs() != set(seeded_subset({"melayer_mmlu_paper": 14042}, 500, 1)
                                                  ["melayer_mmlu_paper"])


def _upper_tail(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


@pytest.mark.parametrize("direction", ["decrease", "increase"])
def test_one_sided_mcnemar_counts_the_right_discordant_pairs(direction):
    # 9 items go 1 -> 0, 3 go 0 -> 1, the rest agree
    base = np.array([1] * 9 + [0] * 3 + [1] * 20 + [0] * 30, dtype=float)
    other = np.array([0] * 9 + [1] * 3 + [1] * 20 + [0] * 30, dtype=float)
    got = confirmatory.mcnemar_one_sided(base, other, direction)
    assert (got["only_rate_0"], got["only_mask"], got["n"]) == (9, 3, 62)
    k = 9 if direction == "decrease" else 3
    assert got["p_one_sided"] == pytest.approx(_upper_tail(k, 12))
    assert got["diff"] == pytest.approx((3 - 9) / 62)


def test_second_overrefusal_test_sets_aside_the_first_tests_prompts():
    first = confirmatory.first_test_harmless_docs()
    assert first == set(seeded_subset({"melayer_harmless": 6266}, 2000, 1)["melayer_harmless"])
    assert len(first) == 2000 and confirmatory.HARMLESS_DOCS - len(first) == 4266
