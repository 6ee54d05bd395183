"""Which activations are massive, how they emerge, and which block is the ME (Massive Emergence) layer.

Criterion (Sun et al. 2024): |a| > ``abs_threshold`` and |a| > ``ratio`` × the median |h| of that hidden
state (one block output of one prompt, over its real tokens and all dims). Values are followed per *carrier*
(the first token, the first delimiter, or the largest of the other tokens) and per dim, over every block.

*Persistence* is judged against the event itself: born massive at block i, it still *holds* at a later block
while it meets the criterion, or keeps at least ``keep_fraction`` of its own running peak (and the absolute
threshold), so a median that grows with depth does not erase a value that stays massive. It persists when it
holds in at least ``persist_fraction`` of blocks i … L-1 (the last blocks often shrink it before the norm).

*Emergence*: the per-block increments of the dominant persistent event, as shares of its peak value, say who
writes it. ``single``: one block writes at least ``single_share`` and no other block ``step_share``;
``multi_step``: several blocks write ``step_share`` or more (or one does, but less than ``single_share``);
``gradual``: no block writes ``step_share`` (massive early and growing over many blocks); ``none``: nothing
persists. The ME layer is the block that writes it (single) or the first of those that do (multi_step); a
gradual emergence has no ME layer. All block indices are 0-based; block i's output is
``output_hidden_states[i + 1]``; the paper counts from 1.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .capture import LayerStats
from .errors import MelayerError

CARRIERS = ("first", "delimiter", "other")  # which token a tracked value sits on
KINDS = ("single", "multi_step", "gradual", "none")


@dataclass(frozen=True)
class MassiveCriterion:
    abs_threshold: float = 100.0
    ratio: float = 1000.0
    spike_ratio: float = 100.0
    persist_fraction: float = 0.8
    keep_fraction: float = 0.5
    single_share: float = 0.5
    step_share: float = 0.25

    def __post_init__(self):
        if self.abs_threshold <= 0 or self.ratio <= 0 or self.spike_ratio <= 0:
            raise MelayerError("massive-activation thresholds must be positive")
        for name in ("persist_fraction", "keep_fraction", "single_share", "step_share"):
            if not 0 < getattr(self, name) <= 1:
                raise MelayerError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass
class Profile:
    """One prompt's tracked values: per block (L) and dim (D), for each carrier; index -1 = the embeddings."""

    values: dict[str, torch.Tensor]  # carrier -> (L + 1, D), row 0 = embeddings, row l + 1 = block l's output
    median: torch.Tensor  # (L + 1,) median |h| of each hidden state
    positions: dict[str, torch.Tensor]  # carrier -> (L + 1, D) token position of the value (relative to token 0)
    massive_count: torch.Tensor  # (L + 1,) entries meeting the criterion
    massive_tokens: torch.Tensor  # (L + 1,)
    nonfinite: torch.Tensor  # (L + 1,)

    @property
    def num_layers(self) -> int:
        return self.median.shape[0] - 1

    @classmethod
    def from_stats(cls, embedding: LayerStats, layers: Sequence[LayerStats], b: int = 0,
                   delimiter: int = -1) -> "Profile":
        """Sequence ``b`` of a capture; ``delimiter``: its first delimiter's position (-1: none)."""
        rows = [embedding, *layers]

        def stack(name: str) -> torch.Tensor:
            return torch.stack([getattr(s, name)[b] for s in rows]).float()

        first, delim, rest = stack("first"), stack("delim"), stack("rest_max_abs")
        zeros = torch.zeros_like(first, dtype=torch.long)
        others = torch.stack([s.rest_argmax[b] for s in rows]).long()
        return cls(values={"first": first, "delimiter": delim, "other": rest}, median=stack("median_abs"),
                   positions={"first": zeros, "delimiter": torch.full_like(zeros, delimiter), "other": others},
                   massive_count=stack("massive_count"), massive_tokens=stack("massive_tokens"),
                   nonfinite=stack("nonfinite"))

    def first_nonfinite_block(self) -> Optional[int]:
        """0-based block whose output first holds NaN/inf (-1: the embeddings already do), or None."""
        hit = (self.nonfinite > 0).nonzero()
        return int(hit[0]) - 1 if len(hit) else None


