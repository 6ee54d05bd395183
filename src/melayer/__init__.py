"""melayer: find, explain and act on massive activations (the ME layer, WeMask) in decoder LLMs.

    model, tokenizer = melayer.load_model("default")
    report = melayer.scan(model, tokenizer)          # report.me_layer: the ME block (0-based)
    with melayer.wemask(model, rate=0.01):           # the paper's mask, removed on exit
        ...

The functions live in modules named for what they hold (``scanning``, ``masking``, ``explanation``,
``training``, ``evaluate``), so ``melayer.scan`` is always the function.
"""
from __future__ import annotations

from .adapters import FamilyAdapter, adapter_for, register_adapter
from .detect import MassiveCriterion
from .errors import MelayerError
from .evaluate import EvalConfig, run_eval
from .explanation import ExplainConfig, explain
from .load import load_model, saved_wemask
from .masking import WeMaskConfig, apply_wemask, wemask
from .scanning import ScanConfig, ScanReport, find_me_layer, scan
from .training import TrainConfig, train

__version__ = "0.2.0"

__all__ = ["EvalConfig", "ExplainConfig", "FamilyAdapter", "MassiveCriterion", "MelayerError", "ScanConfig",
           "ScanReport", "TrainConfig", "WeMaskConfig", "adapter_for", "apply_wemask", "explain", "find_me_layer",
           "load_model", "register_adapter", "run_eval", "saved_wemask", "scan", "train", "wemask"]
