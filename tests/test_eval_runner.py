"""The eval runner on lm-eval: conditions paired by document, reports recomputed from lm-eval's own samples, resume
after SIGKILL without recomputing or losing an answer, rescoring without the model, and checks before any work."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from helpers import byte_tokenizer, save_tiny  # noqa: E402
from melayer import stats  # noqa: E402
from melayer.errors import MelayerError  # noqa: E402
from melayer.evaluate import EvalConfig, run_eval  # noqa: E402
from melayer.evaluate.summary import load_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["melayer_gsm8k", "melayer_mmlu", "melayer_xstest", "melayer_wikitext2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama saved with a byte-level tokenizer (any text encodes; it has a chat template)."""
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny(folder, tokenizer=byte_tokenizer())
    return folder


def _cfg(tiny, out, data_dir, **kw) -> EvalConfig:
    base = dict(model=str(tiny), tasks=TASKS, wemask_rates=[0.0, 0.1], wemask_modes=["correct", "paper"],
                me_layer=1, limit=3, seed=1, data_dir=str(data_dir), out=str(out), batch_size=2, max_new_tokens=6)
    base.update(kw)
    return EvalConfig(**base)


def _responses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep(tiny, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, run_eval(_cfg(tiny, out, data_dir))


def test_every_condition_sees_the_same_documents_and_the_mask_acts(sweep):
    out, summary = sweep
    conds, samples, _ = load_folder(out)
    assert set(conds) == {"0", "0.1/correct/after_me", "0.1/paper/after_me"}
    leaves = {"melayer_gsm8k", "melayer_mmlu", "melayer_xstest_safe", "melayer_xstest_unsafe", "melayer_wikitext2"}
    assert {t for _, t in samples} == leaves
    for task in leaves:
        docs = [sorted((s["doc_id"], s["doc_hash"], s["prompt_hash"]) for s in samples[c, task]) for c in conds]
        assert docs[0] == docs[1] == docs[2] and len(docs[0]) == 3  # limit 3, the same seeded subset
    # the mask reached the forward passes: MMLU log-likelihoods of the same requests moved
    rows = [r for r in _responses(out) if r["kind"] == "loglikelihood"]
    base = {r["key"]: r["response"][0] for r in rows if r["cond"] == "0"}
    masked = {r["key"]: r["response"][0] for r in rows if r["cond"] == "0.1/correct/after_me"}
    assert base.keys() == masked.keys() and any(abs(base[k] - masked[k]) > 1e-4 for k in base)
    keys = [(r["cond"], r["key"]) for r in _responses(out)]
    assert len(keys) == len(set(keys))  # every request answered once per condition


def test_report_is_recomputed_from_lm_eval_samples(sweep):
    out, summary = sweep
    _, samples, _ = load_folder(out)
    res = {(r["task"], r["metric"], r["cond"]): r for r in summary.results}
    acc0 = [s["acc"] for s in samples["0", "melayer_mmlu"]]
    assert res["melayer_mmlu", "acc", "0"]["value"] == pytest.approx(sum(acc0) / 3)
    pages = samples["0", "melayer_wikitext2"]
    ppl = math.exp(-sum(s["word_perplexity"][0] for s in pages) / sum(s["word_perplexity"][1] for s in pages))
    w = res["melayer_wikitext2", "word_perplexity", "0"]
    assert w["value"] == pytest.approx(ppl) and not w["higher_is_better"] and w["ci"][0] <= ppl <= w["ci"][1]
    assert res["melayer_xstest_safe", "refusal", "0"]["higher_is_better"] is False
    assert res["melayer_mmlu", "acc", "0.1/paper/after_me"]["mcnemar_p"] is not None
    compared = [r for r in summary.results if "diff" in r]
    raw = [r["mcnemar_p"] if r["mcnemar_p"] is not None else max(r["bootstrap_p"], 1 / stats.N_BOOT)
           for r in compared]
    assert [r["holm_p"] for r in compared] == pytest.approx(stats.holm(raw))
    assert all(r["holm_p"] >= p for r, p in zip(compared, raw))


def test_outputs_are_lm_eval_readable(sweep):
    from lm_eval.utils import make_table

    out, _ = sweep
    table = make_table(json.loads((out / "results.json").read_text()))
    assert "melayer_mmlu @ 0.1/correct/after_me" in table
    for folder in (out / "lm_eval").iterdir():
        result = json.loads(next(folder.rglob("results_*.json")).read_text())
        assert make_table(result) and result["melayer"]["condition"] == json.loads(
            (folder / "condition.json").read_text())["condition"]
        sample = json.loads(next(folder.rglob("samples_melayer_mmlu_*.jsonl")).read_text().splitlines()[0])
        assert {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash",
                "target_hash"} <= set(sample)
    for name in ("report.json", "report.md", "summary.csv", "score_vs_rate.png", "eval_config.json",
                 "provenance.json"):
        assert (out / name).stat().st_size > 0
    record = json.loads((out / "provenance.json").read_text())
    assert record["versions"]["lm_eval"] and any("gsm8k/test.jsonl" in f for f in record["data"])


def test_summary_object_matches_the_files_it_saves(sweep, tmp_path):
    import csv

    out, summary = sweep
    frame = summary.to_pandas()
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(frame) == len(rows) == len(summary.results)
    assert [round(float(r["value"]), 6) for r in rows] == [round(v, 6) for v in frame["value"]]
    paths = summary.save(tmp_path / "copy")
    assert json.loads(paths["json"].read_text())["results"] == json.loads((out / "report.json").read_text())["results"]


def test_score_only_rescores_without_the_model(sweep, monkeypatch):
    import transformers

    out, summary = sweep

    def no_model(*a, **k):
        raise AssertionError("--score-only must not load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    again = run_eval(EvalConfig(out=str(out), score_only=True))
    assert [(r["task"], r["metric"], r["cond"], r["value"]) for r in again.results] == \
        [(r["task"], r["metric"], r["cond"], r["value"]) for r in summary.results]


def test_score_only_elsewhere_takes_the_tokenizer_from_the_given_model(sweep, tiny, tmp_path):
    """Answers made on another machine: the saved model path does not exist here. The error says what to pass;
    with the model given, the scores are exactly those of the original run."""
    import shutil

    src, summary = sweep
    out = tmp_path / "copied"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("lm_eval"))
    saved = json.loads((out / "eval_config.json").read_text())
    saved["model"] = str(tmp_path / "gone" / "model.gguf")
    (out / "eval_config.json").write_text(json.dumps(saved))
    with pytest.raises(MelayerError, match="pass that model"):
        run_eval(EvalConfig(out=str(out), score_only=True, tasks=None))  # tasks=None: the whole sweep, as the CLI
    again = run_eval(EvalConfig(model=str(tiny), out=str(out), score_only=True, tasks=None))
    assert [(r["task"], r["metric"], r["cond"], r["value"]) for r in again.results] == \
        [(r["task"], r["metric"], r["cond"], r["value"]) for r in summary.results]


def test_score_only_rescores_a_part_and_skips_unfinished_conditions(sweep, tmp_path):
    """An interrupted sweep: one condition has no answers. Rescoring one task keeps the others' numbers exact."""
    import shutil

    src, summary = sweep
    out = tmp_path / "partial"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("lm_eval"))
    dropped = "0.1/paper/after_me"
    rows = [r for r in _responses(out) if r["cond"] != dropped]
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = run_eval(EvalConfig(out=str(out), score_only=True, tasks=["melayer_mmlu"]))
    got = {(r["task"], r["metric"], r["cond"]): r["value"] for r in again.results}
    want = {(r["task"], r["metric"], r["cond"]): r["value"] for r in summary.results
            if r["task"] == "melayer_mmlu" and r["cond"] != dropped}
    assert got == want and want
    assert not (out / "lm_eval" / "0.1_paper_after_me").exists()  # nothing half-written for the skipped one
    assert again.not_scored == [f"melayer_mmlu @ {dropped}"]  # the report names what it left out
    assert "**Not scored** (no logged answers" in (out / "report.md").read_text() and dropped in \
        (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["not_scored"] == again.not_scored
    assert summary.not_scored == [] and "Not scored" not in (src / "report.md").read_text()


def test_checks_come_before_any_work(tiny, data_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MelayerError, match="outside the model's 4 blocks"):  # a 30-block model's ME layer
        run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_xstest"], wemask_rates=[0.0, 0.1], me_layer=30))
    assert not (out / "responses.jsonl").exists() and not (out / "eval_config.json").exists()
    with pytest.raises(MelayerError, match="unknown lm-eval task"):
        run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_gsm9k"]))
    with pytest.raises(MelayerError, match="data file missing"):
        run_eval(_cfg(tiny, out, tmp_path, tasks=["melayer_gsm8k"]))
    # the right layer in the same folder: nothing was written, so nothing refuses it
    summary = run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_xstest"], wemask_rates=[0.0, 0.1], limit=2,
                            wemask_modes=["correct"]))
    assert {r["cond"] for r in summary.results} == {"0", "0.1/correct/after_me"}
    with pytest.raises(MelayerError, match="other settings .*dtype"):
        run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_xstest"], limit=2, dtype="bf16"))


