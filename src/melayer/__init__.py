"""melayer: find, explain and act on massive activations (the ME layer, WeMask) in decoder LLMs."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "melayer.load",
    "MelayerError": "melayer.errors",
    "adapter_for": "melayer.adapters",
    "scan": "melayer.scan",
    "ScanConfig": "melayer.scan",
    "ScanReport": "melayer.scan",
    "MassiveCriterion": "melayer.detect",
    "WeMaskConfig": "melayer.wemask",
    "wemask": "melayer.wemask",
    "apply_wemask": "melayer.wemask",
    "ExplainConfig": "melayer.explain",
    "explain": "melayer.explain",
    "EvalConfig": "melayer.evaluate",
    "run_eval": "melayer.evaluate",
    "TrainConfig": "melayer.train",
    "train": "melayer.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import on first use, so `import melayer` stays fast and light (torch loads only when needed)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'melayer' has no attribute {name!r}")
