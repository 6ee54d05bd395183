"""Greedy generation speed on a GPU: plain HF ``generate`` vs melayer's static-cache + CUDA-graph engine.

Same model, same left-padded batch of real prompts (GSM8K test questions in the chat template), same
max_new_tokens; prints new tokens/s for both, the speed-up, and how many tokens the two engines agree on
(kernels differ between the two paths, so bf16 near-ties can flip a token: reported, not hidden).
Optionally repeats everything with WeMask active on both engines. (--device cpu runs too, as a smoke test.)

    PYTHONPATH=src python3 benchmarks/bench_generate_gpu.py --model default --data-dir ../shared/data \
        --batch 32 --max-new-tokens 256 --wemask-rate 0.01 --me-layer 11 --out out/bench_generate_gpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from melayer.generation import GenerationConfig, eos_ids, generate_batch, static_generate
from melayer.load import load_model
from melayer.report import console_table, markdown_table, write_report


def gsm8k_prompts(data_dir: Path, n: int) -> list[str]:
    path = data_dir / "gsm8k" / "test.jsonl"
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [r["question"] for r in rows]


def useful_tokens(out: torch.Tensor, eos: list[int]) -> int:
    """Tokens up to and including each row's first EOS (what a user gets back)."""
    hit = torch.isin(out, torch.tensor(eos, device=out.device))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], out.shape[1], dtype=torch.long))
    return int(first.sum())


