"""The WeMask rate curve: every task's score against the mask rate, per layer set and protocol, from `melayer eval`
folders (docs/results/rate_curve.md).

For each task, metric, protocol and layer set it reports the score at every rate, the first rate whose paired
difference with rate 0 is a Holm-significant *degradation* (p_Holm < 0.05 in the metric's worse direction; the
family is the eval folder's table) and, when there is none, the smallest effect the comparison could have found:
the minimum detectable effect at 80 % power, MDE = (z_{1-a/2} + z_{0.8}) x SE(paired diff), with a = 0.05 / m
(Bonferroni over the m comparisons of the folder, a lower bound of what Holm needs) and the SE read from the
paired bootstrap CI. A flat curve whose MDE is large says "inconclusive", not "no effect".

    python benchmarks/rate_curve.py --run SmolLM2-135M:clean:runs/gpu/rates_smollm2_clean \
        --run SmolLM2-135M:paper:runs/gpu/rates_smollm2_paper --out docs/results/rate_curve
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scipy.stats import norm

ALPHA, POWER = 0.05, 0.8


def load(spec: str) -> tuple[str, str, dict, str]:
    model, protocol, folder = spec.split(":", 2)
    report = json.loads((Path(folder) / "report.json").read_text())
    return model, protocol, report, Path(folder).name


def curves(model: str, protocol: str, report: dict, run: str) -> list[dict]:
    """One row per (task, metric, layer set): the scores by rate, the first degrading rate, the MDE."""
    rows = report["results"]
    m = sum(1 for r in rows if "diff" in r)
    z = norm.ppf(1 - ALPHA / max(m, 1) / 2) + norm.ppf(POWER)
    out = []
    for (task, metric) in dict.fromkeys((r["task"], r["metric"]) for r in rows):
        mine = [r for r in rows if r["task"] == task and r["metric"] == metric]
        base = next((r for r in mine if r["rate"] == 0), None)
        if base is None:
            continue
        for layers in dict.fromkeys(r["layers"] for r in mine if r["rate"] > 0):
            pts = sorted((r for r in mine if r["layers"] == layers and r["rate"] > 0), key=lambda r: r["rate"])
            worse = [r for r in pts if r.get("holm_p", 1) < ALPHA
                     and (r["diff"] < 0) == bool(r.get("higher_is_better", True))]
            ci_worse = [r for r in pts if r.get("diff_ci") and (r["diff_ci"][1] < 0 if r.get("higher_is_better", True)
                                                                 else r["diff_ci"][0] > 0)]
            ses = [(r["diff_ci"][1] - r["diff_ci"][0]) / (2 * norm.ppf(0.975)) for r in pts if r.get("diff_ci")]
            out.append({
                "model": model, "protocol": protocol, "run": run, "task": task, "metric": metric, "layers": layers,
                "mode": pts[0]["mode"] if pts else None, "n": base["n"],
                "higher_is_better": base.get("higher_is_better", True),
                "base": base["value"], "base_ci": base["ci"],
                "scores": {f"{r['rate']:g}": r["value"] for r in pts},
                "cis": {f"{r['rate']:g}": r["ci"] for r in pts},
                "diffs": {f"{r['rate']:g}": r.get("diff") for r in pts},
                "holm_p": {f"{r['rate']:g}": r.get("holm_p") for r in pts},
                "first_degrading_rate": worse[0]["rate"] if worse else None,
                "first_degrading_diff": worse[0]["diff"] if worse else None,
                "first_ci_worse_rate": ci_worse[0]["rate"] if ci_worse else None,
                "first_ci_worse_diff": ci_worse[0]["diff"] if ci_worse else None,
                "improving_rates": [r["rate"] for r in pts if r.get("holm_p", 1) < ALPHA and r not in worse],
                "mde": z * max(ses) if ses else None, "comparisons": m,
                "weights": report["weights"],
            })
    return out


def fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def markdown(rows: list[dict], command: str) -> str:
    rates = sorted({float(k) for r in rows for k in r["scores"]})
    head = ["model", "protocol", "task", "metric", "layers", "n", "rate 0"] + [f"{x:g}" for x in rates] + [
        "first degrading rate, Holm (Δ)", "first rate, CI excludes 0 (Δ)", "MDE (80 %)", "Holm family"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        first = "none" if r["first_degrading_rate"] is None else \
            f"**{r['first_degrading_rate']:g}** ({r['first_degrading_diff']:+.3g})"
        ci_first = "none" if r["first_ci_worse_rate"] is None else \
            f"{r['first_ci_worse_rate']:g} ({r['first_ci_worse_diff']:+.3g})"
        cells = [r["model"], r["protocol"], r["task"], r["metric"] + ("" if r["higher_is_better"] else " ↓"),
                 str(r["layers"]), str(r["n"]), fmt(r["base"])]
        for x in rates:
            key, p = f"{x:g}", r["holm_p"].get(f"{x:g}")
            v = r["scores"].get(key)
            cells.append(fmt(v) + ("*" if p is not None and p < ALPHA else ""))
        cells += [first, ci_first, fmt(r["mde"], 2), f"{r['run']} ({r['comparisons']})"]
        lines.append("| " + " | ".join(cells) + " |")
    weights = sorted({f"{r['model']}: {r['weights']}" for r in rows if r["weights"]})  # None: a folder with no
    # finished generating command (its model is named by the other folders)
    return "\n".join([
        "# WeMask rate curves", "",
        "Score against WeMask rate (k = rate x hidden dims of the first token's normalised hidden state zeroed at "
        "the attention input), per layer set (`after_me`: the block after the ME layer only; `from_after_me`: "
        "every block after it) and protocol (`clean`: melayer's prompts, `correct` masking at the absolute first "
        "position; `paper`: the official evaluation's prompts and masking of every chunk's first position). "
        "`*`: Holm-adjusted paired p < 0.05 against rate 0 on the same documents (either direction). "
        "First degrading rate: the smallest rate with a Holm-significant change in the metric's worse direction "
        "(the Holm family is every comparison of one eval folder: the last column names the folder and its "
        "size); next to it, the smallest rate whose unadjusted 95 % paired CI lies wholly on the worse side. "
        "MDE: the smallest paired difference the comparison had 80 % power to detect at the Bonferroni level of "
        "its table (the largest over the rates). ↓: lower is better.", "",
        "Weights: " + "; ".join(weights) + ".", "",
        "Command: `" + command + "`", "",
        *lines, ""])


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["task"], r["metric"]) for r in rows))
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(5.2 * cols, 3.6 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (model, task, metric) in zip(axes.flat, panels):
        mine = [r for r in rows if (r["model"], r["task"], r["metric"]) == (model, task, metric)]
        # one categorical rate axis per panel: lines from runs with different rate sets stay aligned
        axis = ["0"] + sorted({k for r in mine for k in r["scores"]}, key=float)
        for r in mine:
            keys = ["0"] + list(r["scores"])
            ys = [r["base"]] + list(r["scores"].values())
            cis = [r["base_ci"]] + [r["cis"][k] for k in r["scores"]]
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.errorbar([axis.index(k) for k in keys], ys, yerr=err, marker="o", capsize=3,
                        label=f"{r['protocol']}, {r['layers']} ({r['run']})")
        ax.set_xticks(range(len(axis)), axis)
        better = "" if mine[0]["higher_is_better"] else " (lower is better)"
        ax.set_title(f"{model}: {task}: {metric}{better}", fontsize=9)
        ax.set_xlabel("WeMask rate")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="MODEL:PROTOCOL:DIR",
                   help="an eval folder (report.json), labelled with its model and protocol (repeatable)")
    p.add_argument("--out", required=True, help="output stem: writes STEM.md, STEM.json, STEM.png")
    p.add_argument("--command", default=None, help="the command to print in the report (default: this one)")
    args = p.parse_args()
    rows = [row for spec in args.run for row in curves(*load(spec))]
    if not rows:
        raise SystemExit("rate_curve: no rate-0 baselines in the given folders")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import sys
    command = args.command or "python " + " ".join(sys.argv)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, command))
    figure(rows, out.with_suffix(".png"))
    for r in rows:
        first = "none" if r["first_degrading_rate"] is None else f"{r['first_degrading_rate']:g}"
        print(f"{r['model']:>14} {r['protocol']:>5} {r['task']:<24} {r['metric']:<18} {str(r['layers']):<14} "
              f"base {fmt(r['base']):>6}  first degrading {first:>5}  MDE {fmt(r['mde'], 2)}")


if __name__ == "__main__":
    main()
