"""Generation engines side by side on one real workload, in one process: tokens/s, items/s and token agreement.

    python benchmarks/bench_engines.py --model default --items-per-task 16 --max-new-tokens 256 --batch-size 16 \\
        --data-dir ../shared/data --out docs/results/bench_engines_cpu

The workload is what a SmolLM2 sweep generates: GSM8K, IFEval and XSTest prompts (chat template, greedy, the
model's real EOS, so output lengths vary). Every engine gets the same prompts; melayer's batched engines and
``generate`` get length-sorted batches of ``--batch-size``; the continuous-batching engines (transformers'
``generate_batch``, vLLM) get every prompt at once and schedule them themselves. Each engine first runs the whole
workload once untimed (``--warmup workload``: static caches compile and CUDA graphs capture once per batch shape,
and the allocator grows to its peak; ``--warmup batch``, one batch of 8 new tokens, is cheaper but leaves those
costs in the first timed run), then the workload ``--repeats`` times (median wall; every wall is kept).
Engines:

- ``hf_generate``: ``model.generate`` with the dynamic cache (the reference for token agreement);
- ``hf_static``: ``model.generate(cache_implementation="static")``;
- ``hf_continuous``: transformers' continuous batching (``model.generate_batch``; paged cache);
- ``melayer_compact`` / ``melayer_static``: melayer's engines (``static`` on CUDA only);
- ``vllm``: vLLM (``--vllm``, needs vLLM), melayer's plugin loaded;
- each ``… + wemask``: the same under WeMask (``--rate``, block ME+1), against ``hf_generate + wemask``.

WeMask runs on engines whose positions melayer's hooks can read: ``generate``, melayer's engines and vLLM (the
plugin reads vLLM's positions); transformers' continuous batching packs requests into one row, which the HF hooks
do not support, so it runs unmasked only. Figures and commands: ``docs/results/bench_engines.md``.

With ``--out``, each finished engine is appended to ``<out>/bench_engines_runs.jsonl`` (its generated ids and
walls) and the report is rewritten: a killed run keeps what finished, and the same command run again reuses the
engines whose settings match and runs only the others (``--engines`` may name a subset to add to a report).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from melayer.io import JsonlLog

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("gsm8k", "ifeval", "xstest")
WARMUP_TOKENS = 8  # new tokens of the untimed warm-up batch of --warmup batch


def workload(tokenizer, data_dir: str, per_task: int, seed: int) -> list[tuple[str, list[int]]]:
    """(task, chat-templated prompt ids) for ``per_task`` seeded items of each task."""
    from melayer import data
    from melayer.text import encode_prompt
    from melayer.training.data import GSM8K_PROMPT

    text = {"gsm8k": lambda r: GSM8K_PROMPT.format(question=r["question"]), "ifeval": lambda r: r["prompt"],
            "xstest": lambda r: r["prompt"]}
    return [(task, encode_prompt(tokenizer, text[task](row), chat=True))
            for task in TASKS for row in data.select(data.load(task, data_dir), per_task, seed)]


def trim(ids, eos: set[int]) -> list[int]:
    """Generated ids up to (not including) the first EOS."""
    out = []
    for t in ids:
        if int(t) in eos:
            break
        out.append(int(t))
    return out


def batched(prompts: list[list[int]], size: int, run: Callable) -> list[list[int]]:
    """Length-sorted batches through ``run(list of ids) -> list of generated ids``, answers in prompt order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list = [None] * len(prompts)
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        for i, ids in zip(idx, run([prompts[i] for i in idx])):
            out[i] = ids
    return out


def hf_engine(model, tokenizer, max_new: int, eos: set[int], static: bool = False) -> Callable:
    from melayer.text import left_pad, pad_id

    pad = pad_id(tokenizer)

    def run(batch):
        ids, mask = left_pad(batch, pad)
        extra = {"cache_implementation": "static"} if static else {}
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=sorted(eos), pad_token_id=pad, **extra)
        return [trim(row, eos) for row in out[:, ids.shape[1]:].cpu()]

    return run


def melayer_engine(model, tokenizer, max_new: int, eos: set[int], engine: str) -> Callable:
    from melayer.generation import GenerationConfig, generate_batch
    from melayer.text import left_pad, pad_id

    pad = pad_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new, engine=engine)

    def run(batch):
        ids, mask = left_pad(batch, pad)
        out = generate_batch(model, ids.to(model.device), mask.to(model.device), config, sorted(eos), pad)
        return [trim(row, eos) for row in out.cpu()]

    return run


def hf_continuous(model, prompts, max_new: int, eos: set[int], pad: int) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos), pad_token_id=pad)
    with torch.no_grad():
        done = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    by_id = {rid: trim(out.generated_tokens, eos) for rid, out in done.items()}
    return [by_id[rid] for rid in sorted(by_id, key=lambda r: int(r.split("_")[-1]))]


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    """Items with identical tokens, and the mean share of each reference continuation matched from its start."""
    same = sum(g == r for g, r in zip(got, ref))
    prefix = []
    for g, r in zip(got, ref):
        n = 0
        while n < min(len(g), len(r)) and g[n] == r[n]:
            n += 1
        prefix.append(n / max(len(r), 1))
    return {"identical": same, "items": len(ref), "prefix_share": sum(prefix) / len(prefix)}


