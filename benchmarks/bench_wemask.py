"""WeMask overhead: greedy generation tokens/s without vs with WeMask, side by side in one run.

Both settings run on the same model and the same left-padded batch, interleaved (off/on, then on/off,
…) so that machine noise hits both alike; the medians and the overhead ratio (time with / time
without) are printed and saved. Every run generates exactly --new-tokens tokens (EOS disabled).

    python benchmarks/bench_wemask.py --model default --batch-sizes 1,8 --new-tokens 32 --me-layer 11
    python benchmarks/bench_wemask.py --random-qwen3-4b --device cuda --batch-sizes 1,32 --new-tokens 128

``--random-qwen3-4b`` builds a Qwen3-4B-shaped model (hidden 2560, 36 blocks, 32 heads, 8 KV heads,
head_dim 128, FFN 9728, vocab 151936) with random bf16 weights directly on the device; it has no ME
layer, so WeMask goes after --me-layer (default 6). Needs only torch, transformers and melayer.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from melayer.errors import MelayerError
from melayer.generation import GenerationConfig, generate_batch, resolve_engine
from melayer.io import atomic_write_json, atomic_write_text
from melayer.report import console_table, markdown_table, progress
from melayer.masking import WeMaskConfig, apply_wemask, parse_layers
from melayer.stats import paired_ratio, target_verdict

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn.",
    "What is 17 times 23? Show your work.",
    "List three uses of a paperclip.",
    "Summarise the plot of Romeo and Juliet.",
    "Translate 'good morning' into French, Spanish and German.",
    "Give me a tip for learning to play the guitar.",
    "Why do cats purr?",
]
QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True,
                rms_norm_eps=1e-6)


def random_model(config, device: str, seed: int):
    """A model of ``config``'s shape, random bf16 weights, built on ``device`` (no CPU-side initialisation: 8 GB for
    Qwen3-4B)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def random_qwen3_4b(device: str, seed: int):
    """Qwen3-4B shape, random bf16 weights."""
    return random_model(transformers.Qwen3Config(**QWEN3_4B), device, seed)


def make_batch(args, model, tokenizer, batch: int, device):
    if tokenizer is None:  # random model: random token ids, equal lengths
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), generator=g)
        return ids.to(device), torch.ones_like(ids).to(device)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                           add_generation_prompt=True) for i in range(batch)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(model, config: WeMaskConfig, ids, mask, repeats: int) -> dict:
    """One cached decode step timed alone, with and without WeMask, interleaved many times: the hook cost
    without generate's own overhead (the cache is cropped back after every step)."""
    device = ids.device
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.2x names it `cache`
    cache, token = out[key], ids[:, -1:]
    full = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    times = {False: [], True: []}
    for rep in range(repeats + 2):
        for masked in ((False, True) if rep % 2 == 0 else (True, False)):
            h = apply_wemask(model, config) if masked else None
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=token, attention_mask=full, use_cache=True, **{key: cache})
            sync(device)
            if rep >= 2:  # the first two rounds warm up
                times[masked].append(time.perf_counter() - t0)
            cache.crop(-1)
            if h is not None:
                h.remove()
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"step_ms_without": off * 1e3, "step_ms_with": on * 1e3, "step_overhead": on / off,
            "step_min_overhead": min(times[True]) / min(times[False])}


