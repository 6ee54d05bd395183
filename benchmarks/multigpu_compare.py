"""The multi-GPU runs of ``benchmarks/gpu/multigpu_jobs.sh`` against their one-GPU twins, as one report.

    python benchmarks/multigpu_compare.py runs/multigpu --out docs/results/multigpu

- sharded evaluation: the merged sweep against the one-GPU sweep, document by document (identical answers, the
  largest log-likelihood difference, every score) and the wall-time speed-up;
- a model over every GPU: the scan's ME layer and emergence, and the masked generations, against one GPU;
- SFT with WeMask: DDP and FSDP losses per step against one GPU at the same global batch, each rank's mask count,
  and whether the final model reloads with its mask.
Parts whose folders are missing are reported as not run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _times(run: Path) -> dict[str, float]:
    path = run / "times.txt"
    if not path.is_file():
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in path.read_text().splitlines() if line.strip()}


def _numbers(x):
    """lm-eval keeps log-likelihoods as strings: numbers back, everything else as it is."""
    if isinstance(x, (list, tuple)):
        return [_numbers(v) for v in x]
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _max_gap(a, b) -> float:
    """Largest numeric difference between two nested answers (inf when their shapes or texts differ)."""
    if isinstance(a, list) and isinstance(b, list):
        return max((_max_gap(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def compare_eval(run: Path) -> dict:
    from melayer.evaluate.summary import load_folder

    one, merged = run / "eval_1gpu", run / "eval_merged"
    if not (one / "report.json").is_file() or not (merged / "report.json").is_file():
        return {"run": False}
    a, b = load_folder(one)[1], load_folder(merged)[1]
    docs = {(c, t, s["doc_id"]): _numbers(s["resps"]) for (c, t), rows in a.items() for s in rows}
    other = {(c, t, s["doc_id"]): _numbers(s["resps"]) for (c, t), rows in b.items() for s in rows}
    gaps = [_max_gap(docs[k], other[k]) for k in docs if k in other]
    scores = lambda folder: {(r["task"], r["metric"], r["cond"]): r["value"]  # noqa: E731
                             for r in json.loads((folder / "report.json").read_text())["results"]}
    sa, sb = scores(one), scores(merged)
    times = _times(run)
    return {"run": True, "documents": len(docs), "same_documents": set(docs) == set(other),
            "identical_answers": sum(g == 0 for g in gaps), "differing_texts": sum(g == float("inf") for g in gaps),
            "max_loglik_gap": max((g for g in gaps if g != float("inf")), default=0.0),
            "scores": [{"task": k[0], "metric": k[1], "cond": k[2], "one_gpu": sa[k], "sharded": sb.get(k)}
                       for k in sorted(sa)],
            "wall_1gpu_s": times.get("eval_1gpu"), "wall_sharded_s": times.get("eval_sharded"),
            "speedup": (times["eval_1gpu"] / times["eval_sharded"]) if {"eval_1gpu", "eval_sharded"} <= set(times)
            else None}


def compare_model(run: Path) -> dict:
    one, many = run / "scan_1gpu", run / "scan_ngpu"
    if not (one / "report.json").is_file() or not (many / "report.json").is_file():
        return {"run": False}
    e1, en = (json.loads((f / "report.json").read_text())["emergence"] for f in (one, many))
    devices = json.loads((many / "provenance.json").read_text()).get("device_map") if \
        (many / "provenance.json").is_file() else None
    gen = {n: (run / f"generate_{n}.txt").read_text() if (run / f"generate_{n}.txt").is_file() else None
           for n in ("1gpu", "ngpu")}
    return {"run": True, "devices": devices, "me_layer": [e1["me_layer"], en["me_layer"]],
            "kind": [e1["kind"], en["kind"]], "same_me_layer": e1["me_layer"] == en["me_layer"],
            "generation_identical": gen["1gpu"] is not None and gen["1gpu"] == gen["ngpu"],
            "generation": gen}


def _losses(folder: Path) -> dict[int, float]:
    report = json.loads((folder / "train_report.json").read_text())
    return {int(r["step"]): float(r["loss"]) for r in report["log_history"] if "loss" in r and "step" in r}


def compare_train(run: Path) -> dict:
    base = run / "sft_1gpu"
    if not (base / "train_report.json").is_file():
        return {"run": False}
    ref = _losses(base)
    times = _times(run)
    out: dict = {"run": True, "one_gpu": {"losses": ref, "wall_s": times.get("sft_1gpu")}}
    for name in ("ddp", "fsdp"):
        folder = run / f"sft_{name}"
        if not (folder / "train_report.json").is_file():
            out[name] = {"run": False}
            continue
        got = _losses(folder)
        summary = json.loads((folder / "train_report.json").read_text())["summary"]
        reload_ok = None
        final = folder / "final"
        if final.is_dir():
            from melayer import load_model, saved_wemask

            model, _ = load_model(final, device="cpu")
            mask = saved_wemask(model)
            reload_ok = mask is not None and mask.rate > 0
        common = sorted(set(ref) & set(got))
        out[name] = {"run": True, "losses": got, "wall_s": times.get(f"sft_{name}"),
                     "max_rel_loss_gap": max((abs(got[s] - ref[s]) / abs(ref[s]) for s in common), default=None),
                     "wemask_fired_per_rank": summary.get("wemask_fired_per_rank"), "final_reloads_masked": reload_ok}
    return out


def markdown(res: dict) -> str:
    ev, mo, tr = res["eval"], res["model"], res["train"]
    lines = ["# Multi-GPU runs against one GPU", "", f"Run folder: `{res['run']}`; commands: "
             "`benchmarks/gpu/multigpu_jobs.sh`, then `python benchmarks/multigpu_compare.py`.", "",
             "## Sharded evaluation", ""]
    if ev["run"]:
        lines += [f"{ev['documents']} (condition, task, document) answers; same documents: {ev['same_documents']}; "
                  f"identical answers: {ev['identical_answers']}; differing texts: {ev['differing_texts']}; largest "
                  f"log-likelihood gap: {ev['max_loglik_gap']:.3g}. Wall time: one GPU {ev['wall_1gpu_s']} s, sharded "
                  f"{ev['wall_sharded_s']} s (speed-up {ev['speedup'] and round(ev['speedup'], 2)}).", "",
                  "| task | metric | condition | one GPU | sharded + merged |", "|---|---|---|---|---|"]
        lines += [f"| {s['task']} | {s['metric']} | {s['cond']} | {s['one_gpu']:.4g} | "
                  f"{'–' if s['sharded'] is None else format(s['sharded'], '.4g')} |" for s in ev["scores"]]
    else:
        lines.append("Not run.")
    lines += ["", "## One model over several GPUs", ""]
    lines.append(f"Devices {mo['devices']}; ME layer one GPU / all GPUs: {mo['me_layer']}; emergence {mo['kind']}; "
                 f"masked generation identical: {mo['generation_identical']}." if mo["run"] else "Not run.")
    lines += ["", "## SFT with WeMask, same global batch", ""]
    if tr["run"]:
        for name in ("ddp", "fsdp"):
            r = tr[name]
            lines.append(f"- {name.upper()}: " + ("not run" if not r["run"] else
                         f"largest relative loss gap to one GPU {r['max_rel_loss_gap']:.3g}; mask count per rank "
                         f"{r['wemask_fired_per_rank']}; final model reloads with its mask: "
                         f"{r['final_reloads_masked']}; wall {r['wall_s']} s (one GPU {tr['one_gpu']['wall_s']} s)"))
    else:
        lines.append("Not run.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the folder multigpu_jobs.sh wrote (runs/multigpu)")
    p.add_argument("--out", default=None, help="write multigpu.json and multigpu.md here")
    args = p.parse_args(argv)
    run = Path(args.run)
    res = {"run": str(run), "eval": compare_eval(run), "model": compare_model(run), "train": compare_train(run)}
    text = markdown(res)
    print(text)
    if args.out:
        from melayer.report import write_report

        write_report(Path(args.out), res, text, {}, name="multigpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
