"""Run SFT or GRPO (TRL, optional LoRA via PEFT) with WeMask hooked into every forward and every rollout.

The mask is a set of forward pre-hooks on the model's attention modules, registered once before the
trainer is built. They therefore fire in every training forward, in the re-forwards of gradient
checkpointing (the hooked modules run again) and in GRPO's rollouts, which use plain HF ``generate``
on the same module (no vLLM, no continuous batching: engines that would bypass the hooks are refused).

Checkpoints are loadable model folders: ``load_model(out/checkpoint-N)`` gets the trained weights and
``saved_wemask`` the mask they were trained with (``wemask_config.json``). With LoRA a checkpoint holds the merged weights at its
root (for ``load_model``) and the adapter under ``adapter/`` (for ``--resume``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MelayerError
from ..io import atomic_write_json
from ..report import say
from ..load import load_model
from ..masking import apply_wemask
from .config import TrainConfig
from .report import write_train_report
from .. import data
from .data import correctness_reward, format_reward, grpo_rows, sft_rows

ADAPTER_DIR = "adapter"
COMPLETE_MARK = "checkpoint_complete.json"  # written last: a checkpoint without it was cut off while saving
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FINAL_DIR = "final"


@dataclass
class TrainResult:
    out: Path
    final_dir: Path
    config: TrainConfig  # with the WeMask layers resolved
    log_history: list[dict]
    wemask_fired: int  # first-token maskings applied over the whole run (0 for a baseline)
    trainer: Any = None
    handle: Any = None


def _device(cfg: TrainConfig) -> str:
    """One process per GPU under ``accelerate launch``; else the config's (or the default) device."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if cfg.device is not None:
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_loadable(model, tokenizer, directory: Path, cfg: TrainConfig) -> None:
    """Write a plain model folder (LoRA merged into a copy) that ``load_model`` opens, with its WeMask config."""
    base = model
    if cfg.lora:
        with torch.no_grad():
            base = copy.deepcopy(model).merge_and_unload()
    base.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_run_configs(directory, cfg)


def write_run_configs(directory: Path, cfg: TrainConfig) -> None:
    cfg.wemask.save(directory)
    cfg.save(directory)


def mark_complete(directory: Path, step: int) -> None:
    """The last file a checkpoint gets: its presence means everything else in the folder was written."""
    atomic_write_json(Path(directory) / COMPLETE_MARK, {"global_step": step})


