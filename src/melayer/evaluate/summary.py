"""The sweep summary: per task, metric and WeMask condition the score, n, 95% CI and a paired test against rate 0 on
the same documents, Holm-adjusted over the whole report.

It reads the lm-eval samples saved under ``lm_eval/<condition>/`` (the newest file per task and condition, so
several commands can fill one out dir) and pairs them by (task, filter, doc_id), checking that both conditions saw
the same document and prompt. Every metric becomes a ratio of sums over documents: a 0/1 or scalar value v is
(v, 1); a list (IFEval's instruction-level results) is (sum, length); a rolling log-likelihood (ll, n) of a
perplexity is (−ll, n) with exp; bits per byte is (−ll / ln 2, n). Writes ``report.json``, ``report.md``,
``summary.csv``, ``score_vs_rate.png`` and ``results.json`` (lm-eval's results format, one entry per task and
condition, so ``lm_eval.utils.make_table`` reads it).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .. import stats
from ..errors import MelayerError
from ..io import atomic_write_json, atomic_write_text, read_jsonl
from ..report import console_table, data_frame, markdown_table, new_figure, write_report

LM_EVAL_DIR = "lm_eval"
PERPLEXITY = {"word_perplexity", "byte_perplexity", "perplexity", "token_perplexity"}
CSV_COLUMNS = ("task", "metric", "cond", "rate", "mode", "layers", "n", "value", "ci_low", "ci_high", "ci_method",
               "higher_is_better", "n_paired", "diff", "diff_ci_low", "diff_ci_high", "bootstrap_p", "mcnemar_p",
               "holm_p", "only_base", "only_other")


def _latest(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: p.stem.rsplit("_", 1)[-1])


def load_folder(out: Path) -> tuple[dict, dict, dict]:
    """(conditions by key, samples by (cond, task), lm-eval results by (cond, task)) of an eval out dir."""
    conds, samples, results = {}, {}, {}
    for folder in sorted((Path(out) / LM_EVAL_DIR).glob("*")):
        meta = folder / "condition.json"
        if not meta.is_file():
            continue
        cond = json.loads(meta.read_text(encoding="utf-8"))
        conds[cond["condition"]] = cond
        by_task: dict[str, list[Path]] = {}
        for path in folder.rglob("samples_*.jsonl"):
            task = path.stem[len("samples_"):].rsplit("_", 1)[0]
            by_task.setdefault(task, []).append(path)
        for task, paths in by_task.items():
            samples[cond["condition"], task] = read_jsonl(_latest(paths))
        for path in sorted(folder.rglob("results_*.json"), key=lambda p: p.stem.rsplit("_", 1)[-1]):
            res = json.loads(path.read_text(encoding="utf-8"))
            for task in res.get("configs", {}):
                results[cond["condition"], task] = res
    return conds, samples, results


def _units(metric: str, value) -> Optional[tuple[float, float]]:
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return float(value), 1.0
    if isinstance(value, (list, tuple)):
        if metric in PERPLEXITY and len(value) == 2:
            return -float(value[0]), float(value[1])
        if metric == "bits_per_byte" and len(value) == 2:
            return -float(value[0]) / math.log(2), float(value[1])
        if all(isinstance(v, (bool, int, float)) for v in value):
            return float(sum(value)), float(len(value))
    return None


def per_document(rows: list[dict]) -> dict[str, dict[tuple, tuple[float, float]]]:
    """metric -> (filter, doc_id) -> (num, den) for one task and condition."""
    out: dict[str, dict] = {}
    for r in rows:
        for metric in r.get("metrics", []):
            units = _units(metric, r.get(metric))
            if units is not None:
                out.setdefault(metric, {})[(r.get("filter", "none"), r["doc_id"])] = units
    return out


def _hashes(rows: list[dict]) -> dict[tuple, tuple]:
    return {(r.get("filter", "none"), r["doc_id"]): (r.get("doc_hash"), r.get("prompt_hash")) for r in rows}


def summarise(conds: dict, samples: dict, results: dict, seed: int = 0) -> list[dict]:
    rows = []
    tasks = sorted({t for _, t in samples})
    order = sorted(conds, key=lambda k: (conds[k]["rate"], conds[k]["mode"], str(conds[k]["layers"])))
    for task in tasks:
        base_rows = samples.get(("0", task))
        base = per_document(base_rows) if base_rows else {}
        for cond in order:
            if (cond, task) not in samples:
                continue
            mine = per_document(samples[cond, task])
            res = results.get((cond, task), {})
            direction = res.get("higher_is_better", {}).get(task, {})
            if base_rows and cond != "0":
                a, b = _hashes(base_rows), _hashes(samples[cond, task])
                bad = [k for k in set(a) & set(b) if a[k] != b[k]]
                if bad:
                    raise MelayerError(f"{task}: condition {cond} saw other documents or prompts than rate 0 for "
                                       f"{len(bad)} items (e.g. doc {bad[0][1]}): these runs cannot be paired")
            for metric, values in mine.items():
                num = [v[0] for v in values.values()]
                den = [v[1] for v in values.values()]
                exp = metric in PERPLEXITY
                binary = all(d == 1.0 and n in (0.0, 1.0) for n, d in zip(num, den))
                value, ci, method = stats.score_ci(num, den, binary, exp, seed=seed)
                c = conds[cond]
                row = {"task": task, "metric": metric, "cond": cond, "rate": c["rate"], "mode": c["mode"],
                       "layers": c["layers"], "chat": c.get("chat"), "n": len(values), "value": value,
                       "ci": list(ci), "ci_method": method,
                       "higher_is_better": bool(direction.get(metric, metric not in PERPLEXITY))}
                if cond != "0" and metric in base:
                    common = sorted(set(values) & set(base[metric]))
                    if common:
                        bm = base[metric]
                        row.update(stats.paired_test(([bm[k][0] for k in common], [bm[k][1] for k in common]),
                                                     ([values[k][0] for k in common], [values[k][1] for k in common]),
                                                     binary, exp, seed=seed))
                rows.append(row)
    _add_holm(rows)
    return rows


def _test_p(result: dict):
    """McNemar for 0/1 items, else the paired bootstrap, whose 0 enters as its resolution 1 / N_BOOT (so the
    adjusted value is an upper bound); None for the baseline, which compares nothing."""
    if result.get("mcnemar_p") is not None:
        return result["mcnemar_p"]
    if result.get("bootstrap_p") is None:
        return None
    return max(result["bootstrap_p"], 1 / stats.N_BOOT)


def _add_holm(results: list[dict]) -> None:
    for r, p in zip(results, stats.holm([_test_p(r) for r in results])):
        if "diff" in r:
            r["holm_p"] = p


def lm_eval_results(results: list[dict]) -> dict:
    """The summary in lm-eval's results format: one "task @ condition" entry per task and condition."""
    out: dict = {"results": {}, "versions": {}, "n-samples": {}, "higher_is_better": {}}
    for r in results:
        name = f"{r['task']} @ {r['cond']}"
        entry = out["results"].setdefault(name, {"alias": name})
        entry[f"{r['metric']},none"] = r["value"]
        entry[f"{r['metric']}_stderr,none"] = "N/A"
        out["versions"][name] = 1.0
        out["n-samples"][name] = {"original": r["n"], "effective": r["n"]}
        out["higher_is_better"].setdefault(name, {})[r["metric"]] = r["higher_is_better"]
    return out


