"""`melayer train sft|grpo|dpo`: fine-tuning with WeMask in every forward, every rollout and (DPO, by default)
every reference forward."""
from __future__ import annotations

import os

from ..report import console_table
from ..training import TrainConfig, train
from ..training.config import DPO_LOSSES, PREFERENCE_SOURCES, REF_MASKS, ROLLOUTS, SCHEDULERS
from ..training.preferences import TRAIN_PAIRS
from ..training.report import summary
from .common import add_data_dir_arg, add_model_args, add_parser, add_wemask_args, wemask_from_args

ALGOS = {"sft": "supervised fine-tuning on the GSM8K solutions",
         "grpo": "GRPO with exact-answer and format rewards, rollouts by the hooked model or vLLM",
         "dpo": "DPO on preference pairs (on-policy refusal/GSM8K pairs, or a preference file)"}
DPO_DATA_HELP = (f"{' or '.join(PREFERENCE_SOURCES)}: on-policy pairs sampled from this model (masked as trained) "
                 f"and judged by melayer, built into the run folder (--limit pairs, default {TRAIN_PAIRS}: small, "
                 "for a quick run); or a preference JSONL/JSON (prompt/chosen/rejected, chats or text, e.g. from "
                 "`melayer data preferences`); or a hub dataset id (its train split)")


def register(sub) -> None:
    p = add_parser(sub, "train", "fine-tune (SFT, GRPO or DPO) with WeMask in every forward and rollout")
    algos = p.add_subparsers(dest="algo", required=True, metavar="ALGO")
    for algo, help_text in ALGOS.items():
        a = add_parser(algos, algo, help_text)
        add_model_args(a)
        if algo == "dpo":
            a.add_argument("--data", default="refusal", metavar="SET", help=DPO_DATA_HELP)
            add_data_dir_arg(a, "refusal/*_val.json or gsm8k/train.jsonl (the prompts of --data refusal|gsm8k)")
            a.add_argument("--limit", type=int, default=None, metavar="N",
                           help="pairs: built (refusal/gsm8k) or a seeded subset of the file's")
        else:
            a.add_argument("--data", default="gsm8k", choices=["gsm8k"])
            add_data_dir_arg(a, "gsm8k/train.jsonl")
            a.add_argument("--limit", type=int, default=None, metavar="N", help="train on a seeded subset of N rows")
        add_wemask_args(a, rate_help="fraction of hidden dims masked at the first token (0: baseline, no mask)")
        a.add_argument("--lora", action="store_true", help="train LoRA adapters (all linear layers)")
        a.add_argument("--lora-r", type=int, default=16)
        a.add_argument("--lora-alpha", type=int, default=32)
        a.add_argument("--max-steps", type=int, default=-1, metavar="N", help="optimizer steps (-1: one epoch)")
        a.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: SFT 2e-5 / LoRA 2e-4, GRPO 1e-6 / LoRA 1e-5, "
                            "DPO 1e-6 / LoRA 5e-6)")
        a.add_argument("--lr-scheduler", default="cosine", choices=SCHEDULERS)
        a.add_argument("--warmup", type=float, default=0.03,
                       help="warm-up: a fraction of the steps (< 1) or a number of steps (step 1 already learns)")
        a.add_argument("--batch-size", type=int, default=8, metavar="B",
                       help="per device" + (" (DPO: pairs)" if algo == "dpo" else ""))
        a.add_argument("--grad-accum", type=int, default=1, metavar="N")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--save-steps", type=int, default=200, metavar="N")
        a.add_argument("--save-total-limit", type=int, default=None, metavar="N")
        a.add_argument("--logging-steps", type=int, default=10, metavar="N")
        a.add_argument("--no-gradient-checkpointing", action="store_true")
        a.add_argument("--out", default=None, metavar="DIR", help=f"run folder (default: runs/train_{algo})")
        a.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        if algo == "sft":
            a.add_argument("--max-length", type=int, default=512, metavar="N",
                           help="prompt + answer tokens (longer rows are counted, reported and cut)")
        elif algo == "dpo":
            a.add_argument("--max-length", type=int, default=512, metavar="N",
                           help="prompt + completion tokens (longer pairs are counted, reported and cut)")
            a.add_argument("--beta", type=float, default=0.1, help="DPO temperature (weight of the implicit KL)")
            a.add_argument("--loss-type", default="sigmoid", choices=DPO_LOSSES)
            a.add_argument("--ref-mask", default="policy", choices=REF_MASKS,
                           help="reference forwards masked like the policy (the reference is the initial policy "
                                "being optimised: step-1 loss ln 2) or unmasked (the mask's own log-prob shift "
                                "then enters every margin)")
            a.add_argument("--precompute-ref", action="store_true",
                           help="compute the reference log-probs once before training (no reference in memory "
                                "while training)")
        else:
            a.add_argument("--num-generations", type=int, default=8, metavar="G", help="rollouts per prompt")
            a.add_argument("--max-completion-length", type=int, default=256, metavar="N")
            a.add_argument("--temperature", type=float, default=1.0)
            a.add_argument("--beta", type=float, default=0.0,
                           help="KL weight (0: no reference model; the official recipe uses 0.001)")
            a.add_argument("--format-weight", type=float, default=0.2,
                           help="weight of the format reward ('#### N' last line or \\boxed{N}); correctness: 1")
            a.add_argument("--rollouts", default="hf", choices=ROLLOUTS,
                           help="who generates: the hooked policy (hf) or TRL's colocated vLLM engine with "
                                "melayer's plugin masking it the same way (vllm; correct mode)")
            a.add_argument("--vllm-memory", type=float, default=0.3, metavar="F",
                           help="--rollouts vllm: the GPU share of the engine")
        a.set_defaults(handler=run)


def config_from_args(args) -> TrainConfig:
    if args.algo == "sft":
        extra = {"max_length": args.max_length}
    elif args.algo == "dpo":
        extra = dict(max_length=args.max_length, beta=args.beta, loss_type=args.loss_type, ref_mask=args.ref_mask,
                     precompute_ref=args.precompute_ref)
    else:
        extra = dict(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                     temperature=args.temperature, beta=args.beta, format_weight=args.format_weight,
                     rollouts=args.rollouts, vllm_memory=args.vllm_memory)
    return TrainConfig(
        algo=args.algo, model=args.model, data=args.data, data_dir=args.data_dir, limit=args.limit,
        out=args.out or f"runs/train_{args.algo}", wemask=wemask_from_args(args), lora=args.lora,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, max_steps=args.max_steps, lr=args.lr,
        lr_scheduler=args.lr_scheduler, warmup=args.warmup, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seed=args.seed, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, gradient_checkpointing=not args.no_gradient_checkpointing,
        dtype=args.dtype or "fp32", device=args.device, resume=args.resume, **extra)


def run(args) -> int:
    result = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: process 0 reports for all
        return 0
    console_table(f"melayer train {args.algo}: {result.out}", ["metric", "value"], summary(result).items())
    print(f"final model: {result.final_dir}  (report: {result.out / 'train_report.md'})")
    return 0
