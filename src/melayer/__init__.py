"""melayer: find, explain and act on massive activations (the ME layer, WeMask) in decoder LLMs.

The public names are imported eagerly: several share their submodule's name (``scan``, ``wemask``,
``explain``, ``train``), and binding the function here is what keeps ``melayer.scan(...)`` callable
after ``import melayer.scan``.
"""
from __future__ import annotations

from .adapters import adapter_for
from .detect import MassiveCriterion
from .errors import MelayerError
from .evaluate import EvalConfig, run_eval
from .explain import ExplainConfig, explain
from .load import load_model
from .scan import ScanConfig, ScanReport, find_me_layer, scan
from .train import TrainConfig, train
from .wemask import WeMaskConfig, apply_wemask, wemask

__version__ = "0.1.0"

__all__ = ["EvalConfig", "ExplainConfig", "MassiveCriterion", "MelayerError", "ScanConfig", "ScanReport",
           "TrainConfig", "WeMaskConfig", "adapter_for", "apply_wemask", "explain", "find_me_layer", "load_model",
           "run_eval", "scan", "train", "wemask"]
