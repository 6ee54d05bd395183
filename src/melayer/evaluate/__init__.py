"""`melayer eval`: benchmarks under WeMask rate sweeps, with CIs, paired tests and resumable per-sample logs.

Public API: :class:`EvalConfig`, :func:`run_eval` (run or resume a sweep), :func:`score_existing`
(score a ``--generate-only`` out dir), the task registry :data:`TASKS`, and
:func:`register_refusal_classifier` to swap the refusal detector.
"""
from __future__ import annotations

from .runner import EvalConfig, run_eval, score_existing
from .scorers import register_refusal_classifier
from .tasks import TASKS

__all__ = ["EvalConfig", "run_eval", "score_existing", "register_refusal_classifier", "TASKS"]