def test_one_task_per_command_into_one_out_dir(tiny, data_dir, tmp_path):
    out = tmp_path / "multi"
    run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_mmlu"], wemask_modes=["correct"], limit=2))
    summary = run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_advbench"], wemask_rates=[0.0], limit=2))
    got = {(r["task"], r["cond"]) for r in summary.results}
    assert got == {("melayer_mmlu", "0"), ("melayer_mmlu", "0.1/correct/after_me"), ("melayer_advbench", "0")}


def test_paper_protocol_runs_the_official_prompts_without_chat(tiny, data_dir, tmp_path):
    out = tmp_path / "paper"
    summary = run_eval(_cfg(tiny, out, data_dir, tasks=["melayer_gsm8k"], protocol="paper", wemask_modes=None,
                            limit=1))
    conds, samples, _ = load_folder(out)
    assert set(conds) == {"0", "0.1/paper/after_me"} and {t for _, t in samples} == {"melayer_gsm8k_paper"}
    prompt = samples["0", "melayer_gsm8k_paper"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.endswith("Let's think step by step and output the final answer after \"####\".")
    assert "assistant:" not in prompt  # no chat template
    assert json.loads((out / "eval_config.json").read_text())["protocol"] == "paper"
    assert "Protocol **paper**" in (out / "report.md").read_text() and summary.deviations == []


CHILD = """
import json, sys
from melayer.evaluate import EvalConfig, run_eval
run_eval(EvalConfig(**json.loads(sys.argv[1])))
"""


def test_sigkill_mid_run_then_resume_recomputes_and_loses_nothing(tiny, data_dir, tmp_path):
    import dataclasses

    cfg = _cfg(tiny, tmp_path / "killed", data_dir, tasks=["melayer_gsm8k"], wemask_rates=[0.0], limit=8,
               batch_size=1, max_new_tokens=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(cfg))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "responses.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the child finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _responses(tmp_path / "killed")
    assert 2 <= len(before) < 8
    run_eval(cfg)  # resume in this process
    after = _responses(tmp_path / "killed")
    assert after[:len(before)] == before and len(after) == 8  # kept, nothing asked twice
    clean = run_eval(dataclasses.replace(cfg, out=str(tmp_path / "clean")))
    assert {r["key"]: r["response"] for r in after} == {r["key"]: r["response"]
                                                         for r in _responses(tmp_path / "clean")}
    assert clean.results


@pytest.mark.real
def test_smollm2_sweep_end_to_end(data_dir, tmp_path):
    """The real model: WeMask on block 12 (after the ME layer) moves MMLU log-likelihoods at rate 0.01
    (k = 5 of 576 dims), and every condition is summarised against rate 0."""
    summary = run_eval(EvalConfig(model="default", tasks=["melayer_mmlu", "melayer_xstest"], wemask_rates=[0.0, 0.01],
                                  me_layer=11, limit=4, data_dir=str(data_dir), out=str(tmp_path), batch_size=4,
                                  max_new_tokens=12))
    rows = [r for r in _responses(tmp_path) if r["kind"] == "loglikelihood"]
    base = {r["key"]: r["response"][0] for r in rows if r["cond"] == "0"}
    masked = {r["key"]: r["response"][0] for r in rows if r["cond"] != "0"}
    assert min(abs(base[k] - masked[k]) for k in base) > 1e-4
    res = {(r["task"], r["metric"], r["cond"]) for r in summary.results}
    assert ("melayer_mmlu", "acc", "0") in res and ("melayer_mmlu", "acc", "0.01/correct/after_me") in res


def _by_doc(samples: dict) -> dict:
    """(condition, task, doc_id) -> the model's answers, numbers rounded (batches differ between shards)."""
    def rounded(x):
        if isinstance(x, (str, float)):
            try:
                return round(float(x), 4)  # lm-eval's samples hold log-likelihoods as strings
            except ValueError:
                return x
        return [rounded(v) for v in x] if isinstance(x, (list, tuple)) else x

    return {(c, t, s["doc_id"]): rounded(s["resps"]) for (c, t), rows in samples.items() for s in rows}


def test_shards_in_two_processes_merge_into_the_unsharded_sweep(sweep, tiny, data_dir, tmp_path):
    import dataclasses
    import shutil

    from melayer.evaluate import merge_shards
    from melayer.evaluate.shards import parse_shard

    out, whole = sweep
    cfg = _cfg(tiny, out, data_dir)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(
        dataclasses.replace(cfg, out=str(folder), shard_index=i, num_shards=2)))], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i, folder in enumerate(shards)]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    parts = [set(_by_doc(load_folder(folder)[1])) for folder in shards]
    assert parts[0] and parts[1] and not parts[0] & parts[1]  # the shards split the documents
    assert "**Shard 1 of 2**" in (shards[1] / "report.md").read_text()
    merged = merge_shards([shards[1], shards[0]], tmp_path / "merged")
    expected = _by_doc(load_folder(out)[1])
    got = _by_doc(load_folder(tmp_path / "merged")[1])
    assert parts[0] | parts[1] == set(expected) == set(got)
    assert got == expected  # the same answers, document by document
    scores = {(r["task"], r["metric"], r["cond"]): r["value"] for r in merged.results}
    assert scores == pytest.approx({(r["task"], r["metric"], r["cond"]): r["value"] for r in whole.results},
                                   rel=1e-4)
    assert "Shard" not in (tmp_path / "merged" / "report.md").read_text()
    record = json.loads((tmp_path / "merged" / "provenance.json").read_text())
    assert [s["shard"] for s in record["shards"]] == ["0/2", "1/2"]
    # what is not one sweep is refused in one line
    with pytest.raises(MelayerError, match=r"needs shards 0/2 to 1/2, each once; got 0/2"):
        merge_shards([shards[0]], tmp_path / "m1")
    other = tmp_path / "other"
    shutil.copytree(shards[1], other)
    saved = json.loads((other / "eval_config.json").read_text())
    (other / "eval_config.json").write_text(json.dumps({**saved, "seed": 7}))
    with pytest.raises(MelayerError, match=r"is not a shard of .*seed: 1 vs 7"):
        merge_shards([shards[0], other], tmp_path / "m2")
    with pytest.raises(MelayerError, match="already holds responses.jsonl"):
        merge_shards(shards, tmp_path / "merged")
    # shards answered on another machine: their model path is gone here; the model is given, or nothing is written
    moved = [tmp_path / f"moved{i}" for i in range(2)]
    for src, dst in zip(shards, moved):
        shutil.copytree(src, dst)
        saved = json.loads((dst / "eval_config.json").read_text())
        (dst / "eval_config.json").write_text(json.dumps({**saved, "model": str(tmp_path / "gone")}))
    with pytest.raises(MelayerError, match="--merge needs the tokenizer of the model that answered"):
        merge_shards(moved, tmp_path / "m3")
    assert not (tmp_path / "m3").exists()
    again = merge_shards(moved, tmp_path / "m3", model=str(tiny))
    assert {(r["task"], r["metric"], r["cond"]): r["value"] for r in again.results} == scores
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "a/b", "1"):
        with pytest.raises(MelayerError, match="--shard must be I/N"):
            parse_shard(bad)