def agreement(a: torch.Tensor, b: torch.Tensor, pad: int, eos: list[int]) -> dict:
    """Token exact-match rate over each row's reference (``a``) tokens, identical rows, first divergences."""
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad).cpu()
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad).cpu()
    hit = torch.isin(a, torch.tensor(eos))
    length = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full((a.shape[0],), width))
    valid = torch.arange(width)[None, :] < length[:, None]
    same = a == b
    diverge = [int((~same[r]).int().argmax()) for r in range(a.shape[0]) if not same[r].all()]
    return {"token_match_rate": float((same & valid).sum() / valid.sum()),
            "rows_identical": int(same.all(1).sum()), "rows": int(a.shape[0]),
            "first_divergence_steps": sorted(diverge)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed static-engine runs (median)")
    p.add_argument("--hf-repeats", type=int, default=2, help="timed plain-generate runs (median)")
    p.add_argument("--compile", action="store_true", help="also time the static engine with torch.compile")
    p.add_argument("--noise-floor", action="store_true",
                   help="also compare plain generate with itself under harmless batch changes (two batches of "
                        "half size; 8 extra left pads): how far bf16 greedy tokens move without any engine change")
    p.add_argument("--cost-split", action=argparse.BooleanOptionalAction, default=True,
                   help="time two lengths with EOS disabled to split fixed and per-step cost")
    p.add_argument("--wemask-rate", type=float, default=0.0, help="also run both engines with WeMask at this rate")
    p.add_argument("--me-layer", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("out/bench_generate_gpu"))
    args = p.parse_args(argv)

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in gsm8k_prompts(args.data_dir, args.batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    eos, pad = eos_ids(tok, model), tok.pad_token_id

    def hf(n, stop=eos):
        return generate_batch(model, ids, mask, GenerationConfig(max_new_tokens=n, engine="hf"), stop, pad)

    def static(n, stop=eos, compiled=False):
        return static_generate(model, ids, mask, n, stop, pad, compile=compiled)

    def hf_on(rows, extra_pads=0):
        x, m = ids[rows], mask[rows]
        if extra_pads:
            x = torch.cat([torch.full_like(x[:, :extra_pads], pad), x], 1)
            m = torch.cat([torch.zeros_like(m[:, :extra_pads]), m], 1)
        return generate_batch(model, x, m, GenerationConfig(max_new_tokens=args.max_new_tokens, engine="hf"), eos, pad)

    def stack(outs):
        width = max(o.shape[1] for o in outs)
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs])

    settings = [("plain", None)]
    if args.wemask_rate > 0:
        settings.append((f"wemask {args.wemask_rate}", dict(rate=args.wemask_rate, me_layer=args.me_layer)))
    engines = ["static", "static+compile"] if args.compile else ["static"]
    results, costs, noise = [], [], []
    for label, wm in settings:
        handle = None
        if wm is not None:
            from melayer.masking import apply_wemask

            handle = apply_wemask(model, tokenizer=tok, **wm)
        hf(8)  # warm-up: kernels, cuBLAS handles, allocator
        hf_out, hf_s, hf_all = timed(lambda: hf(args.max_new_tokens), device, args.hf_repeats)
        n_hf = useful_tokens(hf_out, eos)
        if args.noise_floor:
            half = args.batch // 2
            variants = {"hf, two batches of half size": stack([hf_on(slice(0, half)), hf_on(slice(half, None))]),
                        "hf, 8 extra left pads": hf_on(slice(None), extra_pads=8)}
            for name, out in variants.items():
                noise.append({"setting": label, "variant": name, **agreement(hf_out, out, pad, eos)})
                print(json.dumps(noise[-1]), flush=True)
        for engine in engines:
            compiled = engine.endswith("compile")
            t0 = time.perf_counter()
            static(args.max_new_tokens, compiled=compiled)  # warm-up at full length (compiles, allocates the cache)
            warm_s = time.perf_counter() - t0
            (st_out, info), st_s, st_all = timed(lambda: static(args.max_new_tokens, compiled=compiled), device,
                                                 args.repeats)
            n_st = useful_tokens(st_out, eos)
            row = {"setting": label, "engine": engine, "hf_s": hf_s, "hf_runs_s": hf_all, "static_s": st_s,
                   "static_runs_s": st_all, "warmup_s": warm_s, "hf_new_tok_per_s": n_hf / hf_s,
                   "static_new_tok_per_s": n_st / st_s, "hf_steps": hf_out.shape[1], "static_steps": st_out.shape[1],
                   "speedup": (n_st / st_s) / (n_hf / hf_s), "cuda_graph": info.cuda_graph,
                   **agreement(hf_out, st_out, pad, eos)}
            results.append(row)
            print(json.dumps(row), flush=True)
            if wm is None and args.cost_split:  # fixed cost per call and cost per decode step, from two lengths with EOS disabled
                short, long_ = max(1, args.max_new_tokens // 4), args.max_new_tokens
                _, t_short, _ = timed(lambda: static(short, [], compiled), device, args.repeats)
                _, t_long, _ = timed(lambda: static(long_, [], compiled), device, args.repeats)
                per_step = (t_long - t_short) / (long_ - short)
                costs.append({"engine": engine, "ms_per_step": 1e3 * per_step,
                              "fixed_ms": 1e3 * (t_short - (short - 1) * per_step),
                              "steps_per_s": 1 / per_step, "tok_per_s_at_batch": args.batch / per_step})
                print(json.dumps(costs[-1]), flush=True)
        if handle is not None:
            handle.remove()

    columns = ["setting", "engine", "hf tok/s", "static tok/s", "speed-up", "token match", "identical rows", "graph"]
    rows = [[r["setting"], r["engine"], round(r["hf_new_tok_per_s"]), round(r["static_new_tok_per_s"]),
             f"{r['speedup']:.1f}x", f"{100 * r['token_match_rate']:.2f}%", f"{r['rows_identical']}/{r['rows']}",
             r["cuda_graph"]] for r in results]
    cost_columns = ["engine", "ms / decode step", "fixed ms / call", "tok/s (decode only)"]
    cost_rows = [[c["engine"], round(c["ms_per_step"], 2), round(c["fixed_ms"]), round(c["tok_per_s_at_batch"])]
                 for c in costs]
    env = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "model": args.model, "dtype": args.dtype,
           "batch": args.batch, "max_new_tokens": args.max_new_tokens, "prompt_len": ids.shape[1],
           "argv": sys.argv}
    console_table(f"greedy generation, batch {args.batch}, {args.max_new_tokens} new tokens, {env['gpu']}",
                  columns, rows)
    console_table("static engine cost split (EOS disabled)", cost_columns, cost_rows)
    noise_columns = ["setting", "plain generate vs itself", "token match", "identical rows"]
    noise_rows = [[n["setting"], n["variant"], f"{100 * n['token_match_rate']:.2f}%",
                   f"{n['rows_identical']}/{n['rows']}"] for n in noise]
    if noise:
        console_table("noise floor: plain generate under harmless batch changes", noise_columns, noise_rows)
    write_report(args.out, {"env": env, "results": results, "costs": costs, "noise_floor": noise},
                 "# bench_generate_gpu\n\n" + markdown_table(columns, rows) + "\n" + markdown_table(cost_columns, cost_rows)
                 + ("\n" + markdown_table(noise_columns, noise_rows) if noise else "")
                 + "\n```\n" + json.dumps(env) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