@dataclass
class Event:
    """A (carrier, dim) value that is massive (or a spike) over a run of blocks of one prompt."""

    carrier: str  # "first", "delimiter" or "other"
    pos: int  # token position relative to the first real token (for "other": the carrier at its birth)
    dim: int
    start: int  # first block where it appears
    end: int  # last block where it still holds
    peak: float  # largest |value| over start..end
    peak_block: int
    fraction: float  # share of blocks start..L-1 where it holds
    persistent: bool
    kind: str  # "massive" or "spike"


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


def _holds(v: list[float], start: int, massive: list[bool], criterion: MassiveCriterion) -> list[bool]:
    """From ``start`` on: the event still meets the criterion, or keeps ``keep_fraction`` of its running peak."""
    out, peak = [], 0.0
    for j in range(start, len(v)):
        peak = max(peak, v[j])
        out.append(massive[j] or (v[j] > criterion.abs_threshold and v[j] >= criterion.keep_fraction * peak))
    return out


def prompt_events(profile: Profile, criterion: MassiveCriterion) -> list[Event]:
    """Massive and spike events of one prompt: persistent ones first, then transients."""
    n = profile.num_layers
    median = profile.median[1:]
    massive_thr = torch.clamp(median * criterion.ratio, min=criterion.abs_threshold)
    spike_thr = torch.clamp(median * criterion.spike_ratio, min=criterion.abs_threshold)
    events: list[Event] = []
    for carrier in CARRIERS:
        a = profile.values[carrier][1:].abs()  # (L, D) block outputs
        a = torch.nan_to_num(a, nan=0.0, posinf=float("inf"))
        spiky = a > spike_thr[:, None]
        for d in spiky.any(0).nonzero().flatten().tolist():
            v = a[:, d].tolist()
            is_massive = (a[:, d] > massive_thr).tolist()
            is_spike = spiky[:, d].tolist()
            persistent_start = n
            for i, _ in _runs(is_massive):
                holds = _holds(v, i, is_massive, criterion)
                if sum(holds) / len(holds) >= criterion.persist_fraction:
                    persistent_start = i
                    end = i + max(j for j, h in enumerate(holds) if h)
                    events.append(_event(profile, carrier, d, v, i, end, sum(holds) / len(holds), True, "massive"))
                    break
            for s, z in _runs(is_spike[:persistent_start]):
                kind = "massive" if any(is_massive[s:z + 1]) else "spike"
                events.append(_event(profile, carrier, d, v, s, z, (z - s + 1) / (n - s), False, kind))
    events.sort(key=lambda e: (not e.persistent, e.start, -e.peak))
    return events


def _event(profile: Profile, carrier: str, dim: int, v: list[float], start: int, end: int, fraction: float,
           persistent: bool, kind: str) -> Event:
    peak_block = max(range(start, end + 1), key=lambda j: v[j])
    return Event(carrier=carrier, pos=int(profile.positions[carrier][start + 1, dim]), dim=dim, start=start, end=end,
                 peak=float(v[peak_block]), peak_block=peak_block, fraction=fraction, persistent=persistent, kind=kind)


@dataclass
class Emergence:
    """How the dominant persistent massive value of a model comes about (see the module docstring)."""

    kind: str  # single | multi_step | gradual | none
    me_layer: Optional[int]  # 0-based; None for gradual and none
    me_layer_1based: Optional[int]  # the paper's numbering
    first_massive_block: Optional[int]  # 0-based block where the dominant event is first massive
    carrier: Optional[str]  # first | delimiter | other: the token that carries it
    dim: Optional[int]
    shares: dict[int, float] = field(default_factory=dict)  # block -> share of the peak value it writes (|share| ≥ 1%)
    major_blocks: list[int] = field(default_factory=list)  # blocks writing at least step_share
    peak: Optional[float] = None  # peak |value| of the mean trajectory
    peak_block: Optional[int] = None
    trajectory: list[float] = field(default_factory=list)  # mean signed value: embeddings, then each block output
    prompts_with_event: int = 0  # prompts in which this (carrier, dim) persists
    per_prompt_me: list[Optional[int]] = field(default_factory=list)
    agreement: float = 0.0  # share of prompts whose own ME layer equals me_layer
    note: str = ""
    token: dict = field(default_factory=dict)  # the carrier, and which tokens carry it (filled by the scan)


