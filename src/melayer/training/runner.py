"""Run SFT, GRPO or DPO (TRL, optional LoRA via PEFT) with WeMask hooked into every forward and every rollout.

The mask is a set of forward pre-hooks on the model's attention modules, registered once before the
trainer is built. They therefore fire in every training forward, in the re-forwards of gradient
checkpointing (the hooked modules run again) and in GRPO's rollouts, which use plain HF ``generate``
on the same module (no vLLM, no continuous batching: engines that would bypass the hooks are refused).

Reference models (DPO, GRPO with ``beta > 0``) are never left to TRL's reload from ``config._name_or_path``
(it would come back without hooks, and an in-memory model has no path): full fine-tuning passes a copy of the
initial model taken before any hook, with its own WeMask applied (DPO: unless ``ref_mask="none"``); with LoRA
the reference forwards run through the policy's own, masked modules (TRL's frozen ``ref`` adapter, or the
adapters disabled), and :class:`MaskedDPOTrainer` pauses the mask there for ``ref_mask="none"``. Every DPO
reference forward, inline or precomputed, goes through ``compute_ref_log_probs``, which counts the tokens it
masked; the precompute cache key includes the reference's mask (TRL's own key sees weights and data only).

Also fixed here for every algorithm: warm-up no longer spends optimizer step 1 at learning rate 0
(:func:`shift_warmup`); SFT and DPO count, warn about and report the rows TRL would truncate or drop at
``max_length``; GRPO warns once when most groups have rewards with zero spread (no learning signal).

Checkpoints are loadable model folders: ``load_model(out/checkpoint-N)`` gets the trained weights and
``saved_wemask`` the mask they were trained with (``wemask_config.json``). With LoRA a checkpoint holds the merged weights at its
root (for ``load_model``) and the adapter under ``adapter/`` (for ``--resume``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MelayerError
from ..io import atomic_write_json, atomic_write_text, read_jsonl
from ..report import say
from ..load import load_model
from ..masking import active_wemasks, apply_wemask
from .config import PREFERENCE_SOURCES, TrainConfig
from .report import write_train_report
from .. import data
from .data import correctness_reward, count_overlong, format_reward, grpo_rows, sft_rows
from . import preferences

ADAPTER_DIR = "adapter"
COMPLETE_MARK = "checkpoint_complete.json"  # written last: a checkpoint without it was cut off while saving
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
REF_ADAPTER = "ref"
FINAL_DIR = "final"
ROLLOUT_MODEL_DIR = "vllm_rollout_model"  # GRPO --rollouts vllm: what the colocated engine loads
PREFERENCES_FILE = "preferences.jsonl"  # on-policy pairs of a DPO run (with preferences_config.json beside them)
ZERO_STD_WARN = 0.9  # GRPO: warn once when at least this fraction of groups have rewards with zero spread
# FutureWarnings that TRL's own internals emit under transformers 5 (melayer passes activation_checkpointing=):
# silenced by exact name, so a deprecated argument of ours would still show
_TRL_INTERNAL_DEPRECATIONS = (r"`(is_gradient_checkpointing|gradient_checkpointing_enable|"
                              r"gradient_checkpointing_disable)` is deprecated")


@dataclass
class TrainResult:
    out: Path
    final_dir: Path
    config: TrainConfig  # with the WeMask layers resolved
    log_history: list[dict]
    wemask_fired: int  # first-token maskings by the policy's mask over the whole run, on-policy sampling and
    #                    LoRA reference forwards included (0 for a baseline)
    trainer: Any = None
    handle: Any = None
    data_stats: dict = field(default_factory=dict)  # rows, and those TRL truncates / drops at max_length
    ref_tokens_masked: Optional[int] = None  # DPO: first tokens masked in reference forwards
    ref_forwards: Optional[int] = None  # DPO: reference forwards (inline or precomputed batches)
    wemask_fired_per_rank: Optional[list[int]] = None  # data parallel: each process's count (the mask on every rank)


def _device(cfg: TrainConfig) -> str:
    """One process per GPU under ``accelerate launch``; else the config's (or the default) device."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if cfg.device is not None:
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gather_counts(count: int) -> Optional[list[int]]:
    """Every process's ``count`` under data parallelism (None in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(count))
    return counts


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


MODEL_CARD_TITLE = "## Trained with WeMask"


def write_model_card(directory: Path, cfg: TrainConfig) -> None:
    """State in the folder's README.md (the model card) that the weights expect their mask at inference.

    Plain ``transformers`` loads the weights without it and has no hook to warn, so the card (and the
    ``melayer_wemask`` entry of ``config.json``) is where a user of the bare checkpoint reads it.
    """
    if cfg.wemask.rate <= 0:
        return
    w = cfg.wemask
    card = (f"{MODEL_CARD_TITLE}\n\nThis model was fine-tuned ({cfg.algo}) with WeMask: rate {w.rate:g} (top-k dims of the "
            f"first token's normalised hidden state zeroed at the attention input), mode `{w.mode}`, blocks {w.layers} "
            f"(ME layer {w.me_layer}, 0-based). It was trained with the mask in every forward, so evaluate it with "
            f"the mask too:\n\n```python\nimport melayer\nmodel, tok = melayer.load_model(\"<this folder>\")\n"
            f"handle = melayer.apply_wemask(model, melayer.saved_wemask(model))\n```\n\nor `melayer eval <this folder>` "
            f"(it compares rate 0 with the saved mask). Loaded with plain `transformers`, the model runs *without* it. The mask's "
            f"settings: `wemask_config.json` and `config.json` → `melayer_wemask`.\n")
    path = Path(directory) / "README.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if MODEL_CARD_TITLE not in text:
        atomic_write_text(path, (text.rstrip() + "\n\n" if text.strip() else "") + card)


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
                ref = ckpt / REF_ADAPTER  # DPO: TRL's frozen reference adapter, saved beside the trained one
                if (ref / "adapter_config.json").is_file():
                    os.replace(ref, ckpt / ADAPTER_DIR / REF_ADAPTER)
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


def shift_warmup(scheduler, warmup_steps: int) -> None:
    """Make optimizer step 1 learn: during warm-up, step ``s`` (0-based) gets the factor of step ``s + 1``.

    transformers' warm-up factor is ``s / warmup``, so step 1 runs at learning rate 0 for any warm-up (a
    wasted step, and with ``warmup = 1`` no warm-up at all, just a lost step). Shifted, the warm-up climbs
    ``1/w, 2/w, ..., 1`` and reaches the peak on step ``w`` instead of ``w + 1``; from step ``w`` on the
    factors are the original ones (the peak is held for one extra step). A no-op without warm-up or for a
    scheduler that is not a ``LambdaLR``.
    """
    from torch.optim.lr_scheduler import LambdaLR

    if warmup_steps <= 0 or not isinstance(scheduler, LambdaLR) or getattr(scheduler, "_melayer_shifted", False):
        return

    def shifted(f):
        def factor(step):  # a plain function: LambdaLR.state_dict stores None for it, so resume keeps this one
            return f(step + 1) if step < warmup_steps else f(step)
        return factor

    scheduler.lr_lambdas = [shifted(f) for f in scheduler.lr_lambdas]
    scheduler._melayer_shifted = True
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)  # the LR of the next optimizer step, set at construction
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class _ShiftedWarmup:
    """The trainer's scheduler with :func:`shift_warmup` applied (step 1 never runs at learning rate 0)."""

    def create_scheduler(self, num_training_steps, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        shift_warmup(scheduler, self.args.get_warmup_steps(num_training_steps))
        return scheduler


@contextlib.contextmanager
def _quiet_trl_deprecations():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRL_INTERNAL_DEPRECATIONS, category=FutureWarning)
        yield


