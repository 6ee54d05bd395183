"""Claims with uncertainty: an estimate over prompts (or windows), its 95% bootstrap CI, a pre-stated threshold,
and a verdict that says "inconclusive" whenever the interval straddles the threshold.

A claim may rest on several tests (say, a co-occurrence and a causal test); it holds when every test holds,
does not hold when any test fails, and is inconclusive otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..stats import bootstrap_ci

VERDICTS = ("holds", "does_not_hold", "inconclusive")


@dataclass
class Check:
    """One measured quantity against its threshold. ``direction`` ">=": the claim needs the value at or above
    the threshold (holds when the whole CI is above it); "<=": at or below (holds when the whole CI is below)."""

    name: str
    estimate: Optional[float]
    ci: list[Optional[float]]
    n: int
    threshold: float
    direction: str
    verdict: str

    @classmethod
    def measure(cls, name: str, values: Sequence[float], threshold: float, direction: str = ">=",
                weights: Optional[Sequence[float]] = None, seed: int = 0) -> "Check":
        """The (weighted) mean of per-prompt ``values`` with its percentile-bootstrap CI over prompts."""
        pairs = [(float(v), float(w)) for v, w in zip(values, weights or [1.0] * len(values)) if v == v and w > 0]
        if not pairs:
            return cls(name, None, [None, None], 0, threshold, direction, "inconclusive")
        num = [v * w for v, w in pairs]
        den = [w for _, w in pairs]
        estimate = sum(num) / sum(den)
        lo, hi = bootstrap_ci(num, den, seed=seed) if len(pairs) > 1 else (estimate, estimate)
        return cls(name, estimate, [lo, hi], len(pairs), threshold, direction, verdict(lo, hi, threshold, direction))


def verdict(lo: Optional[float], hi: Optional[float], threshold: float, direction: str) -> str:
    if lo is None or hi is None or lo != lo or hi != hi:
        return "inconclusive"
    above, below = lo > threshold, hi < threshold
    if direction == ">=":
        return "holds" if above else "does_not_hold" if below else "inconclusive"
    return "holds" if below else "does_not_hold" if above else "inconclusive"


@dataclass
class Claim:
    """One statement of the paper, measured. ``estimate``/``ci``/``n``/``threshold`` are the first test's."""

    id: str
    statement: str
    estimate: Optional[float]
    ci: list[Optional[float]]
    n: int
    threshold: float
    verdict: str
    unit: str  # what the estimate measures
    rule: str  # the decision rule, stated in full
    scope: str  # where it was measured (block, layer set, rate, prompts)
    tests: list[Check] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # supporting numbers (not deciding)
    note: str = ""


def make_claim(id: str, statement: str, tests: Sequence[Check], unit: str, rule: str, scope: str,
               details: Optional[dict] = None, note: str = "") -> Claim:
    verdicts = [t.verdict for t in tests]
    combined = ("does_not_hold" if "does_not_hold" in verdicts else
                "holds" if verdicts and all(v == "holds" for v in verdicts) else "inconclusive")
    first = tests[0]
    return Claim(id=id, statement=statement, estimate=first.estimate, ci=first.ci, n=first.n,
                 threshold=first.threshold, verdict=combined, unit=unit, rule=rule, scope=scope, tests=list(tests),
                 details=details or {}, note=note)


def not_measured(id: str, statement: str, unit: str, rule: str, scope: str, threshold: float, why: str) -> Claim:
    """A claim that could not be measured here (n = 0): inconclusive, with the reason."""
    test = Check(id, None, [None, None], 0, threshold, ">=", "inconclusive")
    return make_claim(id, statement, [test], unit, rule, scope, note=why)
