"""Fine-tuning with WeMask vs without: SFT, GRPO or DPO, several seeds and layer sets, same data and
hyper-parameters; only the mask differs. Each trained model is then evaluated as it was trained (the baseline
unmasked, a WeMask arm with its mask, and, as a secondary comparison, also without it) on the same test items,
and every arm is compared with the baseline of the same seed, paired item by item.

Layout (resumable: a finished run's final/ is reused, an interrupted one resumes from its last checkpoint,
an evaluation from its response log): OUT/<arm>/seed<S>/{final/, train_report.json, eval/}, arms
``baseline`` and one per ``--arms`` layer set. Seeds can run in separate processes on one GPU (``--seeds 1``
in each, same OUT; ``--train-arms`` splits the arms the same way), then ``--report-only`` gathers whatever
finished into OUT/train_compare.{md,json,png}.

    # SFT on GSM8K, 3 seeds, both layer sets (one epoch; GPU)
    python benchmarks/train_compare.py --algo sft --data-dir ../shared/data --out runs/sft \\
        --arms after_me,from_after_me --seeds 0,1,2
    # DPO on a preference file (e.g. from `melayer data preferences`), LoRA, refusal evaluations
    python benchmarks/train_compare.py --algo dpo --data prefs.jsonl --model M.gguf --lora --out runs/dpo
    # CPU smoke
    python benchmarks/train_compare.py --data-dir ../shared/data --out runs/tc_smoke --limit 16 \\
        --max-steps 2 --batch-size 2 --save-steps 0 --eval-limit 4 --max-new-tokens 48

Statistics, per task and arm: per seed the paired difference (bootstrap 95% CI) and exact McNemar; pooled over
seeds the mean difference with a 95% CI from a bootstrap over test items (an item's seeds resampled together)
and a two-sided sign-flip permutation p over the items' seed-averaged differences; Holm over every pooled
comparison of the run. A verdict needs the Holm p < 0.05 ("WeMask better" / "worse"); otherwise it is
"inconclusive", and the CI says which effects the run excludes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from melayer.cli.eval import parse_vllm_args
from melayer.evaluate import EvalConfig, run_eval
from melayer.evaluate.summary import load_folder, per_document
from melayer.masking import WeMaskConfig, parse_layers
from melayer.report import console_table, markdown_table, new_figure, write_report
from melayer.stats import holm, paired_test
from melayer.training import TrainConfig, train
from melayer.training.report import CURVES, log_series
from melayer.training.runner import FINAL_DIR

# task -> (metric, higher is better); the default evaluations of each algorithm
METRICS = {"melayer_gsm8k": ("exact_match", True), "melayer_math500": ("math_verify", True),
           "melayer_xstest_safe": ("refusal", False), "melayer_harmless": ("refusal", False),
           "melayer_xstest_unsafe": ("refusal", True), "melayer_advbench": ("refusal", True),
           "melayer_harmbench": ("refusal", True)}
EVAL_TASKS = {"sft": ["melayer_gsm8k"], "grpo": ["melayer_gsm8k", "melayer_math500"],
              "dpo": ["melayer_xstest_safe", "melayer_harmless", "melayer_xstest_unsafe", "melayer_advbench",
                      "melayer_harmbench"]}
N_BOOT, N_PERM = 10_000, 20_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="sft", choices=sorted(EVAL_TASKS))
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=None, help="DPO: refusal, gsm8k or a preference JSONL (default refusal)")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: the hub)")
    p.add_argument("--out", default="runs/train_compare")
    p.add_argument("--wemask-rate", type=float, default=0.01)
    p.add_argument("--arms", default="after_me", help="comma-separated layer sets, one WeMask arm each")
    p.add_argument("--wemask-mode", default="correct", choices=["correct", "paper"])
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (each arm pairs with the "
                                                "baseline of its seed)")
    p.add_argument("--me-layer", type=int, default=None)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="train rows / pairs (seeded subset; default: all)")
    p.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--beta", type=float, default=None, help="GRPO KL weight / DPO temperature")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO rollouts per prompt")
    p.add_argument("--max-completion-length", type=int, default=256, help="GRPO")
    p.add_argument("--rollouts", default="hf", choices=["hf", "vllm"],
                   help="GRPO: who generates (vllm: TRL's colocated engine, masked by melayer's plugin)")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="GRPO --rollouts vllm: the engine's GPU share")
    p.add_argument("--device", default=None)
    p.add_argument("--eval-tasks", default=None, help="comma-separated (default: per algorithm)")
    p.add_argument("--eval-limit", type=int, default=None, help="test items per task (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-dtype", default=None, help="evaluation precision (default: the protocol's)")
    p.add_argument("--eval-engine", default="auto", help="melayer eval --engine (vllm: the trained models are "
                   "evaluated in vLLM, each condition's mask said explicitly)")
    p.add_argument("--eval-vllm-args", default="", help="--eval-engine vllm: LLM(...) arguments, key=value,...")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own")
    p.add_argument("--train-arms", default=None, help="comma-separated arms this process trains and evaluates "
                                                     "(default: all; e.g. baseline in one process, a WeMask arm "
                                                     "in another)")
    p.add_argument("--report-only", action="store_true", help="gather finished runs into the report")
    return p.parse_args(argv)


def eval_tasks(args) -> list[str]:
    return args.eval_tasks.split(",") if args.eval_tasks else EVAL_TASKS[args.algo]


def configs(args) -> dict[tuple[str, int], TrainConfig]:
    """(arm, seed) -> the run's config; arms differ from the baseline only in the mask."""
    data = args.data or ("refusal" if args.algo == "dpo" else "gsm8k")
    extra = {"max_length": args.max_length} if args.algo in ("sft", "dpo") else {
        "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
        "rollouts": args.rollouts, "vllm_memory": args.vllm_memory}
    out = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in ["baseline", *args.arms.split(",")]:
            mask = WeMaskConfig(rate=0.0 if arm == "baseline" else args.wemask_rate, mode=args.wemask_mode,
                                layers=parse_layers("after_me" if arm == "baseline" else arm),
                                me_layer=args.me_layer)
            out[arm, seed] = TrainConfig(
                algo=args.algo, model=args.model, data=data, data_dir=args.data_dir, limit=args.limit,
                out=str(Path(args.out) / arm / f"seed{seed}"), wemask=mask, lora=args.lora,
                max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                seed=seed, save_steps=args.save_steps, beta=args.beta, device=args.device,
                gradient_checkpointing=not args.no_gradient_checkpointing, **extra)
    return out


