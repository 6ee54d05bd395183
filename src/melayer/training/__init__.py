"""Fine-tuning with WeMask active in every forward and every rollout (TRL + PEFT, optional dependencies).

TRL (SFTTrainer, GRPOTrainer with HF generation) and PEFT (LoRA) are in ``requirements/train.txt``; they are
imported only when a run starts.
"""
from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig, model=None, tokenizer=None, keep_trainer: bool = False):
    """See :func:`melayer.training.runner.train` (imported lazily: TRL is heavy)."""
    from .runner import train as _train

    return _train(cfg, model=model, tokenizer=tokenizer, keep_trainer=keep_trainer)
