"""The registry of explain analyses: each one computes, states its claims, writes its report section and plots.

    register_analysis(Analysis("my_probe", "My probe", run=my_run, section=my_section))

``explain`` runs every registered analysis in order on one shared :class:`Context`; an analysis reads what
earlier ones found through ``ctx.results[name]`` (listed in ``needs``, checked at registration).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import MelayerError
from .claims import Claim


@dataclass
class Context:
    """What every analysis shares: the model, its inputs and what the analyses before it found."""

    model: Any
    tokenizer: Any
    config: Any  # ExplainConfig
    inputs: Any  # Inputs
    me_layer: int
    dims: list[int]
    windows: Any = None  # WikiText-2 token windows for perplexity, or None
    results: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


@dataclass(frozen=True)
class Analysis:
    name: str
    title: str
    run: Callable[[Context], Any]
    claims: Callable[[Any, Context], list[Claim]] = lambda result, ctx: []
    section: Callable[[Any, Context], list[str]] = lambda result, ctx: []
    figures: Callable[[Any, Context], dict] = lambda result, ctx: {}
    needs: tuple[str, ...] = ()


ANALYSES: dict[str, Analysis] = {}


def register_analysis(analysis: Analysis) -> Analysis:
    """Add (or replace) an analysis; it runs after those registered before it."""
    missing = [n for n in analysis.needs if n not in ANALYSES and n != analysis.name]
    if missing:
        raise MelayerError(f"analysis {analysis.name!r} needs {missing}, which are not registered before it")
    ANALYSES[analysis.name] = analysis
    return analysis


def get(name: str) -> Optional[Analysis]:
    return ANALYSES.get(name)
