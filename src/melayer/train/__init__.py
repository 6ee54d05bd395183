"""`melayer train sft|grpo`: fine-tune on GSM8K with WeMask active in every forward and every rollout.

TRL (SFTTrainer, GRPOTrainer with HF generation) and PEFT (LoRA) are optional dependencies
(``requirements/train.txt``); they are imported only when a run starts.
"""
from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "train", "register_cli"]


def train(cfg: TrainConfig, model=None, tokenizer=None, keep_trainer: bool = False):
    """See :func:`melayer.train.runner.train` (imported lazily: TRL is heavy)."""
    from .runner import train as _train

    return _train(cfg, model=model, tokenizer=tokenizer, keep_trainer=keep_trainer)


def register_cli(sub) -> None:
    from ..cli import model_argument
    from ..wemask import MODES, SCORES
    from .config import SCHEDULERS

    p = sub.add_parser("train", help="fine-tune (SFT or GRPO) on GSM8K with WeMask in every forward and rollout")
    algos = p.add_subparsers(dest="algo", required=True, metavar="ALGO")
    for algo, help_text in (("sft", "supervised fine-tuning on the GSM8K solutions"),
                            ("grpo", "GRPO with exact-answer and format rewards, HF-generate rollouts")):
        a = algos.add_parser(algo, help=help_text)
        model_argument(a)
        a.add_argument("--data", default="gsm8k", choices=["gsm8k"])
        a.add_argument("--data-dir", default=None, metavar="DIR",
                       help="folder with gsm8k/train.jsonl (default: the Hugging Face hub)")
        a.add_argument("--limit", type=int, default=None, metavar="N", help="train on a seeded subset of N rows")
        a.add_argument("--wemask-rate", type=float, default=0.0, metavar="R",
                       help="fraction of hidden dims masked at the first token (0: baseline, no mask)")
        a.add_argument("--wemask-layers", default="after_me", metavar="L",
                       help="after_me (default), from_after_me, me, or comma-separated 0-based block indices")
        a.add_argument("--wemask-mode", choices=MODES, default="correct")
        a.add_argument("--wemask-score", choices=SCORES, default="activation")
        a.add_argument("--wemask-gamma", type=float, default=0.0, metavar="G")
        a.add_argument("--me-layer", type=int, default=None, help="ME block (default: found by a scan)")
        a.add_argument("--lora", action="store_true", help="train LoRA adapters (all linear layers)")
        a.add_argument("--lora-r", type=int, default=16)
        a.add_argument("--lora-alpha", type=int, default=32)
        a.add_argument("--max-steps", type=int, default=-1, metavar="N", help="optimizer steps (-1: one epoch)")
        a.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: SFT 2e-5 / LoRA 2e-4, GRPO 1e-6 / LoRA 1e-5)")
        a.add_argument("--lr-scheduler", default="cosine", choices=SCHEDULERS)
        a.add_argument("--warmup", type=float, default=0.03,
                       help="warm-up: a fraction of the steps (< 1) or a number of steps")
        a.add_argument("--batch-size", type=int, default=8, metavar="B", help="per device")
        a.add_argument("--grad-accum", type=int, default=1, metavar="N")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--save-steps", type=int, default=200, metavar="N")
        a.add_argument("--save-total-limit", type=int, default=None, metavar="N")
        a.add_argument("--logging-steps", type=int, default=10, metavar="N")
        a.add_argument("--no-gradient-checkpointing", action="store_true")
        a.add_argument("--out", default=None, metavar="DIR", help=f"run folder (default: runs/train_{algo})")
        a.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        if algo == "sft":
            a.add_argument("--max-length", type=int, default=512, metavar="N", help="prompt + answer tokens")
        else:
            a.add_argument("--num-generations", type=int, default=8, metavar="G")
            a.add_argument("--max-completion-length", type=int, default=256, metavar="N")
            a.add_argument("--temperature", type=float, default=1.0)
            a.add_argument("--beta", type=float, default=0.0, help="KL weight (0: no reference model)")
            a.add_argument("--format-weight", type=float, default=0.2,
                           help="weight of the format reward ('#### N' last line or \\boxed{N}); correctness: 1")
        a.set_defaults(handler=_run_cli)


def config_from_args(args) -> TrainConfig:
    from ..wemask import WeMaskConfig, parse_layers

    wemask = WeMaskConfig(rate=args.wemask_rate, layers=parse_layers(args.wemask_layers), mode=args.wemask_mode,
                          score=args.wemask_score, gamma=args.wemask_gamma, me_layer=args.me_layer)
    extra = ({"max_length": args.max_length} if args.algo == "sft" else
             dict(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                  temperature=args.temperature, beta=args.beta, format_weight=args.format_weight))
    return TrainConfig(
        algo=args.algo, model=args.model, data=args.data, data_dir=args.data_dir, limit=args.limit,
        out=args.out or f"runs/train_{args.algo}", wemask=wemask, lora=args.lora, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, max_steps=args.max_steps, lr=args.lr, lr_scheduler=args.lr_scheduler,
        warmup=args.warmup, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seed=args.seed, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
        gradient_checkpointing=not args.no_gradient_checkpointing, dtype=args.dtype or "fp32",
        device=args.device, resume=args.resume, **extra)


def _run_cli(args) -> int:
    from ..report import console_table
    from .report import summary

    result = train(config_from_args(args))
    console_table(f"melayer train {args.algo}: {result.out}", ["metric", "value"], summary(result).items())
    print(f"final model: {result.final_dir}  (report: {result.out / 'train_report.md'})")
    return 0