def run_training(cfg: TrainConfig) -> Path:
    """Train (or resume, or reuse a finished run); returns the final model folder."""
    final = Path(cfg.out) / FINAL_DIR
    if (final / "train_config.json").is_file():
        print(f"[reuse] {final}", file=sys.stderr)
        return final
    resume = any(Path(cfg.out).glob("checkpoint-*"))
    t0 = time.perf_counter()
    result = train(dataclasses.replace(cfg, resume=resume))
    (Path(cfg.out) / "wall_seconds.json").write_text(json.dumps({"train_wall_s": time.perf_counter() - t0}))
    return result.final_dir


def evaluate(final: Path, args, tasks: list[str]) -> None:
    """The trained model on the test tasks, as trained: its saved WeMask (rate 0 for the baseline)."""
    mask = TrainConfig.load(final).wemask
    cfg = EvalConfig(model=str(final), tasks=tasks, wemask_rates=[mask.rate], wemask_modes=[mask.mode],
                     wemask_layers=[mask.layers], me_layer=mask.me_layer, limit=args.eval_limit, seed=0,
                     data_dir=args.data_dir, out=str(final.parent / "eval"), batch_size=args.eval_batch_size,
                     max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.eval_dtype,
                     engine=args.eval_engine, vllm_args=parse_vllm_args(args.eval_vllm_args))
    t0 = time.perf_counter()
    run_eval(cfg)
    (final.parent / "eval" / "wall_seconds.json").write_text(json.dumps({"eval_wall_s": time.perf_counter() - t0}))


