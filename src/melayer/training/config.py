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
ALGOS = ("sft", "grpo", "dpo")
DATASETS = ("gsm8k",)  # SFT and GRPO; DPO takes a built-in on-policy set (PREFERENCE_SOURCES) or a preference file
PREFERENCE_SOURCES = ("refusal", "gsm8k")  # built by melayer.training.preferences from the policy itself
REF_MASKS = ("policy", "none")
ROLLOUTS = ("hf", "vllm")  # GRPO rollouts: the hooked HF policy, or TRL's colocated vLLM with melayer's plugin
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "exo_pair", "discopop", "sigmoid_norm")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# Fields that may change when a run is resumed (everything else must match the saved config).
RESUMABLE_CHANGES = ("max_steps", "resume", "device")


@dataclass
class TrainConfig:
    """Everything that defines a run; a baseline differs from its WeMask run only in ``wemask.rate``.

    ``lr`` None picks the algorithm's default: SFT 2e-5 full / 2e-4 LoRA, GRPO 1e-6 full / 1e-5 LoRA, DPO 1e-6
    full (TRL's ``DPOConfig`` default) / 5e-6 LoRA (adapters start at zero and need a larger step to move).
    ``max_steps`` -1 means one epoch over the (possibly ``limit``-ed) data.

    DPO: ``data`` is ``refusal`` or ``gsm8k`` (pairs sampled from the policy itself, masked as it is trained,
    judged by melayer and kept in the run folder as ``preferences.jsonl``, reused on ``--resume``: see
    :mod:`melayer.training.preferences`; a quick recipe, ``fill="reference"``, since a small model's samples
    rarely disagree), a local preference JSONL (``prompt``/``chosen``/``rejected``, conversational or plain,
    e.g. from ``melayer data preferences``) or a hub dataset id; ``limit`` is the number of pairs (built-in
    sets: the pairs to build, default ``preferences.TRAIN_PAIRS``). ``beta`` (None: 0.1 for DPO, 0 for GRPO)
    weighs the implicit KL; ``max_length`` caps prompt + completion tokens.

    ``ref_mask`` (DPO) decides the reference model's forwards. ``"policy"`` (default): the reference is masked
    exactly like the policy, so it *is* the initial policy being optimised: at step 1 every log-ratio is 0,
    the loss is ln 2 and the rewards are 0, and DPO measures only what training changed. ``"none"``: an
    unmasked reference; then the mask's own log-prob shift (masked initial model vs. unmasked one) enters every
    chosen and rejected log-ratio from step 1 on, so the margins and the loss start away from ln 2 for a reason
    that has nothing to do with the preferences. Full fine-tuning keeps a separate reference (a copy of the
    initial model made before any hook, with its own WeMask for ``"policy"``); with LoRA the reference
    forwards run through the policy's own modules (TRL's frozen ``ref`` adapter), with its mask paused for
    ``"none"``. ``precompute_ref`` computes all reference log-probs once before training (same choice).
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
    max_length: int = 512  # SFT and DPO: prompt + answer (completion) tokens
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
    beta: Optional[float] = None  # KL weight; None: DPO 0.1, GRPO 0 (TRL's default: no reference model)
    format_weight: float = 0.2  # weight of the format reward next to correctness (1.0)
    rollouts: str = "hf"  # "hf": the hooked policy generates; "vllm": TRL's colocated vLLM, melayer's plugin masking
    vllm_memory: float = 0.3  # GPU share of the colocated vLLM engine (its KV cache)
    # DPO
    loss_type: str = "sigmoid"
    precompute_ref: bool = False  # reference log-probs computed once, before training
    ref_mask: str = "policy"  # the reference's forwards: masked like the policy, or "none" (see the docstring)

    def __post_init__(self) -> None:
        if isinstance(self.wemask, dict):
            self.wemask = WeMaskConfig(**self.wemask)
        if self.beta is None:
            self.beta = 0.1 if self.algo == "dpo" else 0.0
        self.validate()

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise MelayerError(f"training algorithm must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.algo == "dpo":
            if not isinstance(self.data, str) or not self.data.strip():
                raise MelayerError("DPO --data must be refusal, gsm8k, a preference JSONL or a hub dataset id")
            if self.data == "refusal" and self.data_dir is None:
                raise MelayerError("DPO --data refusal samples prompts from refusal/*_val.json, which has no hub "
                                   "copy: pass --data-dir (the layout of shared/data)")
        elif self.data not in DATASETS:
            raise MelayerError(f"--data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        if self.ref_mask not in REF_MASKS:
            raise MelayerError(f"--ref-mask must be one of {', '.join(REF_MASKS)}, got {self.ref_mask!r}")
        if self.loss_type not in DPO_LOSSES:
            raise MelayerError(f"--loss-type must be one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
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
        if self.warmup < 0 or self.temperature <= 0 or self.beta is None or self.beta < 0 or self.format_weight < 0:
            raise MelayerError("--warmup, --beta and --format-weight must be >= 0 and --temperature > 0")
        if self.lr_scheduler not in SCHEDULERS:
            raise MelayerError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise MelayerError(f"training --dtype must be fp32 (bf16 autocast on CUDA) or bf16, got {self.dtype!r}")
        if self.algo == "dpo" and not self.beta > 0:
            raise MelayerError(f"DPO --beta must be positive (it scales every margin), got {self.beta}")
        if self.rollouts not in ROLLOUTS:
            raise MelayerError(f"--rollouts must be one of {', '.join(ROLLOUTS)}, got {self.rollouts!r}")
        if self.rollouts == "vllm":
            if self.algo != "grpo":
                raise MelayerError("--rollouts vllm is for GRPO (SFT and DPO do not generate)")
            if self.wemask.rate > 0 and self.wemask.mode != "correct":
                raise MelayerError("--rollouts vllm masks in correct mode only: paper mode is exact in vLLM only "
                                   "without chunked prefill and CUDA graphs, which TRL's engine turns on")
            if not 0 < self.vllm_memory < 1:
                raise MelayerError(f"--vllm-memory must be in (0, 1), got {self.vllm_memory}")
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
        if self.algo == "dpo":
            return 5e-6 if self.lora else 1e-6
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
