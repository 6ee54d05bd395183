"""Fine-tuning with WeMask active in every forward and every rollout (TRL + PEFT, optional dependencies).

``train`` runs SFT or GRPO on GSM8K, or DPO on preference pairs (TRL's SFTTrainer, GRPOTrainer with HF
generation, DPOTrainer; LoRA through PEFT), with the mask in every policy forward and, by default, in every
reference forward (:mod:`melayer.training.runner`). :mod:`melayer.training.preferences` builds on-policy
preference pairs without the hub (``melayer data preferences``). TRL and PEFT are in ``requirements/train.txt``;
they are imported only when a run starts.
"""
from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig, model=None, tokenizer=None, keep_trainer: bool = False):
    """See :func:`melayer.training.runner.train` (imported lazily: TRL is heavy)."""
    from .runner import train as _train

    return _train(cfg, model=model, tokenizer=tokenizer, keep_trainer=keep_trainer)
