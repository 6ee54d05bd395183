"""Log-likelihood scoring with logits only where continuations are scored, against HFLM's full logits: peak memory,
wall time and identical answers, each arm in a fresh process (peak RSS cannot be reset inside one).

    python benchmarks/bench_loglikelihood.py --model default --task melayer_mmlu --limit 48 --batch-size 64 \\
        --data-dir ../shared/data --out docs/results/bench_loglikelihood.md

``scored`` is what ``melayer eval`` runs (``MelayerLM`` gathers each row's last positions before the output
layer); ``full`` disables that (every position's logits, as lm-eval's HFLM computes them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from melayer.evaluate.responses import RESPONSES_NAME
from melayer.io import JsonlLog

ARM = """
import json, resource, sys, time
from melayer.evaluate import harness
from melayer.evaluate.runner import EvalConfig, run_eval
args = json.loads(sys.argv[1])
if args["arm"] == "full":
    harness.MelayerLM._row_lengths = lambda self, inps: None  # every batch takes HFLM's full-logits path
cfg = EvalConfig(model=args["model"], tasks=[args["task"]], limit=args["limit"], data_dir=args["data_dir"],
                 out=args["out"], batch_size=args["batch_size"], wemask_rates=[0.0])
t0 = time.perf_counter()
run_eval(cfg)
print(json.dumps({"wall_s": time.perf_counter() - t0,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def answers(folder: Path) -> dict:
    """(condition, request key) -> logged answer of one arm's evaluation."""
    return {(r["cond"], r["key"]): r["response"] for r in JsonlLog(folder / RESPONSES_NAME).read()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="melayer_mmlu")
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write a Markdown table here")
    args = p.parse_args(argv)

    results, logs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("full", "scored"):
            spec = {**vars(args), "arm": arm, "out": str(Path(tmp) / arm)}
            done = subprocess.run([sys.executable, "-c", ARM, json.dumps(spec)], capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[arm] = json.loads(done.stdout.strip().splitlines()[-1])
            logs[arm] = answers(Path(tmp) / arm)
    full, scored = logs["full"], logs["scored"]
    same = sum(full[k] == scored.get(k) for k in full)
    worst = max(abs(full[k][0] - scored[k][0]) for k in full)
    rows = [f"| {arm} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.1f} |" for arm, r in results.items()]
    md = "\n".join([
        "# Log-likelihood scoring: logits only where continuations are scored",
        "",
        f"`{' '.join(['python', *sys.argv])}`",
        "",
        f"{args.task}, {args.limit} documents ({len(full)} requests), batch {args.batch_size}, model `{args.model}`. "
        f"Each arm in a fresh process; peak RSS of that process.",
        "",
        "| arm | peak RSS (GB) | wall (s, model load included) |",
        "|---|---|---|",
        *rows,
        "",
        f"Identical answers (log-likelihood and greedy flag): {same}/{len(full)}; largest |Δ log-likelihood| {worst:g}. "
        f"Memory {results['full']['peak_rss_gb'] / results['scored']['peak_rss_gb']:.2f}x lower, wall "
        f"{results['full']['wall_s'] / results['scored']['wall_s']:.2f}x shorter.",
        "",
    ])
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return 0 if same == len(full) else 1


if __name__ == "__main__":
    sys.exit(main())
