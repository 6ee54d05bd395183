"""SFT on GSM8K train, baseline vs WeMask (same seed, data order and hyper-parameters; only the mask
differs), then GSM8K test accuracy of both models through `melayer eval`, each with and without the mask.

Resumable: a finished run (its final/ folder) is reused, an interrupted one resumes from its last
checkpoint, and the evaluation resumes from its response log.

GPU (bf16 autocast, fp32 master weights; one epoch):
    python benchmarks/train_compare.py --data-dir ../shared/data --out runs/train_compare
CPU smoke (a few steps, a few test items):
    python benchmarks/train_compare.py --data-dir ../shared/data --out runs/train_compare_smoke \
        --limit 16 --max-steps 2 --batch-size 2 --save-steps 1 --eval-limit 4 --max-new-tokens 48
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from melayer.evaluate import EvalConfig, run_eval
from melayer.evaluate.runner import Condition
from melayer.evaluate.summary import load_folder, per_document
from melayer.stats import paired_test
from melayer.report import console_table, markdown_table, new_figure, write_report
from melayer.training import TrainConfig, train
from melayer.training.runner import FINAL_DIR
from melayer.masking import WeMaskConfig, parse_layers


TASK = "melayer_gsm8k"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data-dir", default=None, help="folder with gsm8k/{train,test}.jsonl (default: the hub)")
    p.add_argument("--out", default="runs/train_compare")
    p.add_argument("--wemask-rate", type=float, default=0.01)
    p.add_argument("--wemask-layers", default="after_me")
    p.add_argument("--me-layer", type=int, default=None)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="train rows (seeded subset; default: all 7,473)")
    p.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--eval-limit", type=int, default=None, help="GSM8K test items (default: all 1,319)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=512)
    return p.parse_args(argv)


def run_training(cfg: TrainConfig) -> tuple[Path, float]:
    """Train (or resume, or reuse a finished run); returns the final model folder and the training seconds."""
    final = Path(cfg.out) / FINAL_DIR
    if (final / "train_config.json").is_file():
        print(f"[reuse] {final}", file=sys.stderr)
        return final, float("nan")
    resume = any(Path(cfg.out).glob("checkpoint-*"))
    t0 = time.perf_counter()
    result = train(dataclasses.replace(cfg, resume=resume))
    return result.final_dir, time.perf_counter() - t0


def evaluate(final: Path, out: Path, mask: WeMaskConfig, args) -> dict:
    """GSM8K test accuracy of one trained model at eval rates 0 and the trained rate (same items)."""
    cfg = EvalConfig(model=str(final), tasks=[TASK], wemask_rates=[0.0, mask.rate], wemask_modes=[mask.mode],
                     wemask_layers=[mask.layers], me_layer=mask.me_layer, limit=args.eval_limit, seed=args.seed,
                     data_dir=args.data_dir, out=str(out), batch_size=args.eval_batch_size,
                     max_new_tokens=args.max_new_tokens, device=args.device)
    return run_eval(cfg)


def scores(eval_out: Path) -> dict[str, dict]:
    """cond -> document -> exact match, from the evaluation's lm-eval samples."""
    _, samples, _ = load_folder(eval_out)
    return {cond: {doc: num / den for doc, (num, den) in per_document(rows)["exact_match"].items()}
            for (cond, task), rows in samples.items() if task == TASK}


def loss_curve(final: Path) -> list[tuple[int, float]]:
    report = json.loads((final.parent / "train_report.json").read_text())
    return [(r["step"], r["loss"]) for r in report["log_history"] if "loss" in r]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    masked = TrainConfig(
        algo="sft", model=args.model, data_dir=args.data_dir, limit=args.limit, out=str(out / "wemask"),
        wemask=WeMaskConfig(rate=args.wemask_rate, layers=parse_layers(args.wemask_layers), me_layer=args.me_layer),
        lora=args.lora, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, seed=args.seed, save_steps=args.save_steps,
        device=args.device)
    runs = {"baseline": masked.baseline(out=str(out / "baseline")), "wemask": masked}  # one config, mask aside

    finals, seconds = {}, {}
    for name, cfg in runs.items():
        finals[name], seconds[name] = run_training(cfg)
    mask = TrainConfig.load(finals["wemask"]).wemask  # layers and ME layer as resolved in training
    for name in runs:
        evaluate(finals[name], out / name / "eval", mask, args)
    table = {name: scores(out / name / "eval") for name in runs}

    layers = mask.layers if isinstance(mask.layers, str) else tuple(mask.layers)
    cond_r = Condition(mask.rate, mask.mode, layers).key
    rows, acc = [], {}
    for name in runs:
        for cond, label in (("0", "no mask"), (cond_r, f"WeMask {mask.rate:g}")):
            vals = table[name].get(cond, {})
            acc[(name, cond)] = sum(vals.values()) / len(vals) if vals else float("nan")
            rows.append([name, label, len(vals), acc[(name, cond)]])
    # the headline: each model evaluated as it was trained, paired on the same test items
    base, mine = table["baseline"].get("0", {}), table["wemask"].get(cond_r, {})
    common = sorted(set(base) & set(mine))
    test = paired_test(([base[i] for i in common], [1.0] * len(common)),
                       ([mine[i] for i in common], [1.0] * len(common)), binary=True, exp=False, seed=args.seed)
    ratio = acc[("wemask", cond_r)] / acc[("baseline", "0")] if acc[("baseline", "0")] else float("nan")
    loss = {name: loss_curve(finals[name]) for name in runs}
    headline = [["baseline (trained & evaluated unmasked)", acc[("baseline", "0")]],
                [f"WeMask {mask.rate:g} (trained & evaluated masked)", acc[("wemask", cond_r)]],
                ["ratio WeMask / baseline", ratio],
                ["difference (paired bootstrap 95% CI)", f"{test['diff']:+.4f} {test['diff_ci']}"],
                ["McNemar p (only baseline right / only WeMask right)",
                 f"{test['mcnemar_p']:.3g} ({test['only_base']} / {test['only_other']})"],
                ["final train loss baseline / WeMask",
                 f"{loss['baseline'][-1][1]:.4f} / {loss['wemask'][-1][1]:.4f}"],
                ["train seconds baseline / WeMask", f"{seconds['baseline']:.0f} / {seconds['wemask']:.0f}"]]
    console_table("GSM8K test exact match after SFT", ["trained", "evaluated", "n", "accuracy"], rows)
    console_table("baseline vs WeMask", ["", "value"], headline)

    fig, ax = new_figure(figsize=(6, 3.5))
    for name, curve in loss.items():
        ax.plot(*zip(*curve), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss")
    ax.legend()
    md = (f"# SFT on GSM8K: baseline vs WeMask (rate {mask.rate:g}, layers {mask.layers}, ME layer "
          f"{mask.me_layer})\n\nCommand: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`\n\n"
          + markdown_table(["trained", "evaluated", "n", "accuracy"], rows) + "\n"
          + markdown_table(["", "value"], headline))
    write_report(out, {"config": masked.to_json(), "accuracy": [dict(zip(["trained", "evaluated", "n", "accuracy"], r))
                                                               for r in rows],
                       "paired_test": test, "ratio": ratio, "loss": loss, "train_seconds": seconds}, md,
                 {"loss": fig}, name="train_compare")
    print(f"report: {out / 'train_compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
