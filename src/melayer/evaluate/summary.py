"""The sweep summary: per task, metric and WeMask condition the score, n, 95% CI and a paired test against
rate 0 on the same items; written as report.json/report.md/score_vs_rate.png (``write_report``) + summary.csv."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write_text
from ..report import console_table, markdown_table, new_figure, write_report
from .. import stats
from .tasks import get_task

CSV_COLUMNS = ("task", "metric", "cond", "rate", "mode", "n", "value", "ci_low", "ci_high", "ci_method",
               "higher_is_better", "n_paired", "diff", "diff_ci_low", "diff_ci_high", "bootstrap_p", "mcnemar_p",
               "holm_p", "only_base", "only_other")


def summarise(rows: list[dict], cfg) -> dict:
    from .runner import Condition, conditions, row_key

    conds = conditions(cfg)
    base = Condition(0.0) if Condition(0.0) in conds else None
    latest: dict = {}
    for r in rows:  # one row per key (a re-scored log has exactly one; keep the last to be safe)
        latest[row_key(r)] = r
    unscored = sum(1 for r in latest.values() if r.get("metrics") is None and r["task"] in cfg.tasks)
    results = []
    for name in cfg.tasks:
        task = get_task(name, cfg.refusal_classifier)
        for metric in task.metrics:
            per_cond: dict[str, dict[str, tuple[float, float]]] = {}
            for cond in conds:
                per_cond[cond.key] = {r["item_id"]: tuple(r["metrics"][metric.name]) for r in latest.values()
                                      if r["task"] == name and r["cond"] == cond.key and r.get("metrics")
                                      and metric.name in r["metrics"]}
            for cond in conds:
                vals = per_cond[cond.key]
                if not vals:
                    continue
                num = [v[0] for v in vals.values()]
                den = [v[1] for v in vals.values()]
                value, ci, method = stats.score_ci(num, den, metric.binary, metric.exp, seed=cfg.seed)
                res = {"task": name, "metric": metric.name, "cond": cond.key, "rate": cond.rate, "mode": cond.mode,
                       "n": len(vals), "value": value, "ci": list(ci), "ci_method": method,
                       "higher_is_better": metric.higher_is_better}
                if base is not None and cond != base:
                    common = sorted(set(vals) & set(per_cond[base.key]))
                    if common:
                        b = per_cond[base.key]
                        res.update(stats.paired_test(([b[i][0] for i in common], [b[i][1] for i in common]),
                                                     ([vals[i][0] for i in common], [vals[i][1] for i in common]),
                                                     metric.binary, metric.exp, seed=cfg.seed))
                results.append(res)
    _add_holm(results)
    present = {r["cond"] for r in results}  # a sweep of several commands need not cross every rate with every mode
    return {"config": cfg, "conditions": [c.key for c in conds if c.key in present], "results": results,
            "unscored_rows": unscored}


def _test_p(result: dict):
    """The comparison's test p: McNemar for 0/1 items, else the paired bootstrap, whose 0 enters as its resolution
    1 / N_BOOT (so that the adjusted value is an upper bound); None for the baseline, which compares nothing."""
    if result.get("mcnemar_p") is not None:
        return result["mcnemar_p"]
    if result.get("bootstrap_p") is None:
        return None
    return max(result["bootstrap_p"], 1 / stats.N_BOOT)


def _add_holm(results: list[dict]) -> None:
    """``holm_p``: each comparison's test p, Holm-adjusted over every comparison against rate 0 in this summary."""
    for r, p in zip(results, stats.holm([_test_p(r) for r in results])):
        if "diff" in r:
            r["holm_p"] = p


def _csv_text(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in results:
        flat = {**r, "ci_low": r["ci"][0], "ci_high": r["ci"][1],
                "diff_ci_low": (r.get("diff_ci") or [None, None])[0],
                "diff_ci_high": (r.get("diff_ci") or [None, None])[1]}
        w.writerow(["" if flat.get(c) is None else flat.get(c) for c in CSV_COLUMNS])
    return buf.getvalue()


def _p(v) -> str:
    if v is None:
        return "–"
    return "<5e-4" if v == 0 else f"{v:.3g}"  # a bootstrap p of 0 means below 1 / 2000 resamples


def _table_rows(results: list[dict]) -> list[list]:
    return [[r["task"], r["metric"] + ("" if r["higher_is_better"] else " ↓"), r["cond"], r["n"], r["value"],
             stats.fmt_ci(r["ci"]), r.get("diff"), stats.fmt_ci(r.get("diff_ci")), _p(r.get("mcnemar_p")),
             _p(r.get("bootstrap_p")), _p(r.get("holm_p"))] for r in results]


TABLE_COLUMNS = ["task", "metric", "WeMask", "n", "score", "95% CI", "Δ vs rate 0", "Δ 95% CI", "McNemar p",
                 "bootstrap p", "Holm p"]


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"# melayer eval: {cfg.model}", "",
             f"Tasks {', '.join(cfg.tasks)}; WeMask conditions {', '.join(summary['conditions'])} "
             f"(layers {cfg.wemask_layers}); limit {cfg.limit} (seed {cfg.seed}); chat {cfg.chat}; "
             f"{'sampling' if cfg.sample else 'greedy'}.", "",
             "95% CIs: Wilson for 0/1 items, item bootstrap otherwise. Δ is the paired difference against rate 0 "
             "on the same items (bootstrap CI); McNemar is exact on the discordant pairs. Holm p: the McNemar p "
             "(the bootstrap p where there is none) adjusted for every comparison in this table (Holm-Bonferroni). "
             "↓: lower is better.", "",
             markdown_table(TABLE_COLUMNS, _table_rows(summary["results"]))]
    if summary["unscored_rows"]:
        lines.append(f"\n{summary['unscored_rows']} rows are not scored yet: run `melayer eval --score-only "
                     f"--out {cfg.out}`.")
    return "\n".join(lines) + "\n"


def figure(results: list[dict]):
    panels = list(dict.fromkeys((r["task"], r["metric"]) for r in results))
    cols = min(3, max(1, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    rates = sorted({r["rate"] for r in results})
    pos = {rate: i for i, rate in enumerate(rates)}
    for ax, (task, metric) in zip(axes.flat, panels):
        mine = [r for r in results if r["task"] == task and r["metric"] == metric]
        base = [r for r in mine if r["rate"] == 0]
        for mode in sorted({r["mode"] for r in mine if r["rate"] > 0}) or ["correct"]:
            pts = sorted(base + [r for r in mine if r["rate"] > 0 and r["mode"] == mode], key=lambda r: r["rate"])
            x = [pos[r["rate"]] for r in pts]
            y = [r["value"] for r in pts]
            err = [[max(0.0, r["value"] - r["ci"][0]) for r in pts], [max(0.0, r["ci"][1] - r["value"]) for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=mode)
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlabel("WeMask rate")
        ax.set_title(f"{task}: {metric}" + ("" if mine[0]["higher_is_better"] else " (lower is better)"), fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_summary(out: Path, summary: dict, cfg) -> dict:
    results = summary["results"]
    atomic_write_text(Path(out) / "summary.csv", _csv_text(results))
    figures = {"score_vs_rate": figure(results)} if results else {}
    paths = write_report(out, summary, markdown(summary), figures=figures)
    console_table(f"melayer eval ({out})", TABLE_COLUMNS, _table_rows(results))
    return paths