def load_runs(log: Optional[JsonlLog], same_run: dict) -> dict[str, dict]:
    """The engines an earlier run with the same settings finished (``bench_engines_runs.jsonl``; the last row of
    an engine counts)."""
    runs: dict[str, dict] = {}
    for row in log.read() if log is not None else []:
        if row.pop("same_run", None) == same_run:
            runs[row.pop("engine")] = row
    return runs


def vllm_base_args(model: str, on_gpu: bool, extra: Optional[str] = None,
                   gpu_defaults: Optional[dict] = None) -> dict:
    """``LLM(...)`` arguments for a benchmark engine: the local model folder, bf16 on a GPU (fp32 on a CPU), seed 0,
    melayer eval's CPU defaults (or ``gpu_defaults``), then ``extra`` (``--vllm-args``, ``k=v,k=v``) on top."""
    from lm_eval.utils import simple_parse_args_string

    from melayer.evaluate.runner import VLLM_CPU_DEFAULTS
    from melayer.load import local_location

    base = {"model": local_location(model)[1], "dtype": "bfloat16" if on_gpu else "float32", "seed": 0,
            **((gpu_defaults or {}) if on_gpu else VLLM_CPU_DEFAULTS)}
    return {**base, **(simple_parse_args_string(extra) if extra else {})}