@contextlib.contextmanager
def _given_reference(module, reference):
    """TRL's GRPOTrainer takes no ``ref_model``: for ``beta > 0`` it reloads one from ``config._name_or_path``
    (no hooks; impossible for an in-memory model). During its ``__init__`` its loader hands back ours instead."""
    original = module.create_model_from_path
    module.create_model_from_path = lambda *args, **kwargs: reference
    try:
        yield
    finally:
        module.create_model_from_path = original


@functools.lru_cache(maxsize=None)
def _trainer_classes():
    """(MaskedSFTTrainer, MaskedGRPOTrainer, MaskedDPOTrainer), built on first use (TRL is imported lazily)."""
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    class MaskedSFTTrainer(_ShiftedWarmup, _AdapterResume, _ConfigsFirst, SFTTrainer):
        pass

    class MaskedGRPOTrainer(_ShiftedWarmup, _AdapterResume, _ConfigsFirst, GRPOTrainer):
        def __init__(self, *args, ref_model=None, **kwargs):
            from trl.trainer import grpo_trainer

            context = _given_reference(grpo_trainer, ref_model) if ref_model is not None else contextlib.nullcontext()
            with context:
                super().__init__(*args, **kwargs)

    class MaskedDPOTrainer(_ShiftedWarmup, _AdapterResume, _ConfigsFirst, DPOTrainer):
        """TRL's DPOTrainer with every reference forward in :meth:`compute_ref_log_probs`, masked or not.

        ``wemask_handles``: every WeMask of the run (the policy's, and a separate reference's); ``ref_mask``
        ``"policy"`` runs reference forwards with whatever masks sit on the reference's modules (its own mask,
        or with LoRA the policy's), ``"none"`` pauses all of them there. ``ref_tokens_masked`` / ``ref_forwards``
        count what reference forwards did (with a masked reference: 2 x batch x forwards, one first token per
        chosen and rejected sequence per masked block).
        """

        def __init__(self, *args, wemask_handles=(), ref_mask: str = "policy", **kwargs):
            self.wemask_handles = [h for h in wemask_handles if h is not None]  # before super(): precompute
            self.ref_mask = ref_mask                                                # runs inside __init__
            self.ref_tokens_masked = 0
            self.ref_forwards = 0
            super().__init__(*args, **kwargs)

        def _fired(self) -> int:
            return sum(h.fired for h in self.wemask_handles)

        def _ref_wemask_key(self) -> str:
            masks = sorted({repr(h.config) for h in self.wemask_handles if h.k}) if self.ref_mask == "policy" else []
            return f"melayer-ref-mask={self.ref_mask}:{masks}"

        def _precompute_ref_logps(self, dataset, name, batch_size):
            # TRL caches precomputed reference log-probs under hash(dataset fingerprint, weights): hooks are
            # invisible to it, so a masked and an unmasked reference of the same weights and data would share
            # one cache file. The reference's mask goes into the key.
            base = self._precompute_model_hash
            self._precompute_model_hash = f"{base}|{self._ref_wemask_key()}"
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self._precompute_model_hash = base

        def compute_ref_log_probs(self, model, inputs):
            before = self._fired()
            with contextlib.ExitStack() as stack:
                if self.ref_mask == "none":
                    for h in self.wemask_handles:
                        stack.enter_context(h.paused())
                out = super().compute_ref_log_probs(model, inputs)
            self.ref_tokens_masked += self._fired() - before
            self.ref_forwards += 1
            return out

        def _compute_loss(self, model, inputs, return_outputs):
            if self.precompute_ref_logps:
                return super()._compute_loss(model, inputs, return_outputs)
            # TRL's inline reference forward bypasses compute_ref_log_probs: do it here, then hand the values in
            # as if precomputed (the same forward: same inputs, no grad, gradient checkpointing off, same adapter)
            ref = self.ref_model if self.ref_model is not None else self.model
            chosen, rejected = self.compute_ref_log_probs(ref, inputs)
            inputs = {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            self.precompute_ref_logps = True
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.precompute_ref_logps = False

    return MaskedSFTTrainer, MaskedGRPOTrainer, MaskedDPOTrainer


def __getattr__(name: str):
    """``MaskedSFTTrainer``, ``MaskedGRPOTrainer`` and ``MaskedDPOTrainer`` as module attributes (built lazily)."""
    names = ("MaskedSFTTrainer", "MaskedGRPOTrainer", "MaskedDPOTrainer")
    if name in names:
        return _trainer_classes()[names.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _zero_std_callback():
    from transformers import TrainerCallback

    class ZeroStdWarning(TrainerCallback):
        """Warn once when GRPO's groups mostly have identical rewards: their advantages are 0, nothing is learnt."""

        warned = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            value = (logs or {}).get("frac_reward_zero_std")
            if value is not None and value >= ZERO_STD_WARN and not self.warned:
                self.warned = True
                warnings.warn(f"GRPO step {state.global_step}: {value:.0%} of the prompt groups got the same reward "
                              f"for every completion (no advantage, no gradient from them): the task may be too "
                              f"hard or too easy for the model; try more --num-generations, a higher --temperature "
                              f"or easier data", stacklevel=2)

    return ZeroStdWarning()


def _training_args(cfg: TrainConfig, device: str):
    from trl import DPOConfig, GRPOConfig, SFTConfig

    cuda = device.startswith("cuda")
    names = {f.name for f in dataclasses.fields(SFTConfig)}  # transformers < 5.20 names it gradient_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    common = dict(
        output_dir=cfg.out, max_steps=cfg.max_steps, num_train_epochs=1, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler,
        seed=cfg.seed, data_seed=cfg.seed,  # same seed => same data order for a baseline and its WeMask run
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 1, save_total_limit=cfg.save_total_limit, report_to="none",
        **{checkpointing: cfg.gradient_checkpointing}, bf16=cuda, fp16=False, use_cpu=not cuda,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    if cfg.algo == "sft":
        return SFTConfig(**common, max_length=cfg.max_length, packing=False, completion_only_loss=True)
    if cfg.algo == "dpo":
        return DPOConfig(**common, max_length=cfg.max_length, beta=cfg.beta, loss_type=[cfg.loss_type],
                         precompute_ref_log_probs=cfg.precompute_ref)
    return GRPOConfig(
        **common, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, reward_weights=[1.0, cfg.format_weight],
        use_transformers_continuous_batching=False,  # "hf": rollouts through the hooked module
        use_vllm=cfg.rollouts == "vllm", vllm_mode="colocate", vllm_gpu_memory_utilization=cfg.vllm_memory,
        log_completions=False,
    )


def _save_rollout_model(model, tokenizer, cfg: TrainConfig) -> Path:
    """The folder TRL's colocated vLLM engine starts from (it calls ``LLM(model=model.name_or_path)``): the initial
    weights, saved before LoRA or any hook; TRL pushes the policy's weights into the engine before each
    generation. ``model.name_or_path`` is pointed at it."""
    from accelerate import PartialState

    folder = Path(cfg.out) / ROLLOUT_MODEL_DIR
    if PartialState().is_main_process:  # the other ranks read it only after _name_rollout_mask's barrier
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    model.name_or_path = str(folder)
    return folder


def _name_rollout_mask(folder: Path, cfg: TrainConfig) -> None:
    """Put the run's resolved mask into the rollout folder's config.json (``melayer_wemask``, none for a
    baseline): melayer's vLLM plugin reads it there, so every rollout is masked as the policy's forwards are."""
    from accelerate import PartialState

    from ..vllm_backend.config import KEY

    if PartialState().is_main_process:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.pop(KEY, None)
        if cfg.wemask.rate > 0:
            config[KEY] = dataclasses.asdict(cfg.wemask)
        atomic_write_json(path, config)
    PartialState().wait_for_everyone()


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


def _reference_copy(model):
    """The frozen reference: a copy of the initial model, taken before any hook is registered on the policy."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _preference_rows(cfg: TrainConfig, model, tokenizer, handle) -> tuple[list[dict], dict]:
    """DPO pairs: built on-policy into the run folder (reused when the recipe matches, e.g. on --resume), or read
    from a local file / the hub; ``(rows, stats)``."""
    if cfg.data in PREFERENCE_SOURCES:
        target = cfg.limit or preferences.TRAIN_PAIRS
        wanted = preferences.PreferenceConfig(
            source=cfg.data, model=cfg.model, data_dir=cfg.data_dir, limit=target, min_pairs=target,
            max_prompts=preferences.TRAIN_PROMPTS_PER_PAIR * target, seed=cfg.seed, fill="reference",
            max_new_tokens=preferences.TRAIN_MAX_NEW_TOKENS[cfg.data], wemask=handle.config if handle.k else None)
        path = Path(cfg.out) / PREFERENCES_FILE
        from accelerate import PartialState

        with PartialState().main_process_first():  # process 0 builds; the others then find its file
            saved = None
            if path.is_file() and (path.parent / preferences.CONFIG_NAME).is_file():
                saved = preferences.PreferenceConfig.load(path.parent)
                if saved.recipe() != wanted.recipe():
                    if cfg.resume:
                        raise MelayerError(f"--resume: {path} was built with another recipe than this run's")
                    saved = None
            if saved is not None:
                rows, built = read_jsonl(path), saved
                say(f"reusing the {len(rows)} on-policy {cfg.data} pairs in {path}")
            else:
                # sampled with the policy's mask, which is active on the model (recorded in the config)
                rows, built = preferences.build_preferences(model, tokenizer, dataclasses.replace(wanted, wemask=None))
                if not rows:
                    raise MelayerError(f"no {cfg.data} preference pair came out of {built.max_prompts} prompts "
                                       f"(each prompt's samples were all judged alike): pass a preference file "
                                       f"with --data FILE.jsonl")
                preferences.write_preferences(rows, built, path)
        stats = {"pairs": len(rows), "pairs_file": str(path), "prompts_sampled":
                 sum(c["prompts"] for c in built.counts.values())}
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], stats
    rows = data.select(_read_preference_set(cfg.data), cfg.limit, cfg.seed)
    return [{k: r[k] for k in ("prompt", "chosen", "rejected") if k in r} for r in rows], {"pairs": len(rows)}


def _read_preference_set(name: str) -> list[dict]:
    """A local JSONL / JSON list of pairs, or (anything else) a hub dataset id's train split."""
    path = Path(name)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise MelayerError(f"--data {name}: no such preference file")
        if path.suffix == ".json":
            import json

            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MelayerError(f"{path}: not valid JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise MelayerError(f"{path}: expected a JSON list of preference pairs")
        else:
            rows = read_jsonl(path)
        preferences.check_preference_rows(rows, str(path))
        return rows
    try:
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(name, split="train")]
    except Exception as e:  # network, auth, missing dataset: one line for the user
        raise MelayerError(f"--data {name}: not a local file, and the hub could not give it "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    preferences.check_preference_rows(rows, name)
    return rows


def _dataset_rows(cfg: TrainConfig, model, tokenizer, handle) -> tuple[list[dict], dict]:
    """The training rows and what is known about them (counts; SFT/DPO: rows TRL truncates or drops)."""
    if cfg.algo == "dpo":
        rows, stats = _preference_rows(cfg, model, tokenizer, handle)
        completions = ("chosen", "rejected")
    else:
        gsm = data.select(data.load("gsm8k_train", cfg.data_dir), cfg.limit, cfg.seed)
        rows = sft_rows(gsm) if cfg.algo == "sft" else grpo_rows(gsm)
        stats, completions = {"rows": len(rows)}, ("completion",)
    if cfg.algo in ("sft", "dpo"):
        truncated, dropped = count_overlong(rows, tokenizer, cfg.max_length, completions)
        stats.update(rows=len(rows), rows_truncated=truncated, rows_dropped=dropped)
        if truncated or dropped:
            warnings.warn(f"--max-length {cfg.max_length}: {truncated} of {len(rows)} training rows are longer and "
                          f"get their answers cut, and {dropped} more have a prompt that fills it alone and are "
                          f"dropped by TRL (raise --max-length to keep them whole)", stacklevel=3)
    return rows, stats


def train(cfg: TrainConfig, model=None, tokenizer=None, keep_trainer: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model`` (or the given bare model) with ``cfg.wemask`` active throughout."""
    with _quiet_trl_deprecations():
        return _train(cfg, model, tokenizer, keep_trainer)


def _train(cfg: TrainConfig, model, tokenizer, keep_trainer: bool) -> TrainResult:
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
        raise MelayerError("training formats its data as chats: this tokenizer has no chat template")
    if active_wemasks(model):
        raise MelayerError("train(model=...) takes a bare model: it applies cfg.wemask itself (remove the mask "
                           "applied to this one)")
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's random init: identical for a baseline and its WeMask run, and for a resume
    needs_reference = cfg.algo == "dpo" or (cfg.algo == "grpo" and cfg.beta > 0)
    reference = _reference_copy(model) if needs_reference and not cfg.lora else None
    rollout_model = _save_rollout_model(model, tokenizer, cfg) if cfg.rollouts == "vllm" else None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    handle = apply_wemask(model, cfg.wemask, tokenizer=tokenizer)
    cfg = dataclasses.replace(cfg, wemask=handle.config)  # layers (and ME layer) resolved once, saved as such
    if cfg.wemask.rate > 0:  # every config.json this run saves names its mask, for whoever loads it without melayer
        model.config.melayer_wemask = dataclasses.asdict(cfg.wemask)
    if rollout_model is not None:
        _name_rollout_mask(rollout_model, cfg)
    ref_handle = None
    if reference is not None and (cfg.algo == "grpo" or cfg.ref_mask == "policy") and not active_wemasks(reference):
        ref_handle = apply_wemask(reference, cfg.wemask, tokenizer=tokenizer)  # resolved: no second ME scan
    Path(cfg.out).mkdir(parents=True, exist_ok=True)

    rows, data_stats = _dataset_rows(cfg, model, tokenizer, handle)
    dataset = Dataset.from_list(rows)
    args = _training_args(cfg, device)
    sft_cls, grpo_cls, dpo_cls = _trainer_classes()
    callbacks = [_masked_checkpoint_callback(cfg, tokenizer)]
    if cfg.algo == "sft":
        trainer = sft_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=callbacks)
    elif cfg.algo == "dpo":
        trainer = dpo_cls(
            model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer,
            callbacks=callbacks, wemask_handles=[handle, ref_handle], ref_mask=cfg.ref_mask)
        if cfg.precompute_ref and reference is not None:
            trainer.ref_model = None  # its log-probs are in the dataset now: free the copy
            if ref_handle is not None:
                ref_handle.remove()
    else:
        trainer = grpo_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           reward_funcs=[correctness_reward, format_reward],
                           callbacks=callbacks + [_zero_std_callback()], ref_model=reference)
        ref = trainer.accelerator.unwrap_model(trainer.ref_model) if trainer.ref_model is not None else None
        if ref is not None and not active_wemasks(ref):  # beta > 0: the KL anchor is masked too
            ref_handle = apply_wemask(ref, cfg.wemask, tokenizer=tokenizer)
    trainer.melayer_config = cfg  # what _ConfigsFirst writes into every checkpoint
    if trainer.is_world_process_zero():
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
        write_model_card(final_dir, cfg)
        mark_complete(final_dir, trainer.state.global_step)
    per_rank = _gather_counts(handle.fired)
    result = TrainResult(out=Path(cfg.out), final_dir=final_dir, config=cfg,
                         log_history=list(trainer.state.log_history), wemask_fired=handle.fired,
                         trainer=trainer if keep_trainer else None, handle=handle, data_stats=data_stats,
                         ref_tokens_masked=getattr(trainer, "ref_tokens_masked", None),
                         ref_forwards=getattr(trainer, "ref_forwards", None), wemask_fired_per_rank=per_rank)
    if trainer.is_world_process_zero():
        write_train_report(result)
    return result

