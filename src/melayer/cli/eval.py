"""`melayer eval`: lm-eval tasks under WeMask rate sweeps (CIs, paired tests, resumable per-request logs)."""
from __future__ import annotations

import argparse

from ..errors import MelayerError
from ..evaluate import PROTOCOLS, EvalConfig, run_eval
from ..evaluate.runner import ENGINES
from ..evaluate.shards import merge_shards, parse_shard
from ..masking import MODES
from .common import add_data_dir_arg, add_model_args, add_out_arg, add_parser, check_out_dir, parse_floats, \
    parse_layers


def register(sub) -> None:
    p = add_parser(sub, "eval", "lm-eval tasks under WeMask rate sweeps (CIs, paired tests, resumable)",
                   "Evaluate a model on lm-eval tasks at several WeMask rates, on the same documents, and compare "
                   "every condition with rate 0 (paired tests, Holm correction).")
    add_model_args(p)
    p.add_argument("--tasks", default=None,
                   help="(default: melayer_gsm8k) comma-separated lm-eval tasks, groups or tags; melayer's own: melayer_gsm8k, melayer_math500, "
                        "melayer_aime, melayer_aime24, melayer_ifeval, melayer_mmlu, melayer_mmlu_text, melayer_xstest, "
                        "melayer_advbench, melayer_harmbench, melayer_harmless, melayer_wikitext2 (and _paper "
                        "variants)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="clean",
                   help="clean (melayer's) or paper (the official evaluation's prompts, chat template, layer sets, "
                        "masking mode and precision per task); the flags below override it")
    g = p.add_argument_group("WeMask sweep")
    g.add_argument("--wemask-rates", default=None, metavar="R,R,...",
                   help="rates to sweep, e.g. 0,0.01,0.05 (default: 0, or the mask saved with the model)")
    g.add_argument("--wemask-mode", default=None, metavar="M[,M]",
                   help=f"{' or '.join(MODES)}, or both (default: the protocol's)")
    g.add_argument("--wemask-layers", nargs="+", default=None, metavar="SET",
                   help="layer sets to sweep: after_me, from_after_me, me, or comma-separated 0-based blocks "
                        "(default: the protocol's, per task)")
    g.add_argument("--me-layer", type=int, default=None, metavar="N", help="0-based ME block (default: found by a "
                                                                          "scan)")
    p.add_argument("--limit", type=int, default=None, help="evaluate N documents per task, drawn with --seed")
    p.add_argument("--seed", type=int, default=0)
    add_data_dir_arg(p)
    add_out_arg(p, "out/eval", "output folder (resumed if it exists)")
    p.add_argument("--batch-size", type=int, default=64, help="requests per model call")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the chat template (default: the protocol's, per task)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's own")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="generation engine: auto = static KV cache + CUDA graph for greedy decoding on a GPU, the "
                        "compact engine (drops finished rows) on a CPU, HF generate when sampling; hf = "
                        "model.generate; vllm = lm-eval's vLLM model with WeMask in vLLM's own model classes (one "
                        "engine per condition; needs vLLM)")
    p.add_argument("--vllm-args", default=None, metavar="K=V,...",
                   help="--engine vllm: vLLM's LLM(...) arguments in lm-eval's model_args syntax, e.g. "
                        "tensor_parallel_size=2,max_model_len=4096 (on a CPU the defaults are enforce_eager=True, "
                        "gpu_memory_utilization=0.2, kv_cache_memory_bytes=1073741824)")
    p.add_argument("--compile", action="store_true",
                   help="static engine: torch.compile the decode step (faster on a GPU for long runs; compiles once "
                        "per batch shape)")
    p.add_argument("--refusal-classifier", default="prefix",
                   help="the refusal tasks' `refusal` metric: prefix (XSTest's string match) or substring (the GCG "
                        "list); `refusal_substring` is always reported too")
    p.add_argument("--score-only", action="store_true",
                   help="rescore an existing --out from its logged answers (no model is loaded): its last command's "
                        "sweep, or the part --tasks, --wemask-rates, --wemask-layers, --limit name; unfinished "
                        "conditions are skipped and named in the report")
    g = p.add_argument_group("data parallel (one sweep over several processes, GPUs or nodes)")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="evaluate shard I (0-based) of N: every N-th document of each task, in its own --out")
    g.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="join the folders of shards 0..N-1 of one sweep into --out and score the whole sweep (no "
                        "model is loaded, only its tokenizer: give the model where the shards ran on another machine)")
    p.set_defaults(handler=run)


def config_from_args(args) -> EvalConfig:
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    modes = [m.strip() for m in args.wemask_mode.split(",") if m.strip()] if args.wemask_mode else None
    layers = [parse_layers(s) for s in args.wemask_layers] if args.wemask_layers else None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = None if args.score_only else ["melayer_gsm8k"]
    return EvalConfig(
        model=args.model, tasks=tasks,
        include_path=args.include_path, protocol=args.protocol,
        wemask_rates=parse_floats(args.wemask_rates, "--wemask-rates") if args.wemask_rates else None,
        wemask_modes=modes, wemask_layers=layers, me_layer=args.me_layer, limit=args.limit, seed=args.seed,
        data_dir=args.data_dir, out=args.out, batch_size=args.batch_size, chat=args.chat,
        max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        engine=args.engine, compile=args.compile, vllm_args=parse_vllm_args(args.vllm_args),
        refusal_classifier=args.refusal_classifier,
        score_only=args.score_only, shard_index=shard[0], num_shards=shard[1], device=args.device,
        dtype=args.dtype)


def parse_vllm_args(text) -> dict:
    """``key=value,...`` typed as lm-eval types its model_args (numbers, true/false, none)."""
    if not text:
        return {}
    if any("=" not in part for part in text.split(",") if part):
        raise MelayerError(f"--vllm-args must be key=value pairs joined by commas, got {text!r}")
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def run(args) -> int:
    if args.merge:
        if args.shard or args.score_only:
            raise MelayerError("--merge takes the shard folders, --out and optionally the model (not --shard or "
                              "--score-only)")
        check_out_dir(args.out)
        merge_shards(args.merge, args.out, args.data_dir, model=None if args.model == "default" else args.model)
        print(f"report: {args.out}/report.md (merged from {len(args.merge)} shards)")
        return 0
    cfg = config_from_args(args)
    cfg.validate()
    check_out_dir(cfg.out)
    run_eval(cfg)
    print(f"report: {cfg.out}/report.md (JSON: report.json, CSV: summary.csv, lm-eval results: results.json, "
          f"lm_eval/<condition>/)")
    return 0
