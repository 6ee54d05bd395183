"""Scan cost: hooks vs a plain forward (time), and hooks vs output_hidden_states (peak memory); load time.

    python benchmarks/bench_scan.py [--tokens 2048] [--repeats 5] [--variants reference,eager,cuda_graph:sort]
                                    [--out docs/results/bench_scan.json]

Time: a plain forward, the capture forward as shipped (``reduction="auto"``) and the capture with each other
reduction of ``ResidualCapture`` (``REDUCTION[:MEDIAN]``: with another median selection) alternate on the same
input, the order reversed every other repeat; each is compared with the plain forward of its repeat (the median
of the per-repeat ratios, its 95 % bootstrap CI and the verdict against ``--target``, 1.10×) and by medians, and
each variant's statistics are checked against the reference reduction's (identical; the norms within 1e-5
relative, since the fused kernel sums squares in another order). ``--model random-qwen3-4b`` / ``random-smollm2``:
a model of that shape with random bf16 weights (the reductions cost the same; nothing to stage). The table of
ratios is printed last. Memory: each approach runs in a fresh subprocess; peak RSS (CPU) or peak CUDA memory
above the loaded model is compared: capture keeps O(layers × dims), output_hidden_states keeps every hidden state.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANDOM_QWEN3_4B = "random-qwen3-4b"  # --model value: bench_wemask.py's random-weight Qwen3-4B shape, bf16
RANDOM_SMOLLM2 = "random-smollm2"  # --model value: the default model's shape (SmolLM2-135M), random bf16 weights
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
RANDOM = (RANDOM_QWEN3_4B, RANDOM_SMOLLM2)
WIKI = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
CARRIED_WIKI = ROOT / ".carry" / "data" / "wikitext2" / "wiki.test.raw"  # staged copy (benchmarks/gpu/README.md)


def load(spec: str, device: str):
    """(model, tokenizer); the random model has no tokenizer (its input is random token ids)."""
    if spec in RANDOM:
        import transformers

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_wemask import random_model, random_qwen3_4b

        if spec == RANDOM_QWEN3_4B:
            return random_qwen3_4b(device, 0), None
        return random_model(transformers.LlamaConfig(**SMOLLM2_135M), device, 0), None
    from melayer import load_model

    return load_model(spec, device=device)


def make_input(tokenizer, tokens: int, vocab_size: int = 0) -> torch.Tensor:
    if tokenizer is None:  # random weights: random ids (the reductions cost the same; no massive values)
        return torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    path = WIKI if WIKI.is_file() else CARRIED_WIKI
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text[: tokens * 8], return_tensors="pt").input_ids[:, :tokens]
    assert ids.shape[1] == tokens, "not enough text for the requested length"
    return ids


class RssPeak:
    """Samples this process's resident memory every millisecond (CPU has no allocator peak counter)."""

    def __init__(self):
        import os
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def memory_child(approach: str, tokens: int, device: str, spec: str) -> None:
    """Run one approach and print its peak memory above the loaded model (bytes)."""
    import contextlib

    from melayer.capture import ResidualCapture, reduce_hidden

    model, tok = load(spec, device)
    ids = make_input(tok, tokens, model.config.vocab_size).to(device)
    mask = torch.ones_like(ids)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler = RssPeak() if device == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), sampler:
        if approach == "capture":
            with ResidualCapture(model) as cap:
                cap.run(ids, mask)
        else:  # the usual way: keep every hidden state, then reduce
            hs = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            valid = mask.bool()
            sel = torch.zeros_like(valid)
            sel[:, 0] = True
            first = torch.zeros(1, dtype=torch.long, device=ids.device)
            [reduce_hidden(h, valid, sel, torch.zeros_like(valid), first) for h in hs[1:]]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = sampler.peak - sampler.base
    print(json.dumps({"approach": approach, "peak_bytes": peak}))


