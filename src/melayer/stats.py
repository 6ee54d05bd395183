"""Uncertainty: Wilson intervals, exact McNemar, (paired) bootstrap of ratio metrics, Holm; shared by eval and explain.

Every metric is a ratio of sums over items (accuracy: sum(correct)/n; instruction-level accuracy:
sum(followed)/sum(instructions); perplexity: exp(sum NLL / sum tokens)), so one bootstrap over items
covers them all, and pairing by item compares two rates on the very same items.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
N_BOOT = 2000  # bootstrap resamples: a bootstrap p of 0 means p < 1 / N_BOOT


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (good coverage even near 0 or 1 and for small n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k <= 0 else max(0.0, centre - half), 1.0 if k >= n else min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A right) and c (only B right):
    a binomial test of b against Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _value(num: np.ndarray, den: np.ndarray, exp: bool) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num.sum(axis=-1) / den.sum(axis=-1)
    return np.exp(r) if exp else r


def ratio_value(num: Sequence[float], den: Sequence[float], exp: bool = False) -> float:
    return float(_value(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64), exp))


def _resample_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(num: Sequence[float], den: Sequence[float], exp: bool = False, n_boot: int = N_BOOT,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num)/sum(den) (exp'd for perplexity), resampling items."""
    num_a, den_a = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(num_a) == 0:
        return (float("nan"), float("nan"))
    idx = _resample_index(len(num_a), n_boot, seed)
    vals = _value(num_a[idx], den_a[idx], exp)
    return (float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2)))


def paired_bootstrap_diff(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                          den_b: Sequence[float], exp: bool = False, n_boot: int = N_BOOT, seed: int = 0,
                          alpha: float = 0.05) -> dict:
    """Difference B - A on the same items: point value, percentile CI and a two-sided bootstrap p-value
    (twice the smaller share of resampled differences on either side of 0)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("paired bootstrap needs equally long, non-empty per-item arrays")
    diff = float(_value(arrays[2], arrays[3], exp) - _value(arrays[0], arrays[1], exp))
    idx = _resample_index(n, n_boot, seed)
    d = _value(arrays[2][idx], arrays[3][idx], exp) - _value(arrays[0][idx], arrays[1][idx], exp)
    p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"diff": diff, "ci": (float(np.quantile(d, alpha / 2)), float(np.quantile(d, 1 - alpha / 2))), "p": p}


def discordant(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """(b, c) of McNemar's table for paired 0/1 outcomes: items only A got right, items only B got right."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b


def score_ci(num: Sequence[float], den: Sequence[float], binary: bool, exp: bool,
             seed: int = 0) -> tuple[float, tuple[float, float], str]:
    """(value, 95% CI, method): Wilson for 0/1 items, item bootstrap otherwise."""
    value = ratio_value(num, den, exp)
    if binary:
        return value, wilson(sum(num), len(num)), "wilson"
    return value, bootstrap_ci(num, den, exp, seed=seed), "bootstrap"


def paired_test(base: tuple[Sequence[float], Sequence[float]], other: tuple[Sequence[float], Sequence[float]],
                binary: bool, exp: bool, seed: int = 0) -> dict:
    """Paired comparison of ``other`` against ``base`` on the same items (already aligned)."""
    out = paired_bootstrap_diff(base[0], base[1], other[0], other[1], exp=exp, seed=seed)
    result = {"n_paired": len(base[0]), "diff": out["diff"], "diff_ci": out["ci"], "bootstrap_p": out["p"],
              "mcnemar_p": None, "only_base": None, "only_other": None}
    if binary:
        b, c = discordant(base[0], other[0])
        result.update(mcnemar_p=mcnemar_exact(b, c), only_base=b, only_other=c)
    return result


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-Bonferroni adjusted p-values (None stays None). A sweep makes dozens of paired comparisons, so a few
    raw p < 0.05 are expected by chance; the adjusted p controls the family-wise error under any dependence."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * float(pvalues[i])))
        out[i] = running
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
    """The median of the per-pair ratios num[i] / den[i] and its percentile bootstrap CI (pairs resampled).

    For timings run in alternating pairs (with / without a feature): a drift that slows both runs of a pair
    cancels in its ratio, where a ratio of the two medians keeps it.
    """
    r = np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)
    if len(r) == 0:
        return float("nan"), (float("nan"), float("nan"))
    vals = np.median(r[_resample_index(len(r), n_boot, seed)], axis=1)
    return float(np.median(r)), (float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2)))


def target_verdict(ci: Sequence[float], target: float) -> str:
    """An overhead CI against an upper target: "met" (the whole CI at or below it), "missed" (wholly above it) or
    "not shown" (the CI straddles it: more repeats, not a verdict)."""
    lo, hi = ci
    return "met" if hi <= target else "missed" if lo > target else "not shown"


def fmt_ci(ci: Optional[Sequence[float]]) -> str:
    if ci is None or any(v is None or v != v for v in ci):
        return "–"
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]"
