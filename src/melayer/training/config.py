"""The one typed config of a training run, saved as ``train_config.json`` in the run folder and every checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import MelayerError
from ..io import atomic_write_json, read_config_json
from ..masking import WeMaskConfig

CONFIG_NAME = "train_config.json"
ALGOS = ("sft", "grpo")
DATASETS = ("gsm8k",)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# Fields that may change when a run is resumed (everything else must match the saved config).
RESUMABLE_CHANGES = ("max_steps", "resume", "device")


@dataclass
class TrainConfig:
    """Everything that defines a run; a baseline differs from its WeMask run only in ``wemask.rate``.

    ``lr`` None picks the algorithm's default (SFT 2e-5 full / 2e-4 LoRA, GRPO 1e-6 full / 1e-5 LoRA).
    ``max_steps`` -1 means one epoch over the (possibly ``limit``-ed) data.
    """

    algo: str = "sft"
    model: str = "default"
    data: str = "gsm8k"
    data_dir: Optional[str] = None  # folder holding gsm8k/train.jsonl (or train.jsonl); None: the hub
    limit: Optional[int] = None  # train on a seeded random subset of this many examples
    out: str = "runs/train"
    wemask: WeMaskConfig = field(default_factory=WeMaskConfig)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_steps: int = -1
    lr: Optional[float] = None
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr_scheduler: str = "cosine"  # any transformers scheduler name: cosine, linear, constant, ...
    warmup: float = 0.03  # fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.0
    max_length: int = 512  # SFT: prompt + answer tokens
    seed: int = 0
    save_steps: int = 200  # 0: no checkpoints (the final model is still saved; no --resume)
    save_total_limit: Optional[int] = None
    logging_steps: int = 10
    gradient_checkpointing: bool = True
    dtype: str = "fp32"  # weights; on CUDA the forward runs in bf16 autocast (mixed precision)
    device: Optional[str] = None
    resume: bool = False
    # GRPO
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    beta: float = 0.0  # KL weight; 0 (TRL's default) loads no reference model
    format_weight: float = 0.2  # weight of the format reward next to correctness (1.0)

    def __post_init__(self) -> None:
        if isinstance(self.wemask, dict):
            self.wemask = WeMaskConfig(**self.wemask)
        self.validate()

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise MelayerError(f"training algorithm must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.data not in DATASETS:
            raise MelayerError(f"--data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        positive = dict(batch_size=self.batch_size, grad_accum=self.grad_accum, max_length=self.max_length,
                        logging_steps=self.logging_steps, lora_r=self.lora_r,
                        num_generations=self.num_generations, max_completion_length=self.max_completion_length)
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise MelayerError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.save_steps, int) or self.save_steps < 0:
            raise MelayerError(f"--save-steps must be >= 0 (0: no checkpoints), got {self.save_steps!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise MelayerError(f"--max-steps must be positive (or -1 for one epoch), got {self.max_steps}")
        if self.limit is not None and self.limit < 1:
            raise MelayerError(f"--limit must be positive, got {self.limit}")
        if self.lr is not None and not self.lr > 0:
            raise MelayerError(f"--lr must be positive, got {self.lr}")
        if self.warmup < 0 or self.temperature <= 0 or self.beta < 0 or self.format_weight < 0:
            raise MelayerError("--warmup, --beta and --format-weight must be >= 0 and --temperature > 0")
        if self.lr_scheduler not in SCHEDULERS:
            raise MelayerError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise MelayerError(f"training --dtype must be fp32 (bf16 autocast on CUDA) or bf16, got {self.dtype!r}")
        if self.algo == "grpo":
            if self.num_generations < 2:
                raise MelayerError("GRPO needs --num-generations >= 2 (advantages are relative within a group)")
            if (self.batch_size * self.grad_accum) % self.num_generations:
                raise MelayerError(f"GRPO: --batch-size x --grad-accum ({self.batch_size * self.grad_accum}) must "
                                   f"be a multiple of --num-generations ({self.num_generations})")
        self.wemask.validate()

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.algo == "sft":
            return 2e-4 if self.lora else 2e-5
        return 1e-5 if self.lora else 1e-6

    def baseline(self, out: Optional[str] = None) -> "TrainConfig":
        """The fair baseline: identical seed, data, order and hyper-parameters, WeMask rate 0."""
        return dataclasses.replace(self, wemask=dataclasses.replace(self.wemask, rate=0.0),
                                   out=out if out is not None else self.out)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory) -> Path:
        return atomic_write_json(Path(directory) / CONFIG_NAME, self.to_json())

    @classmethod
    def load(cls, path) -> "TrainConfig":
        return cls(**read_config_json(cls, path, CONFIG_NAME, "training config"))

    def resume_mismatch(self, saved: "TrainConfig") -> list[str]:
        """Fields that differ from the saved run (a resumed run must be the same run)."""
        mine, theirs = self.to_json(), saved.to_json()
        # the saved WeMask has its layers resolved; compare it against ours resolved the same way
        if self.wemask.rate > 0 and saved.wemask.is_resolved and not self.wemask.is_resolved:
            mine["wemask"] = {**mine["wemask"], "layers": theirs["wemask"]["layers"],
                              "me_layer": self.wemask.me_layer if self.wemask.me_layer is not None
                              else theirs["wemask"]["me_layer"]}
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]
