"""Which activations are massive, and which block is the ME (Massive Emergence) layer.

Criterion (Sun et al. 2024): |a| > ``abs_threshold`` and |a| > ``ratio`` × the median |h| of that
hidden state (one block output of one prompt, over its real tokens and all dims).

*Persists*: an event (token position p, dim d) that is massive at block i persists if it is still
massive at (p, d) in at least ``persist_fraction`` of blocks i … L-1. The fraction (not "every block")
tolerates the last blocks, which in many models shrink the value before the final norm.
The **ME layer** is the first block whose output carries a persistent massive event. Earlier *spikes*
(|a| > ``abs_threshold`` and > ``spike_ratio`` × median) that do not persist are reported as transient.
All block indices are 0-based; block i's output is ``output_hidden_states[i + 1]``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from .capture import LayerStats


@dataclass(frozen=True)
class MassiveCriterion:
    abs_threshold: float = 100.0
    ratio: float = 1000.0
    spike_ratio: float = 100.0
    persist_fraction: float = 0.8

    def __post_init__(self):
        from .errors import MelayerError

        if self.abs_threshold <= 0 or self.ratio <= 0 or self.spike_ratio <= 0:
            raise MelayerError("massive-activation thresholds must be positive")
        if not 0 < self.persist_fraction <= 1:
            raise MelayerError("persist_fraction must be in (0, 1]")


@dataclass
class Event:
    """A (token, dim) that is massive (or a spike) over a run of blocks of one prompt."""

    pos: int  # token position relative to the first real token
    dim: int
    start: int  # first block where it appears
    end: int  # last block where it is still present
    peak: float
    peak_block: int
    fraction: float  # share of blocks start..L-1 where it meets the criterion
    persistent: bool
    kind: str  # "massive" or "spike"


def _elements(stats: LayerStats, b: int, threshold: float) -> dict[tuple[int, int], float]:
    vals, pos, dims = stats.top_values[b], stats.top_pos[b], stats.top_dims[b]
    keep = vals > threshold
    return {(int(p), int(d)): float(v) for v, p, d in zip(vals[keep], pos[keep], dims[keep])}


def _runs(present: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b] of consecutive True values."""
    runs, a = [], None
    for j, p in enumerate(list(present) + [False]):
        if p and a is None:
            a = j
        elif not p and a is not None:
            runs.append((a, j - 1))
            a = None
    return runs


def prompt_events(layers: Sequence[LayerStats], b: int, criterion: MassiveCriterion) -> list[Event]:
    """Massive and spike events of sequence ``b`` (one prompt): persistent ones first, then transients."""
    n = len(layers)
    massive, spikes = [], []
    for stats in layers:
        median = float(stats.median_abs[b])
        massive.append(_elements(stats, b, max(criterion.abs_threshold, criterion.ratio * median)))
        spikes.append(_elements(stats, b, max(criterion.abs_threshold, criterion.spike_ratio * median)))
    events: list[Event] = []
    for key in sorted({k for block in spikes for k in block}):
        is_massive = [key in block for block in massive]
        persistent_start = next(
            (i for i, _ in _runs(is_massive) if sum(is_massive[i:]) / (n - i) >= criterion.persist_fraction), n)
        if persistent_start < n:
            i = persistent_start
            events.append(_event(key, i, max(j for j in range(n) if is_massive[j]), spikes,
                                 sum(is_massive[i:]) / (n - i), True, "massive"))
        for a, z in _runs([key in block for block in spikes[:persistent_start]]):
            kind = "massive" if any(is_massive[a:z + 1]) else "spike"
            events.append(_event(key, a, z, spikes, (z - a + 1) / (n - a), False, kind))
    events.sort(key=lambda e: (not e.persistent, e.start, -e.peak))
    return events


def _event(key, start, end, spikes, fraction, persistent, kind) -> Event:
    values = {j: spikes[j][key] for j in range(start, end + 1) if key in spikes[j]}
    peak_block = max(values, key=values.get)
    return Event(pos=key[0], dim=key[1], start=start, end=end, peak=values[peak_block], peak_block=peak_block,
                 fraction=fraction, persistent=persistent, kind=kind)


def me_layer_of(events: Sequence[Event]) -> Optional[int]:
    starts = [e.start for e in events if e.persistent]
    return min(starts) if starts else None


def consensus(me_layers: Sequence[Optional[int]]) -> tuple[Optional[int], float]:
    """The most common per-prompt ME layer and the share of prompts that agree with it."""
    found = [m for m in me_layers if m is not None]
    if not found:
        return None, 0.0
    layer, count = Counter(found).most_common(1)[0]
    return layer, count / len(me_layers)
