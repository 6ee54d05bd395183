"""`melayer eval`: benchmarks under WeMask rate sweeps, with CIs, paired tests and resumable per-sample logs.

Public API: :class:`EvalConfig`, :func:`run_eval` (run or resume a sweep), :func:`score_existing`
(score a ``--generate-only`` out dir), the task registry :data:`TASKS`, and
:func:`register_refusal_classifier` to swap the refusal detector.
"""
from __future__ import annotations

from ..errors import MelayerError
from .runner import EvalConfig, run_eval, score_existing
from .scorers import register_refusal_classifier
from .tasks import TASKS

__all__ = ["EvalConfig", "run_eval", "score_existing", "register_refusal_classifier", "TASKS", "register_cli"]


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MelayerError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def config_from_args(args) -> EvalConfig:
    from ..wemask import parse_layers

    return EvalConfig(
        model=args.model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        wemask_rates=_floats(args.wemask_rates, "--wemask-rates") if args.wemask_rates else None,
        wemask_modes=[m.strip() for m in args.wemask_mode.split(",") if m.strip()],
        wemask_layers=parse_layers(args.wemask_layers), me_layer=args.me_layer, limit=args.limit, seed=args.seed,
        data_dir=args.data_dir, out=args.out, batch_size=args.batch_size, chat=args.chat,
        max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        engine=args.engine, compile=args.compile, refusal_classifier=args.refusal_classifier, ppl_seq_len=args.ppl_seq_len,
        generate_only=args.generate_only, score_only=args.score_only, device=args.device, dtype=args.dtype)


def _command(args) -> int:
    cfg = config_from_args(args)
    summary = run_eval(cfg)
    if summary is None:
        print(f"outputs in {cfg.out}/samples.jsonl; score them with: melayer eval --score-only --out {cfg.out}")
    else:
        print(f"report: {cfg.out}/report.md (JSON: report.json, CSV: summary.csv, plot: score_vs_rate.png)")
    return 0


def register_cli(sub) -> None:
    import argparse

    from ..cli import model_argument

    p = sub.add_parser("eval", help="benchmarks under WeMask rate sweeps (CIs, paired tests, resumable)",
                       description="Evaluate a model on benchmarks at several WeMask rates, on the same items.")
    model_argument(p)
    p.add_argument("--tasks", default="gsm8k", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--wemask-rates", default=None, metavar="R,R,...",
                   help="WeMask rates to sweep, e.g. 0,0.001,0.01,0.05 (default: 0, or the mask saved with the model)")
    p.add_argument("--wemask-layers", default="after_me",
                   help="after_me (default), from_after_me, me, or comma-separated 0-based blocks")
    p.add_argument("--wemask-mode", default="correct",
                   help="correct, paper, or both: correct,paper (paper mode applies the official index-0 mask to "
                        "each item as if it ran alone, as the paper evaluated, even in a left-padded batch)")
    p.add_argument("--me-layer", type=int, default=None, help="ME block (default: found by a scan)")
    p.add_argument("--limit", type=int, default=None, help="evaluate N items per task, drawn with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="local data folder (layout of shared/data); default: the hub")
    p.add_argument("--out", default="out/eval", help="output folder (resumed if it exists)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default 64)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the chat template (default: on)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's default")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "static"],
                   help="generation engine: auto = static KV cache + CUDA graph for greedy decoding on a GPU, else "
                        "HF generate")
    p.add_argument("--compile", action="store_true",
                   help="static engine: torch.compile the decode step (about 2x faster on a GPU; ~30 s to "
                        "compile per batch shape, so for long runs)")
    p.add_argument("--refusal-classifier", default="prefix",
                   help="prefix (XSTest string match, default) or substring (GCG list)")
    p.add_argument("--ppl-seq-len", type=int, default=1024, help="perplexity window length in tokens")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--generate-only", action="store_true",
                      help="write outputs without scoring (needs only torch/transformers)")
    mode.add_argument("--score-only", action="store_true", help="score an existing --out folder, no model")
    p.set_defaults(handler=_command)