def run_scores(run: Path, tasks: list[str]) -> dict[tuple[bool, str], dict]:
    """(masked, task) -> doc -> score of the run's model, from one read of its evaluation ({} if not evaluated
    yet). The evaluation always holds rate 0 (masked False); a WeMask arm's masked condition is its other one."""
    if not (run / "eval").is_dir():
        return {}
    _, samples, _ = load_folder(run / "eval")
    out = {}
    for (cond, task), rows in samples.items():
        if task in tasks:
            docs = per_document(rows)
            values = docs.get(METRICS.get(task, (None,))[0]) or next(iter(docs.values()), {})
            out[cond != "0", task] = {doc: num / den for doc, (num, den) in values.items()}
    return out


def pooled_test(diffs: np.ndarray, seed: int = 0) -> dict:
    """diffs (seeds, items): mean, item-bootstrap 95% CI and sign-flip permutation p over the items."""
    rng = np.random.default_rng(seed)
    per_item = diffs.mean(0)
    n = per_item.size
    boots = per_item[rng.integers(0, n, size=(N_BOOT, n))].mean(1)
    flips = rng.choice([-1.0, 1.0], size=(N_PERM, n))
    observed = abs(per_item.mean())
    p = (1 + np.sum(np.abs((flips * per_item).mean(1)) >= observed - 1e-12)) / (N_PERM + 1)
    return {"diff": float(per_item.mean()), "ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "p": float(p), "n_items": int(n), "n_seeds": int(diffs.shape[0])}


def compare(args, cfgs) -> dict:
    """Per task and arm: scores per seed, the per-seed paired tests and the pooled test, with Holm."""
    tasks = eval_tasks(args)
    seeds = sorted({s for _, s in cfgs})
    trained = [a for a in dict.fromkeys(a for a, _ in cfgs) if a != "baseline"]
    scores = {}
    for (arm, s), cfg in cfgs.items():
        found = run_scores(Path(cfg.out), tasks)
        for t in tasks:
            scores[arm, s, t] = found.get((arm != "baseline", t), {})
            if arm != "baseline":  # secondary: the WeMask-trained model evaluated without its mask
                scores[f"{arm} (eval unmasked)", s, t] = found.get((False, t), {})
    arms = trained + [f"{a} (eval unmasked)" for a in trained]
    rows, pooled = [], []
    for task in tasks:
        higher = METRICS.get(task, (None, True))[1]
        for arm in arms:
            diffs, per_seed = [], []
            for s in seeds:
                base, mine = scores["baseline", s, task], scores[arm, s, task]
                common = sorted(set(base) & set(mine))
                if not common:
                    continue
                a, b = np.array([base[d] for d in common]), np.array([mine[d] for d in common])
                test = paired_test((a, np.ones_like(a)), (b, np.ones_like(b)), binary=True, exp=False, seed=s)
                per_seed.append({"seed": s, "n": len(common), "baseline": float(a.mean()), "arm": float(b.mean()),
                                 "diff": test["diff"], "diff_ci": test["diff_ci"], "mcnemar_p": test["mcnemar_p"],
                                 "only_baseline": test["only_base"], "only_arm": test["only_other"]})
                diffs.append((b - a, common))
            if not diffs:
                continue
            shared = sorted(set.intersection(*(set(c) for _, c in diffs)))
            matrix = np.array([[d[c.index(doc)] for doc in shared] for d, c in diffs])
            pooled.append({"task": task, "arm": arm, "higher_is_better": higher, "per_seed": per_seed,
                           "pooled": pooled_test(matrix)})
    for result, p in zip(pooled, holm([r["pooled"]["p"] for r in pooled])):
        result["pooled"]["holm_p"] = p
        result["verdict"] = verdict(result)
        for r in result["per_seed"]:
            rows.append([result["task"], result["arm"], r["seed"], r["n"], r["baseline"], r["arm"], r["diff"],
                         f"[{r['diff_ci'][0]:+.4f}, {r['diff_ci'][1]:+.4f}]", r["mcnemar_p"]])
    return {"tasks": tasks, "seeds": seeds, "arms": arms, "comparisons": pooled, "per_seed_rows": rows}


def verdict(result: dict) -> str:
    """Significant after Holm: better or worse; otherwise inconclusive (the CI says which effects it excludes)."""
    pooled = result["pooled"]
    if pooled["holm_p"] < 0.05:
        return "WeMask better" if (pooled["diff"] > 0) == result["higher_is_better"] else "WeMask worse"
    return "inconclusive"


def curves(cfgs) -> dict:
    """(arm, seed) -> {logged key: [(step, value)]} from each finished run's train_report.json."""
    out = {}
    for (arm, seed), cfg in cfgs.items():
        path = Path(cfg.out) / "train_report.json"
        if path.is_file():
            history = json.loads(path.read_text()).get("log_history", [])
            out[arm, seed] = {k: log_series(history, k) for k in CURVES}
    return out


def wall_times(cfgs) -> dict:
    out = {}
    for (arm, seed), cfg in cfgs.items():
        entry = {}
        for path in (Path(cfg.out) / "wall_seconds.json", Path(cfg.out) / "eval" / "wall_seconds.json"):
            if path.is_file():
                entry.update(json.loads(path.read_text()))
        out[f"{arm}/seed{seed}"] = entry
    return out


def report(args, cfgs) -> None:
    out = Path(args.out)
    result = compare(args, cfgs)
    curve = curves(cfgs)
    pooled_rows = [[r["task"], r["arm"], r["pooled"]["n_seeds"], r["pooled"]["n_items"],
                    "higher" if r["higher_is_better"] else "lower", f"{r['pooled']['diff']:+.4f}",
                    f"[{r['pooled']['ci'][0]:+.4f}, {r['pooled']['ci'][1]:+.4f}]", r["pooled"]["p"],
                    r["pooled"]["holm_p"], r["verdict"]] for r in result["comparisons"]]
    pooled_cols = ["task", "arm", "seeds", "items", "better", "Δ arm − baseline", "95% CI", "perm. p", "Holm p",
                   "verdict"]
    seed_cols = ["task", "arm", "seed", "n", "baseline", "arm score", "Δ", "95% CI", "McNemar p"]
    console_table("per seed", seed_cols, result["per_seed_rows"])
    console_table("pooled over seeds", pooled_cols, pooled_rows)
    keys = [k for k in CURVES if any(c.get(k) for c in curve.values())]
    fig, axes = new_figure(1, max(1, len(keys)), figsize=(5 * max(1, len(keys)), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for (arm, seed), c in sorted(curve.items()):
            if c.get(key):
                ax.plot(*zip(*c[key]), label=f"{arm} s{seed}", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(CURVES[key])
        ax.legend(fontsize=6)
    first = next(iter(cfgs.values()))
    md = (f"# {args.algo.upper()} with WeMask vs without (rate {args.wemask_rate:g}, mode {args.wemask_mode}, "
          f"ME layer {first.wemask.me_layer if first.wemask.me_layer is not None else 'from a scan'})\n\n"
          f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`\n\n"
          f"Model `{args.model}`, data `{first.data}`, LoRA {args.lora}; each model evaluated as trained.\n\n"
          "## Pooled over seeds\n\n" + markdown_table(pooled_cols, pooled_rows)
          + "\n## Per seed\n\n" + markdown_table(seed_cols, result["per_seed_rows"]))
    write_report(out, {"args": vars(args), "configs": {f"{a}/seed{s}": c.to_json() for (a, s), c in cfgs.items()},
                       **result, "curves": {f"{a}/seed{s}": c for (a, s), c in curve.items()},
                       "wall_seconds": wall_times(cfgs)},
                 md, {"curves": fig} if keys else {}, name="train_compare")
    print(f"report: {out / 'train_compare.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfgs = configs(args)
    if not args.report_only:
        only = args.train_arms.split(",") if args.train_arms else None
        for (arm, _), cfg in cfgs.items():
            if only is None or arm in only:
                evaluate(run_training(cfg), args, eval_tasks(args))
    report(args, cfgs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
