"""Scan cost: hooks vs a plain forward (time), and hooks vs output_hidden_states (peak memory); load time.

    python benchmarks/bench_scan.py [--tokens 2048] [--repeats 5] [--out docs/results/bench_scan.json]

Time: plain forward and capture forward alternate on the same input, medians compared (target ≤ 1.10×).
Memory: each approach runs in a fresh subprocess; peak RSS (CPU) or peak CUDA memory above the loaded
model is compared: capture keeps O(layers × dims), output_hidden_states keeps every hidden state.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
CARRIED_WIKI = ROOT / ".carry" / "data" / "wikitext2" / "wiki.test.raw"  # staged copy (benchmarks/gpu/README.md)


def make_input(tokenizer, tokens: int) -> torch.Tensor:
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

    from melayer import load_model
    from melayer.capture import ResidualCapture, reduce_hidden

    model, tok = load_model(spec, device=device)
    ids = make_input(tok, tokens).to(device)
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "docs/results/bench_scan.json"))
    p.add_argument("--memory-child", choices=["capture", "hidden_states"])
    p.add_argument("--profile", action="store_true", help="also print the ops that cost the capture most (profiler)")
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.tokens, args.device, args.model)

    from melayer import load_model
    from melayer.capture import ResidualCapture

    t0 = time.perf_counter()
    load_model(args.model, device=args.device)  # warm the cache (first load dequantises)
    first_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    second_load = time.perf_counter() - t0

    ids = make_input(tok, args.tokens).to(args.device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    cap = ResidualCapture(model)
    cap.remove()

    def plain():
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def hooked():
        with ResidualCapture(model) as c:
            c.run(ids, mask)

    times = {"plain": [], "capture": []}
    with torch.no_grad():
        plain(), hooked()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("capture", hooked)):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            hooked()
            sync()
        key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    mem = {a: measure_memory(a, args.tokens, args.device, args.model) for a in ("capture", "hidden_states")}
    result = {
        "device": args.device, "tokens": args.tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "load_first_s": first_load, "load_second_s": second_load,
        "forward_plain_s": med["plain"], "forward_capture_s": med["capture"],
        "time_ratio": med["capture"] / med["plain"],
        "peak_capture_mb": mem["capture"] / 2**20, "peak_hidden_states_mb": mem["hidden_states"] / 2**20,
        "memory_ratio": mem["hidden_states"] / max(mem["capture"], 1),
    }
    print(f"second load of 'default': {second_load:.2f} s (target ≤ 3 s)")
    print(f"forward {args.tokens} tokens: plain {med['plain']:.3f} s, capture {med['capture']:.3f} s, "
          f"ratio {result['time_ratio']:.3f}× (target ≤ 1.10×)")
    print(f"peak memory above the model: capture {result['peak_capture_mb']:.1f} MB, output_hidden_states "
          f"{result['peak_hidden_states_mb']:.1f} MB ({result['memory_ratio']:.1f}× more)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