def report(runs: dict[str, dict], setup: dict, out: Optional[Path], show: bool = True) -> None:
    """The table of every finished engine (speed against ``hf_generate``, tokens against its output), printed
    (``show``) and, with ``out``, written as bench_engines.json/.md."""
    from melayer.report import console_table, markdown_table, write_report

    ref = runs.get("hf_generate", {}).get("ids")
    ref_masked = runs.get("hf_generate + wemask", {}).get("ids")
    ref_speed = runs.get("hf_generate", {}).get("tokens_per_s")
    rows, table = [], []
    for name, r in runs.items():
        if "error" in r:
            rows.append({"engine": name, "error": r["error"]})
            table.append([name, "–", "–", "–", "–", "–", "–", r["error"][:60]])
            continue
        against = ref_masked if "wemask" in name else ref
        agree = agreement(r["ids"], against) if against is not None else None
        row = {"engine": name, **{k: v for k, v in r.items() if k != "ids"}, "agreement": agree,
               "speed_vs_hf_generate": r["tokens_per_s"] / ref_speed if ref_speed else None}
        rows.append(row)
        start = f"{r['start_s']:.1f}" if "start_s" in r else "–"
        table.append([name, start, f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['items_per_s']:.2f}",
                      f"{row['speed_vs_hf_generate']:.2f}x" if ref_speed else "–",
                      f"{agree['identical']}/{agree['items']}" if agree else "–",
                      f"{agree['prefix_share']:.3f}" if agree else "–"])
    columns = ["engine", "start s", "wall s", "tokens/s", "items/s", "vs hf_generate", "identical items",
               "prefix share"]
    if show:
        console_table("generation engines", columns, table)
    if out is not None:
        wemask = setup["wemask"]
        md = (f"# Generation engines\n\n`{setup['command']}`\n\n{setup['items']} prompts ({', '.join(TASKS)}, "
              f"{setup['items_per_task']} each), greedy, real EOS, ≤ {setup['max_new_tokens']} new tokens, batch "
              f"{setup['batch_size']} for the batched engines; {setup['device']}, {setup['dtype']}. Agreement: "
              f"against `hf_generate` (masked runs: against `hf_generate + wemask`, rate {wemask['rate']}, blocks "
              f"{wemask['layers']}).\n\n" + markdown_table(columns, table))
        write_report(out, {"setup": setup, "runs": rows}, md, {}, name="bench_engines")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--items-per-task", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.05, help="WeMask rate of the masked runs (block ME+1)")
    p.add_argument("--me-layer", type=int, default=None, help="0-based ME block (default: found by a scan)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--engines", default="hf_generate,hf_static,hf_continuous,melayer_compact,melayer_static",
                   help="comma-separated HF-side engines to run (see the module docstring)")
    p.add_argument("--vllm", action="store_true", help="also run vLLM, unmasked and with WeMask")
    p.add_argument("--vllm-args", default="", help="extra LLM(...) arguments, key=value,... (lm-eval syntax)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per engine after its warm-up (median wall)")
    p.add_argument("--warmup", choices=("workload", "batch"), default="workload",
                   help="untimed warm-up per engine: the whole workload (default) or one batch of 8 new tokens")
    p.add_argument("--out", default=None, help="write bench_engines.json/.md here")
    args = p.parse_args(argv)

    from melayer import load_model
    from melayer.masking import WeMaskConfig, apply_wemask
    from melayer.text import eos_ids, pad_id

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    on_gpu = model.device.type == "cuda"
    items = workload(tok, args.data_dir, args.items_per_task, args.seed)
    prompts = [ids for _, ids in items]
    eos = set(eos_ids(tok, model))
    n = args.max_new_tokens
    wemask = WeMaskConfig(rate=args.rate, me_layer=args.me_layer).resolved(model, tok)
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not on_gpu and "melayer_static" in wanted:
        wanted.remove("melayer_static")  # CUDA graphs: GPU only
        print("melayer_static: skipped (CUDA only)")

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    b = args.batch_size
    setup = {"model": args.model, "device": str(model.device), "dtype": str(model.dtype), "items": len(prompts),
             "tasks": list(TASKS), "items_per_task": args.items_per_task, "max_new_tokens": n, "batch_size": b,
             "seed": args.seed, "wemask": {"rate": wemask.rate, "layers": wemask.layers, "me_layer": wemask.me_layer},
             "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
             "command": " ".join(sys.argv)}
    # what makes two runs' engines comparable
    same_run = {k: setup[k] for k in ("model", "device", "dtype", "items", "items_per_task", "max_new_tokens",
                                      "batch_size", "seed", "wemask", "warmup")}
    log = JsonlLog(Path(args.out) / "bench_engines_runs.jsonl", required=("engine",)) if args.out else None
    runs: dict[str, dict] = load_runs(log, same_run)

    def finished(name: str) -> None:
        """Keep ``runs[name]`` (appended, fsynced) and rewrite the report, so that a kill loses one engine only."""
        if log is not None:
            log.append({"engine": name, "same_run": same_run, **runs[name]})
            report(runs, setup, Path(args.out), show=False)

    def timed(name: str, fn: Callable[[list, int], list[list[int]]], masked: bool = False,
              start_s: Optional[float] = None) -> None:
        """``fn(prompts, max_new)``: warmed up (``--warmup``), then timed ``--repeats`` times on the whole
        workload; the median wall counts."""
        if name in runs:
            print(f"{name}: reused from {log.path}", flush=True)
            return
        gc.collect()
        walls = []
        try:
            with apply_wemask(model, wemask) if masked else contextlib.nullcontext():
                if args.warmup == "workload":
                    fn(prompts, n)
                else:
                    fn(prompts[:b], WARMUP_TOKENS)
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    ids = fn(prompts, n)
                    sync()
                    walls.append(time.perf_counter() - t0)
        except Exception as e:  # an engine that cannot run this model here is recorded, not fatal
            runs[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{name}: {runs[name]['error']}", flush=True)
            return
        wall = statistics.median(walls)
        tokens = sum(len(x) for x in ids)
        runs[name] = {"ids": ids, "wall_s": wall, "walls_s": walls, "tokens": tokens, "tokens_per_s": tokens / wall,
                      "items_per_s": len(ids) / wall, **({} if start_s is None else {"start_s": start_s})}
        print(f"{name}: {wall:.2f} s (median of {len(walls)}), {tokens} tokens, {tokens / wall:.1f} tok/s", flush=True)
        finished(name)

    makers: dict[str, Callable[[list, int], list[list[int]]]] = {
        "hf_generate": lambda qs, m: batched(qs, b, hf_engine(model, tok, m, eos)),
        "hf_static": lambda qs, m: batched(qs, b, hf_engine(model, tok, m, eos, static=True)),
        "hf_continuous": lambda qs, m: hf_continuous(model, qs, m, eos, pad_id(tok)),
        "melayer_compact": lambda qs, m: batched(qs, b, melayer_engine(model, tok, m, eos, "compact")),
        "melayer_static": lambda qs, m: batched(qs, b, melayer_engine(model, tok, m, eos, "static")),
    }
    for name in ["hf_generate", *[w for w in wanted if w != "hf_generate"]]:
        timed(name, makers[name])
        if name != "hf_continuous":
            timed(f"{name} + wemask", makers[name], masked=True)

    vllm_start = {}
    if args.vllm:
        from vllm import LLM, SamplingParams

        from melayer.vllm_backend import engine_kwargs, wemask_entry

        base = vllm_base_args(args.model, on_gpu, args.vllm_args)
        for name, entry in (("vllm", None), ("vllm + wemask", wemask_entry(wemask))):
            if name in runs:
                print(f"{name}: reused from {log.path}", flush=True)
                continue
            t0 = time.perf_counter()
            llm = LLM(**engine_kwargs(entry, base, on_gpu))
            vllm_start[name] = time.perf_counter() - t0

            def run(qs, m, llm=llm):
                params = SamplingParams(temperature=0.0, max_tokens=m, stop_token_ids=sorted(eos))
                done = llm.generate([{"prompt_token_ids": q} for q in qs], params, use_tqdm=False)
                return [trim(d.outputs[0].token_ids, eos) for d in done]

            timed(name, run, start_s=vllm_start[name])
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    report(runs, setup, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