def measure_memory(approach: str, tokens: int, device: str, spec: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", approach, "--tokens", str(tokens),
                          "--device", device, "--model", spec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


NORMS = ("first_norm", "rest_norm")  # sums of squares: the fused kernel sums in another order (rounding only)


def same_values(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.0) -> bool:
    """Equal shapes and dtypes, values equal within ``rtol``, NaN matching NaN."""
    close = (a - b).abs() <= rtol * b.abs() if a.is_floating_point() else a == b
    return a.shape == b.shape and a.dtype == b.dtype and bool((close | (a == b) | (a.isnan() & b.isnan())).all())


def differing_fields(stats, reference) -> list[str]:
    """The LayerStats fields in which two captures (lists, embeddings first) differ anywhere: bit for bit, except
    the norms within 1e-5 relative."""
    return sorted({f.name for x, y in zip(stats, reference) for f in fields(x)
                   if not same_values(getattr(x, f.name), getattr(y, f.name), 1e-5 if f.name in NORMS else 0.0)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default", help=f"model spec (default: the embedded SmolLM2), or "
                                                       f"{RANDOM_QWEN3_4B} or {RANDOM_SMOLLM2} (random weights, "
                                                       "bf16, random ids)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", help="comma-separated REDUCTION[:MEDIAN] timed beside the shipped capture "
                                      "(default: reference,eager, and on CUDA cuda_graph,fused)")
    p.add_argument("--out", default=str(ROOT / "docs/results/bench_scan.json"))
    p.add_argument("--memory-child", choices=["capture", "hidden_states"])
    p.add_argument("--profile", action="store_true", help="also print the ops that cost the capture most (profiler)")
    p.add_argument("--target", type=float, default=1.10, help="the capture / plain target the paired CI is judged "
                                                              "against")
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.tokens, args.device, args.model)

    from melayer.capture import MEDIANS, REDUCTIONS, ResidualCapture, resolve_reduction
    from melayer.report import console_table
    from melayer.stats import paired_ratio, target_verdict

    gpu_variants = ",cuda_graph,fused" if args.device == "cuda" else ""
    variants = (args.variants or "reference,eager" + gpu_variants).split(",")
    unknown = {v for v in variants if v.split(":")[0] not in REDUCTIONS or v.partition(":")[2] not in ("", *MEDIANS)}
    if unknown:
        p.error(f"unknown --variants {sorted(unknown)}; choose REDUCTION[:MEDIAN] from {REDUCTIONS} and {MEDIANS}")
    shipped = resolve_reduction("auto", torch.device(args.device))

    first_load = second_load = None
    if args.model in RANDOM:
        model, tok = load(args.model, args.device)
    else:
        t0 = time.perf_counter()
        load(args.model, args.device)  # warm the cache (first load dequantises)
        first_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok = load(args.model, args.device)
        second_load = time.perf_counter() - t0

    ids = make_input(tok, args.tokens, model.config.vocab_size).to(args.device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def plain():
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def capture_with(variant: str):
        reduction, _, median = variant.partition(":")

        def forward():
            with ResidualCapture(model, reduction=reduction, median=median or "auto") as c:
                layers = c.run(ids, mask)
                return [c.embedding, *layers]

        return forward

    runs = {"plain": plain, "capture": capture_with("auto"), **{v: capture_with(v) for v in variants}}
    outputs, notes = {}, {}
    with torch.no_grad():
        plain()
        for name in list(runs)[1:]:  # warm-up: captures the CUDA graphs; a failing alternative is reported
            failure = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    runs[name]()
                except Exception as err:
                    if name == "capture":
                        raise
                    failure.append(f"failed: {type(err).__name__}: {err}")
                    del runs[name]
            notes[name] = "; ".join([str(w.message) for w in caught] + failure)
        times = {name: [] for name in runs}
        for rep in range(args.repeats):
            order = list(runs.items())
            for name, fn in order[::-1] if rep % 2 else order:  # no variant always runs first
                sync()
                t = time.perf_counter()
                outputs[name] = fn()  # the last repeat's statistics are compared below
                sync()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            runs["capture"]()
            sync()
        key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    mem = {a: measure_memory(a, args.tokens, args.device, args.model) for a in ("capture", "hidden_states")}
    reference = outputs.get("reference")
    table = {}
    for name in ["plain", "capture", *variants]:
        row = {"reduction": {"plain": None, "capture": shipped}.get(name, name), "forward_s": med.get(name),
               "ratio": med[name] / med["plain"] if name in med else None, "note": notes.get(name, "")}
        if name in times and name != "plain":  # each repeat times plain and this variant back to back: a pair
            row["paired_ratio"], row["paired_ci"] = paired_ratio(times[name], times["plain"])
            row["verdict"] = target_verdict(row["paired_ci"], args.target)
        if outputs.get(name) is not None and reference is not None:
            row["differing_fields"] = differing_fields(outputs[name], reference)
        table[name] = row
    result = {
        "model": args.model, "device": args.device, "tokens": args.tokens, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_first_s": first_load, "load_second_s": second_load,
        "forward_plain_s": med["plain"], "forward_capture_s": med["capture"], "reduction": shipped,
        "time_ratio": med["capture"] / med["plain"], "paired_ratio": table["capture"]["paired_ratio"],
        "paired_ci": table["capture"]["paired_ci"], "target": args.target, "verdict": table["capture"]["verdict"],
        "times_s": times, "variants": table,
        "peak_capture_mb": mem["capture"] / 2**20, "peak_hidden_states_mb": mem["hidden_states"] / 2**20,
        "memory_ratio": mem["hidden_states"] / max(mem["capture"], 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if second_load is not None:
        print(f"second load of {args.model!r}: {second_load:.2f} s (target ≤ 3 s)")
    print(f"peak memory above the model: capture {result['peak_capture_mb']:.1f} MB, output_hidden_states "
          f"{result['peak_hidden_states_mb']:.1f} MB ({result['memory_ratio']:.1f}× more)")
    for name, row in table.items():
        if row["note"]:
            print(f"{name}: {row['note']}")
    rows = []
    for name, row in table.items():
        same = "" if "differing_fields" not in row else (
            "yes" if not row["differing_fields"] else "NO: " + ", ".join(row["differing_fields"]))
        ci = row.get("paired_ci")
        rows.append([f"capture ({shipped})" if name == "capture" else name,
                     "failed" if row["forward_s"] is None else row["forward_s"], row["ratio"],
                     row.get("paired_ratio", ""), f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "", row.get("verdict", ""),
                     same])
    console_table(f"forward of {args.tokens} tokens on {args.device}, median of {args.repeats} (target: capture "
                  f"≤ {args.target}× plain; paired: median of the per-repeat ratios, 95 % bootstrap CI; 'same "
                  "stats': identical to the reference reduction)",
                  ["variant", "seconds", "× plain", "paired ×", "paired CI", f"≤ {args.target}×", "same stats"], rows)

if __name__ == "__main__":
    main()