def complete_checkpoints(out: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) ``checkpoint-N`` folders of a run, oldest first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = sorted((p for p in Path(out).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()
                    and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
    return [p for p in found if (p / COMPLETE_MARK).is_file()], [p for p in found if not (p / COMPLETE_MARK).is_file()]


def _masked_checkpoint_callback(cfg: TrainConfig, tokenizer):
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class MaskedCheckpoints(TrainerCallback):
        """After each checkpoint save: with LoRA, make it loadable; then mark it complete."""

        def on_save(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if cfg.lora:
                (ckpt / ADAPTER_DIR).mkdir(exist_ok=True)
                for name in ADAPTER_FILES:
                    if (ckpt / name).is_file():
                        os.replace(ckpt / name, ckpt / ADAPTER_DIR / name)
                save_loadable(model, tokenizer, ckpt, cfg)
            mark_complete(ckpt, state.global_step)

    return MaskedCheckpoints()


class _ConfigsFirst:
    """A checkpoint gets its WeMask and run configs before any weights: no folder holds masked-trained weights
    without the mask that goes with them, however the save is interrupted."""

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self.is_world_process_zero():
            ckpt = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            write_run_configs(ckpt, self.melayer_config)
        super()._save_checkpoint(model, trial)


class _AdapterResume:
    """Resume a LoRA run from the adapter kept in ``checkpoint-N/adapter`` (the root holds merged weights)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        adapter = Path(resume_from_checkpoint) / ADAPTER_DIR
        if adapter.is_dir():
            self.model.load_adapter(str(adapter), adapter_name="default", is_trainable=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def _trainer_classes():
    from trl import GRPOTrainer, SFTTrainer

    class MaskedSFTTrainer(_AdapterResume, _ConfigsFirst, SFTTrainer):
        pass

    class MaskedGRPOTrainer(_AdapterResume, _ConfigsFirst, GRPOTrainer):
        pass

    return MaskedSFTTrainer, MaskedGRPOTrainer


def _training_args(cfg: TrainConfig, device: str):
    from trl import GRPOConfig, SFTConfig

    cuda = device.startswith("cuda")
    common = dict(
        output_dir=cfg.out, max_steps=cfg.max_steps, num_train_epochs=1, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler,
        seed=cfg.seed, data_seed=cfg.seed,  # same seed => same data order for a baseline and its WeMask run
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 1, save_total_limit=cfg.save_total_limit, report_to="none",
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=cuda, fp16=False, use_cpu=not cuda,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    if cfg.algo == "sft":
        return SFTConfig(**common, max_length=cfg.max_length, packing=False, completion_only_loss=True)
    return GRPOConfig(
        **common, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, reward_weights=[1.0, cfg.format_weight],
        use_vllm=False, use_transformers_continuous_batching=False,  # rollouts through the hooked module
        log_completions=False,
    )


def _prepare_out(cfg: TrainConfig) -> Optional[str]:
    """The newest complete checkpoint to resume from (None for a fresh run); refuses to mix two runs in one
    folder, and says which checkpoint it takes and which incomplete ones (a save that was killed) it skips."""
    out = Path(cfg.out)
    complete, incomplete = complete_checkpoints(out) if out.is_dir() else ([], [])
    if not cfg.resume:
        if complete or incomplete:
            raise MelayerError(f"{out} already holds checkpoints: pass --resume to continue, or another --out")
        return None
    if not complete:
        raise MelayerError(f"--resume: no complete checkpoint-N folder in {out}"
                           + (f" ({', '.join(p.name for p in incomplete)} were cut off while saving)"
                              if incomplete else ""))
    last = complete[-1]
    skipped = [p.name for p in incomplete if int(p.name.split("-")[-1]) > int(last.name.split("-")[-1])]
    say(f"resuming from {last.name}" + (f" ({', '.join(skipped)}: incomplete, a save was interrupted; ignored)"
                                        if skipped else ""))
    saved_path = out / "train_config.json"
    if saved_path.is_file():
        diff = cfg.resume_mismatch(TrainConfig.load(saved_path))
        if diff:
            raise MelayerError(f"--resume: this run differs from the one in {out} in {', '.join(diff)}")
    return str(last)


def train(cfg: TrainConfig, model=None, tokenizer=None, keep_trainer: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model`` (or the given model) on GSM8K with ``cfg.wemask`` active throughout."""
    import dataclasses

    from datasets import Dataset

    cfg.validate()
    resume_from = _prepare_out(cfg)
    device = _device(cfg)
    if model is None:
        # the training config decides the mask: one saved in the model folder is not applied
        model, tokenizer = load_model(cfg.model, device=device, dtype=cfg.dtype)
    if tokenizer is None:
        raise MelayerError("train(model=...) needs its tokenizer too")
    if not getattr(tokenizer, "chat_template", None):
        raise MelayerError("training formats GSM8K as a chat: this tokenizer has no chat template")
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's random init: identical for a baseline and its WeMask run, and for a resume
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    handle = apply_wemask(model, cfg.wemask, tokenizer=tokenizer)
    cfg = dataclasses.replace(cfg, wemask=handle.config)  # layers (and ME layer) resolved once, saved as such

    rows = data.select(data.load("gsm8k_train", cfg.data_dir), cfg.limit, cfg.seed)
    dataset = Dataset.from_list(sft_rows(rows) if cfg.algo == "sft" else grpo_rows(rows))
    args = _training_args(cfg, device)
    sft_cls, grpo_cls = _trainer_classes()
    callbacks = [_masked_checkpoint_callback(cfg, tokenizer)]
    if cfg.algo == "sft":
        trainer = sft_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=callbacks)
    else:
        trainer = grpo_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           reward_funcs=[correctness_reward, format_reward], callbacks=callbacks)
        if getattr(trainer, "ref_model", None) is not None:  # beta > 0: the KL anchor is masked too
            apply_wemask(trainer.accelerator.unwrap_model(trainer.ref_model), cfg.wemask, tokenizer=tokenizer)
    trainer.melayer_config = cfg  # what _ConfigsFirst writes into every checkpoint
    if trainer.is_world_process_zero():
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        cfg.save(cfg.out)
    trainer.train(resume_from_checkpoint=resume_from)

    final_dir = Path(cfg.out) / FINAL_DIR
    if trainer.is_world_process_zero():
        final_dir.mkdir(parents=True, exist_ok=True)
        write_run_configs(final_dir, cfg)  # before the weights, as in every checkpoint
    if cfg.lora:
        if trainer.is_world_process_zero():
            save_loadable(trainer.accelerator.unwrap_model(trainer.model), tokenizer, final_dir, cfg)
    else:
        trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        mark_complete(final_dir, trainer.state.global_step)
    result = TrainResult(out=Path(cfg.out), final_dir=final_dir, config=cfg,
                         log_history=list(trainer.state.log_history), wemask_fired=handle.fired,
                         trainer=trainer if keep_trainer else None, handle=handle)
    if trainer.is_world_process_zero():
        write_train_report(result)
    return result