def shares_of_peak(trajectory: torch.Tensor) -> tuple[dict[int, float], float, int]:
    """(block -> share of the peak written, peak |value|, peak block) of one signed trajectory (L + 1,)."""
    peak_block = int(trajectory[1:].abs().argmax())
    ref = float(trajectory[peak_block + 1])
    if ref == 0 or ref != ref:
        return {}, 0.0, peak_block
    aligned = trajectory * (1.0 if ref > 0 else -1.0)
    inc = (aligned[1:peak_block + 2] - aligned[:peak_block + 1]) / abs(ref)
    return {i: float(s) for i, s in enumerate(inc.tolist())}, abs(ref), peak_block


def classify(shares: dict[int, float], criterion: MassiveCriterion) -> tuple[str, Optional[int], list[int]]:
    """(kind, ME layer, major blocks) from the shares of the peak written per block."""
    major = sorted(b for b, s in shares.items() if s >= criterion.step_share)
    if not major:
        return "gradual", None, major
    if len(major) == 1 and shares[major[0]] >= criterion.single_share:
        return "single", major[0], major
    return "multi_step", major[0], major


def emergence(profiles: Sequence[Profile], criterion: MassiveCriterion,
              events: Optional[Sequence[Sequence[Event]]] = None) -> Emergence:
    """The model's emergence from its prompts' profiles (and their events, recomputed when not given)."""
    events = events if events is not None else [prompt_events(p, criterion) for p in profiles]
    groups = Counter((e.carrier, e.dim) for evs in events for e in {(x.carrier, x.dim): x for x in evs
                                                                     if x.persistent}.values())
    if not groups:
        return Emergence("none", None, None, None, None, None, note="no massive activation persists")
    peaks: dict[tuple[str, int], float] = {}
    for evs in events:
        for e in evs:
            if e.persistent:
                peaks[(e.carrier, e.dim)] = peaks.get((e.carrier, e.dim), 0.0) + e.peak
    carrier, dim = max(groups, key=lambda k: (groups[k], peaks[k]))
    with_event = [i for i, evs in enumerate(events) if any(e.persistent and (e.carrier, e.dim) == (carrier, dim)
                                                           for e in evs)]
    aligned = []
    per_prompt_me: list[Optional[int]] = []
    for i, p in enumerate(profiles):
        traj = torch.nan_to_num(p.values[carrier][:, dim], nan=0.0)
        if i in with_event:
            peak_row = int(traj[1:].abs().argmax()) + 1
            aligned.append(traj * (1.0 if traj[peak_row] >= 0 else -1.0))
            per_prompt_me.append(classify(shares_of_peak(traj)[0], criterion)[1])
        else:
            per_prompt_me.append(None)
    mean = torch.stack(aligned).mean(0)
    shares, peak, peak_block = shares_of_peak(mean)
    kind, me, major = classify(shares, criterion)
    starts = Counter(e.start for evs in events for e in evs if e.persistent and (e.carrier, e.dim) == (carrier, dim))
    first_block = min(b for b, c in starts.items() if c == max(starts.values()))
    agreement = sum(m == me for m in per_prompt_me) / len(profiles) if me is not None else 0.0
    return Emergence(
        kind=kind, me_layer=me, me_layer_1based=None if me is None else me + 1, first_massive_block=first_block,
        carrier=carrier, dim=dim, shares={b: s for b, s in shares.items() if abs(s) >= 0.01}, major_blocks=major,
        peak=peak, peak_block=peak_block, trajectory=mean.tolist(), prompts_with_event=len(with_event),
        per_prompt_me=per_prompt_me, agreement=agreement, note=_note(kind, me, major, shares, first_block, carrier),
    )


def _note(kind: str, me: Optional[int], major: list[int], shares: dict[int, float], first_block: int,
          carrier: str) -> str:
    written = ", ".join(f"block {b} (paper: {b + 1}) {shares[b]:.0%}" for b in major)
    text = {
        "single": f"one block writes it: {written}",
        "multi_step": f"no single block writes most of it: {written}",
        "gradual": f"massive from block {first_block} and growing over many blocks, none writing "
                   f"{max(shares.values()):.0%} or more: no single ME layer",
    }[kind]
    if carrier != "first":
        text += f"; it sits on the {'first delimiter' if carrier == 'delimiter' else 'another'} token, not the " \
                "first token"
    return text


def consensus(me_layers: Sequence[Optional[int]]) -> tuple[Optional[int], float]:
    """The most common per-prompt ME layer and the share of prompts that agree with it."""
    found = [m for m in me_layers if m is not None]
    if not found:
        return None, 0.0
    layer, count = Counter(found).most_common(1)[0]
    return layer, count / len(me_layers)
