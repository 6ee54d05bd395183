"""`melayer eval`: benchmarks under WeMask rate sweeps (CIs, paired tests, resumable per-item logs)."""
from __future__ import annotations

import argparse

from ..evaluate import TASKS, EvalConfig, run_eval
from ..generation import ENGINES
from .common import add_data_dir_arg, add_model_args, add_out_arg, add_parser, add_wemask_args, parse_layers, \
    sweep_from_args


def register(sub) -> None:
    p = add_parser(sub, "eval", "benchmarks under WeMask rate sweeps (CIs, paired tests, resumable)",
                   "Evaluate a model on benchmarks at several WeMask rates, on the same items.")
    add_model_args(p)
    p.add_argument("--tasks", default="gsm8k", help=f"comma-separated: {', '.join(TASKS)}")
    add_wemask_args(p, sweep=True)
    p.add_argument("--limit", type=int, default=None, help="evaluate N items per task, drawn with --seed")
    p.add_argument("--seed", type=int, default=0)
    add_data_dir_arg(p)
    add_out_arg(p, "out/eval", "output folder (resumed if it exists)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's default")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="generation engine: auto = static KV cache + CUDA graph for greedy decoding on a GPU, the "
                        "compact engine (drops finished rows) on a CPU, HF generate when sampling; hf = "
                        "model.generate")
    p.add_argument("--compile", action="store_true",
                   help="static engine: torch.compile the decode step (faster on a GPU for long runs; compiles once "
                        "per batch shape)")
    p.add_argument("--refusal-classifier", default="prefix",
                   help="prefix (XSTest string match) or substring (GCG list)")
    p.add_argument("--ppl-seq-len", type=int, default=1024, help="perplexity window length in tokens")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--generate-only", action="store_true",
                      help="write outputs without scoring (needs only torch/transformers)")
    mode.add_argument("--score-only", action="store_true", help="score an existing --out folder, no model")
    p.set_defaults(handler=run)


def config_from_args(args) -> EvalConfig:
    rates, modes = sweep_from_args(args)
    return EvalConfig(
        model=args.model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], wemask_rates=rates,
        wemask_modes=modes, wemask_layers=parse_layers(args.wemask_layers), me_layer=args.me_layer,
        limit=args.limit, seed=args.seed, data_dir=args.data_dir, out=args.out, batch_size=args.batch_size,
        chat=args.chat, max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, engine=args.engine, compile=args.compile, refusal_classifier=args.refusal_classifier,
        ppl_seq_len=args.ppl_seq_len, generate_only=args.generate_only, score_only=args.score_only,
        device=args.device, dtype=args.dtype)


def run(args) -> int:
    cfg = config_from_args(args)
    summary = run_eval(cfg)
    if summary is None:
        print(f"outputs in {cfg.out}/samples.jsonl; score them with: melayer eval --score-only --out {cfg.out}")
    else:
        print(f"report: {cfg.out}/report.md (JSON: report.json, CSV: summary.csv, plot: score_vs_rate.png)")
    return 0
