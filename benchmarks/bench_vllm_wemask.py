"""WeMask's cost inside vLLM: an unmasked and a masked engine, live side by side, timed alternately on the same work.

    python benchmarks/bench_vllm_wemask.py --model SmolLM2-135M-Instruct.Q4_1.gguf --items-per-task 128 \\
        --max-new-tokens 256 --me-layer 11 --repeats 7 --data-dir shared/data --out docs/results/bench_vllm_wemask_gpu

Every request generates exactly ``--max-new-tokens`` (EOS ignored), so both engines do the same work whatever the
mask changes in the text (with real EOS the masked run answers differently, and its speed says more about output
lengths than about the mask). The prompts are the engine benchmark's (``bench_engines.py``: GSM8K, IFEval and
XSTest, chat template). Runs alternate in pairs after ``--warmup`` untimed rounds, the order reversed every other
round (unmasked, masked; masked, unmasked; ...), so drift in clocks or load hits both and neither engine always
runs second. Prints and writes (``--out``: JSON + Markdown) each engine's median wall, the median of
the paired ratios masked / unmasked with its 95 % bootstrap CI over the pairs (a drift shared by a pair cancels),
the verdict against ``--target`` (met, missed or not shown) and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from melayer.stats import paired_ratio, target_verdict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import TASKS, vllm_base_args, workload  # noqa: E402  (the same prompts as the engine benchmark)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--items-per-task", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--rate", type=float, default=0.05, help="WeMask rate (block ME+1)")
    p.add_argument("--me-layer", type=int, default=None, help="0-based ME block (default: found by a scan)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per engine (alternating)")
    p.add_argument("--warmup", type=int, default=1, help="untimed alternating rounds first (clocks, caches settle)")
    p.add_argument("--target", type=float, default=1.03, help="the overhead target the paired CI is judged against")
    p.add_argument("--vllm-args", default="", help="extra LLM(...) arguments, key=value,... (lm-eval syntax)")
    p.add_argument("--out", default=None, help="write bench_vllm_wemask.json/.md here")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats must be at least 2 (the CI resamples paired runs)")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")

    import torch
    from vllm import LLM, SamplingParams

    from melayer import load_model
    from melayer.masking import WeMaskConfig
    from melayer.vllm_backend import engine_kwargs, wemask_entry

    on_gpu = torch.cuda.is_available()
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)  # tokenizer, ME layer, mask size only
    prompts = [ids for _, ids in workload(tok, args.data_dir, args.items_per_task, 0)]
    wemask = WeMaskConfig(rate=args.rate, me_layer=args.me_layer).resolved(model, tok)
    del model
    base = vllm_base_args(args.model, on_gpu, args.vllm_args, gpu_defaults={"gpu_memory_utilization": 0.3})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": q} for q in prompts]

    engines, start_s = {}, {}
    for name, entry in (("unmasked", None), ("wemask", wemask_entry(wemask))):
        t0 = time.perf_counter()
        engines[name] = LLM(**engine_kwargs(entry, base, on_gpu))
        start_s[name] = time.perf_counter() - t0
    walls: dict[str, list[float]] = {name: [] for name in engines}
    tokens = {}
    for round_ in range(args.warmup + args.repeats):  # the warm-up rounds: kernels, graphs, allocator, clocks
        order = list(engines.items())
        for name, llm in order[::-1] if round_ % 2 else order:  # either engine first in half the rounds
            t0 = time.perf_counter()
            done = llm.generate(requests, params, use_tqdm=False)
            if round_ >= args.warmup:
                walls[name].append(time.perf_counter() - t0)
            tokens[name] = sum(len(d.outputs[0].token_ids) for d in done)
    med = {name: statistics.median(w) for name, w in walls.items()}
    ratio = med["wemask"] / med["unmasked"]
    paired, (lo, hi) = paired_ratio(walls["wemask"], walls["unmasked"])
    verdict = target_verdict((lo, hi), args.target)
    result = {"model": args.model, "dtype": base["dtype"], "items": len(prompts), "tasks": list(TASKS),
              "max_new_tokens": args.max_new_tokens, "ignore_eos": True, "repeats": args.repeats, "warmup": args.warmup,
              "wemask": {"rate": wemask.rate, "layers": wemask.layers, "me_layer": wemask.me_layer},
              "engine_args": {k: v for k, v in base.items() if k != "model"}, "start_s": start_s, "walls_s": walls,
              "median_wall_s": med, "tokens": tokens, "tokens_per_s": {n: tokens[n] / med[n] for n in med},
              "overhead_ratio_of_medians": ratio, "paired_overhead": paired, "paired_overhead_ci95": [lo, hi],
              "target": args.target, "verdict": verdict, "command": " ".join(sys.argv)}
    lines = [f"# WeMask inside vLLM: {len(prompts)} prompts x {args.max_new_tokens} tokens (EOS ignored), "
             f"{args.repeats} alternating runs each", "",
             "| engine | median wall s | runs (s) | tokens/s |", "|---|---|---|---|"]
    for name in engines:
        lines.append(f"| {name} | {med[name]:.3f} | {', '.join(f'{w:.3f}' for w in walls[name])} | "
                     f"{tokens[name] / med[name]:,.0f} |")
    lines += ["", f"masked / unmasked: **{paired:.3f}** (median of the {args.repeats} paired ratios; 95 % bootstrap CI "
              f"{lo:.3f} - {hi:.3f}; target ≤ {args.target:g}: {verdict}); ratio of the median walls {ratio:.3f}",
              "", f"Command: `{result['command']}`"]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_vllm_wemask.json").write_text(json.dumps(result, indent=2))
        (out / "bench_vllm_wemask.md").write_text("\n".join(lines) + "\n")
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