def _p(v) -> str:
    if v is None:
        return "–"
    return "<5e-4" if v == 0 else f"{v:.3g}"


TABLE_COLUMNS = ["task", "metric", "WeMask", "n", "score", "95% CI", "Δ vs rate 0", "Δ 95% CI", "McNemar p",
                 "bootstrap p", "Holm p"]


def _table_rows(results: list[dict]) -> list[list]:
    return [[r["task"], r["metric"] + ("" if r["higher_is_better"] else " ↓"), r["cond"], r["n"], r["value"],
             stats.fmt_ci(r["ci"]), r.get("diff"), stats.fmt_ci(r.get("diff_ci")), _p(r.get("mcnemar_p")),
             _p(r.get("bootstrap_p")), _p(r.get("holm_p"))] for r in results]


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"# melayer eval: {summary['weights'] or cfg['model']}", "",
             f"Protocol **{cfg['protocol']}**" + (f"; deviations: {'; '.join(summary['deviations'])}"
                                                  if summary["deviations"] else " (no deviation from the preset)")
             + f". Tasks {', '.join(summary['tasks'])}; WeMask conditions {', '.join(summary['conditions'])} "
             f"(ME layer {cfg['me_layer']}, 0-based); limit {cfg['limit']} per task (seed {cfg['seed']}); "
             f"{'sampling' if cfg['sample'] else 'greedy'}."
             + (f" **Shard {cfg['shard_index']} of {cfg['num_shards']}** (0-based): every {cfg['num_shards']}-th "
                "document only; `melayer eval --merge` scores the whole sweep." if cfg.get("num_shards", 1) > 1 else ""),
             *([] if not summary.get("not_scored") else [
                 "", "**Not scored** (no logged answers: the run stopped before them; the same command resumes): "
                 + "; ".join(summary["not_scored"]) + "."]),
             "",
             "95% CIs: Wilson for 0/1 items, document bootstrap otherwise. Δ is the paired difference against rate 0 "
             "on the same documents (bootstrap CI); McNemar is exact on the discordant pairs. Holm p: the McNemar p "
             "(the bootstrap p where there is none) adjusted for every comparison in this table. ↓: lower is "
             "better. Per-condition lm-eval results and samples: `lm_eval/<condition>/`.", "",
             markdown_table(TABLE_COLUMNS, _table_rows(summary["results"]))]
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
        lines = sorted({(r["mode"], str(r["layers"])) for r in mine if r["rate"] > 0}) or [("correct", "None")]
        for mode, layers in lines:
            pts = sorted(base + [r for r in mine if r["rate"] > 0 and (r["mode"], str(r["layers"])) == (mode, layers)],
                         key=lambda r: r["rate"])
            x = [pos[r["rate"]] for r in pts]
            y = [r["value"] for r in pts]
            err = [[max(0.0, r["value"] - r["ci"][0]) for r in pts], [max(0.0, r["ci"][1] - r["value"]) for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{mode}, {layers}")
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlabel("WeMask rate")
        ax.set_title(f"{task}: {metric}" + ("" if mine[0]["higher_is_better"] else " (lower is better)"), fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


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


@dataclass
class EvalSummary:
    """What ``melayer eval`` reports: per task, metric and condition, the score, its CI and the paired test."""

    config: dict
    weights: Optional[str]
    deviations: list[str]
    tasks: list[str]
    conditions: list[str]
    results: list[dict]  # one row per (task, metric, condition); see CSV_COLUMNS
    not_scored: list[str] = dataclasses.field(default_factory=list)  # "tasks @ condition" with no logged answers

    def to_pandas(self):
        """One row per task, metric and condition (the columns of ``summary.csv``)."""
        return data_frame(self.results)

    def save(self, out_dir: str | Path) -> dict:
        """Write summary.csv, results.json (lm-eval's shape), report.json, report.md and the plot to ``out_dir``."""
        atomic_write_text(Path(out_dir) / "summary.csv", _csv_text(self.results))
        atomic_write_json(Path(out_dir) / "results.json", lm_eval_results(self.results))
        return write_report(out_dir, dataclasses.asdict(self), markdown(dataclasses.asdict(self)),
                            figures={"score_vs_rate": figure(self.results)})


def summarise_folder(out: Path, cfg, deviations: list[str], not_scored: Sequence[str] = ()) -> EvalSummary:
    """Pair, test and write the report of an eval out dir (every task and condition it holds); ``not_scored``:
    the requested "tasks @ condition" that have no answers yet, named in the report."""
    conds, samples, results = load_folder(out)
    if not samples:
        raise MelayerError(f"{out} holds no lm-eval samples to summarise")
    rows = summarise(conds, samples, results, seed=cfg.seed)
    weights = None
    record = Path(out) / "provenance.json"
    if record.is_file():
        model = json.loads(record.read_text(encoding="utf-8")).get("model") or {}
        weights = f"{Path(model.get('location', cfg.model)).name} ({model.get('weights')})" if model else None
    summary = EvalSummary(config=dataclasses.asdict(cfg), weights=weights, deviations=deviations,
                          tasks=sorted({r["task"] for r in rows}),
                          conditions=[c for c in sorted(conds, key=lambda k: (conds[k]["rate"], k))
                                      if any(r["cond"] == c for r in rows)],
                          results=rows, not_scored=list(not_scored))
    summary.save(out)
    console_table(f"melayer eval ({out})", TABLE_COLUMNS, _table_rows(rows))
    return summary
