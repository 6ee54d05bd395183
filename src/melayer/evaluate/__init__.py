"""`melayer eval`: lm-eval tasks under WeMask rate sweeps, paired by document, with CIs, paired tests and Holm.

Public API: :class:`EvalConfig` and :func:`run_eval` (run, resume or rescore a sweep; it returns an
:class:`EvalSummary`), :func:`merge_shards` (join a sweep run as ``--shard I/N`` processes), the ``clean`` and ``paper``
protocols (:mod:`.protocols`), melayer's lm-eval tasks (``TASKS_DIR``, usable from plain ``lm_eval
--include_path``) and the lm-eval model ``melayer`` (:class:`melayer.evaluate.harness.MelayerLM`, imported on use:
it needs lm-eval).
"""
from __future__ import annotations

from .protocols import PROTOCOLS
from .runner import EvalConfig, run_eval
from .scorers import register_refusal_classifier
from .shards import merge_shards
from .summary import EvalSummary
from .tasks import TASKS_DIR

__all__ = ["EvalConfig", "EvalSummary", "run_eval", "merge_shards", "PROTOCOLS", "TASKS_DIR", "register_refusal_classifier"]