def bench_batch(args, model, tokenizer, config: WeMaskConfig, batch: int, engine: str) -> dict:
    device = next(model.parameters()).device
    ids, mask = make_batch(args, model, tokenizer, batch, device)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, engine=engine)

    def run(masked: bool) -> tuple[float, float, torch.Tensor, int]:
        h = apply_wemask(model, config) if masked else None
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = generate_batch(model, ids, mask, gen, [], pad_token_id=0)
        sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        fired = 0
        if h is not None:
            fired = h.fired
            h.remove()
        return wall, cpu, out, fired

    for masked in (False, True):  # warm-up: kernels, allocator, lazy inits
        run(masked)
    wall, cpu = {False: [], True: []}, {False: [], True: []}
    outs, fired = {}, []
    for rep in progress(range(args.repeats), desc=f"{engine} batch {batch}"):
        for masked in ((False, True) if rep % 2 == 0 else (True, False)):
            w, c, outs[masked], f = run(masked)
            wall[masked].append(w)
            cpu[masked].append(c)
            if masked:
                fired.append(f)
    steps = bench_step(model, config, ids, mask, args.step_repeats)
    tokens = batch * outs[False].shape[1]
    off, on = statistics.median(wall[False]), statistics.median(wall[True])
    paired, paired_ci = paired_ratio(wall[True], wall[False])
    return {
        "batch": batch, "new_tokens": int(outs[False].shape[1]), "prompt_len": int(ids.shape[1]), "engine": engine,
        "tok_per_s_without": tokens / off, "tok_per_s_with": tokens / on, "overhead": on / off,
        "paired_overhead_median": paired, "paired_overhead_ci95": paired_ci,
        "target": args.target, "verdict": target_verdict(paired_ci, args.target),
        "min_overhead": min(wall[True]) / min(wall[False]),
        "cpu_overhead": statistics.median(cpu[True]) / statistics.median(cpu[False]),
        "seconds_without": wall[False], "seconds_with": wall[True],
        "cpu_seconds_without": cpu[False], "cpu_seconds_with": cpu[True],
        "tokens_identical": bool(torch.equal(outs[False], outs[True])),
        "masked_tokens_per_run": sorted(set(fired)),
        **steps,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model spec for melayer.load_model (ignored with "
                                                       "--random-qwen3-4b)")
    p.add_argument("--random-qwen3-4b", action="store_true", help="random-weight Qwen3-4B-shaped model, bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="for --model (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of the random model")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (interleaved; median)")
    p.add_argument("--target", type=float, default=1.03, help="the overhead target the paired CI is judged against")
    p.add_argument("--step-repeats", type=int, default=50, help="timed single decode steps per setting")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--layers", default="after_me")
    p.add_argument("--mode", choices=("correct", "paper"), default="correct")
    p.add_argument("--me-layer", type=int, default=None,
                   help="ME block (default: scan the model; 6 for --random-qwen3-4b)")
    p.add_argument("--engines", default="auto", help="generation engines, comma-separated: auto, hf, static")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 avoids spin-wait slowdowns on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench_wemask.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results" / "bench_wemask.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

        if args.random_qwen3_4b:
            model, tokenizer, name = random_qwen3_4b(args.device, args.seed), None, "random Qwen3-4B shape (bf16)"
            me_layer = 6 if args.me_layer is None else args.me_layer
        else:
            from melayer.load import load_model

            model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
            name, me_layer = args.model, args.me_layer
        model.generation_config.eos_token_id = None  # fixed-length runs: every token is timed work
        config = WeMaskConfig(rate=args.rate, layers=parse_layers(args.layers), mode=args.mode, me_layer=me_layer)
        device = next(model.parameters()).device
        engines = [resolve_engine(model, GenerationConfig(engine=e), device) for e in args.engines.split(",")]
        probe = apply_wemask(model, config, tokenizer=tokenizer)  # resolve the ME layer (maybe a scan) untimed
        probe.remove()
        config = probe.config
    except (MelayerError, ValueError) as e:
        print(f"bench_wemask: error: {e}", file=sys.stderr)
        return 2

    rows = [bench_batch(args, model, tokenizer, config, b, e) for e in engines for b in batch_sizes]
    columns = ["batch", "new tokens", "engine", "tok/s without", "tok/s with", "overhead (x)", "paired (x)",
               "paired 95 % CI", f"≤ {args.target:g}×",
               "best-run (x)", "CPU-time (x)", "step ms without", "step ms with", "step (x)"]
    table = [[r["batch"], r["new_tokens"], r["engine"], round(r["tok_per_s_without"], 1),
              round(r["tok_per_s_with"], 1), round(r["overhead"], 4), round(r["paired_overhead_median"], 4),
              "{:.4f}–{:.4f}".format(*r["paired_overhead_ci95"]), r["verdict"],
              round(r["min_overhead"], 4), round(r["cpu_overhead"], 4), round(r["step_ms_without"], 3),
              round(r["step_ms_with"], 3), round(r["step_overhead"], 4)] for r in rows]
    console_table(f"WeMask overhead — {name} on {device}", columns, table)

    command = "python benchmarks/bench_wemask.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env = {"model": name, "device": str(device), "device_name": device_name,
           "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic_write_json(args.out, {"command": command, "env": env, "config": config, "repeats": args.repeats,
                                 "results": rows})
    section = (f"\n## {name} on {device} ({device_name}), {env['date']}\n\n```\n{command}\n```\n\n"
               f"torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}, "
               f"{env['threads']} threads; WeMask {probe!r}; {args.repeats} interleaved repeats, "
               f"medians. Overhead = median wall time with / without; paired = median of per-repeat ratios, with its "
               f"95 % bootstrap CI over the repeats and the verdict against the target (met: the CI at or below it; "
               f"missed: wholly above; not shown: it straddles the target); "
               f"best-run = fastest with / fastest without; CPU-time = median process CPU seconds with / "
               f"without (less sensitive to other load on a shared CPU); step = one cached decode forward timed "
               f"alone, {args.step_repeats} interleaved repeats, medians (the hook cost without generate's "
               f"own overhead).\n\n"
               + markdown_table(columns, table)
               + f"\nSame tokens with and without WeMask: {[r['tokens_identical'] for r in rows]} "
               f"(per batch size; WeMask is meant to change outputs). Masked tokens per run: "
               f"{[r['masked_tokens_per_run'] for r in rows]}.\n")
    previous = args.markdown.read_text(encoding="utf-8") if args.markdown.is_file() else (
        "# WeMask overhead benchmark\n\nGreedy generation with vs without WeMask "
        "(`benchmarks/bench_wemask.py`); target overhead ≤ 1.03×.\n")
    atomic_write_text(args.markdown, previous + section)
    print(f"wrote {args.out} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
