"""The eval runner on tiny random models: batched log-likelihoods and generation against unbatched ground truth,
a full sweep with its report, resume after a torn line and after SIGKILL, generate-only then score-only."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import byte_tokenizer, make_tiny
from melayer.errors import MelayerError
from melayer import stats
from melayer.evaluate.runner import (SAMPLES_NAME, EvalConfig, continuation_logliks,
                                     run_eval)
from melayer.generation import GenerationConfig, generate_from_ids, generate_texts
from melayer.text import encode_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama"), byte_tokenizer()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SAMPLES_NAME).read_text().splitlines() if line.strip()]


def test_batched_logliks_equal_unbatched_sums(tiny):
    model, tok = tiny
    contexts = [tok("Question: 2+2?\nAnswer:")["input_ids"], tok("Hi")["input_ids"]]
    conts = [[tok(c)["input_ids"] for c in (" A", " B")],  # one token each: one sequence per item
             [tok(c)["input_ids"] for c in (" four", " 4", " a longer answer")]]
    got = continuation_logliks(model, contexts, conts, pad=0)
    for ctx, cs, vals in zip(contexts, conts, got):
        for c, v in zip(cs, vals):
            ids = torch.tensor([ctx + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c))
            assert v == pytest.approx(ref, abs=1e-4)


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = ("Hello there", "A much longer prompt about ducks and eggs", "x")
    gen = GenerationConfig(max_new_tokens=6)
    batched = generate_texts(model, tok, prompts, gen, chat=True)
    assert batched == [generate_texts(model, tok, [p], gen, chat=True)[0] for p in prompts]
    assert batched == generate_from_ids(model, tok, [encode_prompt(tok, p, chat=True) for p in prompts], gen)


def _cfg(out, data_dir, **kw) -> EvalConfig:
    base = dict(model="tiny", tasks=["gsm8k", "mmlu", "xstest", "wikitext2"], wemask_rates=[0.0, 0.1],
                wemask_modes=["correct", "paper"], me_layer=1, limit=5, seed=1, data_dir=str(data_dir), out=str(out),
                batch_size=3, max_new_tokens=6, ppl_seq_len=32)
    base.update(kw)
    return EvalConfig(**base)


def test_sweep_writes_rows_and_report_then_resumes_a_torn_log(tiny, data_dir, tmp_path):
    model, tok = tiny
    cfg = _cfg(tmp_path / "a", data_dir)
    summary = run_eval(cfg, model, tok, progress_bar=False)
    rows = _rows(tmp_path / "a")
    keys = [(r["task"], r["item_id"], r["cond"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 5 * 3  # tasks x items x conditions (0, 0.1/correct, 0.1/paper)
    for task in ("gsm8k", "mmlu", "xstest", "wikitext2"):  # every condition saw the very same items
        ids = [{r["item_id"] for r in rows if r["task"] == task and r["cond"] == c} for c in ("0", "0.1/correct",
                                                                                             "0.1/paper")]
        assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 5
    assert all(r["metrics"] is not None and r["gold"] is not None for r in rows if r["task"] in ("gsm8k", "mmlu"))
    # the mask was applied: some log-likelihood moved at rate 0.1
    ll = {(r["item_id"], r["cond"]): r["output"] for r in rows if r["task"] == "mmlu"}
    assert any(ll[(i, "0.1/correct")] != ll[(i, "0")] for i, _ in ll)
    # summary: the accuracy of rate 0 is recomputable from the rows; paired tests against rate 0
    res = {(r["task"], r["metric"], r["cond"]): r for r in summary["results"]}
    acc0 = [r["score"] for r in rows if r["task"] == "mmlu" and r["cond"] == "0"]
    assert res[("mmlu", "acc", "0")]["value"] == pytest.approx(sum(acc0) / 5)
    assert res[("mmlu", "acc", "0.1/paper")]["mcnemar_p"] is not None
    # Holm over every comparison of the table: its raw p (McNemar, else bootstrap) adjusted, never below it
    compared = [r for r in summary["results"] if "diff" in r]
    raw = [r["mcnemar_p"] if r["mcnemar_p"] is not None else max(r["bootstrap_p"], 1 / stats.N_BOOT)
           for r in compared]
    assert [r["holm_p"] for r in compared] == pytest.approx(stats.holm(raw))
    assert all(r["holm_p"] >= p for r, p in zip(compared, raw)) and "holm_p" not in res[("mmlu", "acc", "0")]
    ppl = res[("wikitext2", "perplexity", "0")]
    assert ppl["ci"][0] <= ppl["value"] <= ppl["ci"][1] and ppl["value"] > 1
    xs = {k[1] for k in res if k[0] == "xstest"}
    assert xs <= {"refusal_safe", "refusal_unsafe"} and xs
    for name in ("report.json", "report.md", "summary.csv", "score_vs_rate.png", "eval_config.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert json.loads((tmp_path / "a" / "eval_config.json").read_text())["wemask_rates"] == [0.0, 0.1]

    # a run that died mid-batch: the first 17 rows survive plus half a line
    out_b = tmp_path / "b"
    out_b.mkdir()
    (out_b / "eval_config.json").write_text((tmp_path / "a" / "eval_config.json").read_text())
    lines = (tmp_path / "a" / SAMPLES_NAME).read_text().splitlines(keepends=True)
    (out_b / SAMPLES_NAME).write_text("".join(lines[:17]) + lines[17][: len(lines[17]) // 2])
    run_eval(_cfg(out_b, data_dir), model, tok, progress_bar=False)
    resumed = _rows(out_b)
    by_key = {(r["task"], r["item_id"], r["cond"]): r["output"] for r in resumed}
    assert len(resumed) == len(by_key) == len(rows)
    assert by_key == {(r["task"], r["item_id"], r["cond"]): r["output"] for r in rows}


def test_resume_refuses_other_settings(tiny, data_dir, tmp_path):
    model, tok = tiny
    run_eval(_cfg(tmp_path, data_dir, tasks=["xstest"], wemask_rates=[0.0], limit=2), model, tok, progress_bar=False)
    with pytest.raises(MelayerError, match="other settings"):
        run_eval(_cfg(tmp_path, data_dir, tasks=["xstest"], wemask_rates=[0.0], limit=2, max_new_tokens=7), model, tok,
                 progress_bar=False)


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from helpers import byte_tokenizer, make_tiny
from melayer.evaluate.runner import EvalConfig, run_eval
cfg = EvalConfig(**json.loads(sys.argv[1]))
run_eval(cfg, make_tiny("llama"), byte_tokenizer(), progress_bar=False)
heavy = ["math_verify", "lm_eval", "datasets", "pandas", "nltk", "langdetect"]  # scipy: transformers' own
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _child(cfg: EvalConfig) -> subprocess.Popen:
    import dataclasses

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests")),
                             json.dumps(dataclasses.asdict(cfg))], stdout=subprocess.PIPE, text=True, env=env)


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tiny, data_dir, tmp_path):
    model, tok = tiny
    cfg = _cfg(tmp_path / "killed", data_dir, tasks=["gsm8k"], wemask_rates=[0.0], limit=10, batch_size=1,
               max_new_tokens=24)
    proc = _child(cfg)
    log = tmp_path / "killed" / SAMPLES_NAME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the child finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= log.read_text().count("\n") < 10
    run_eval(cfg, model, tok, progress_bar=False)  # resume in this process
    clean = _cfg(tmp_path / "clean", data_dir, tasks=["gsm8k"], wemask_rates=[0.0], limit=10, batch_size=1,
                 max_new_tokens=24)
    run_eval(clean, model, tok, progress_bar=False)
    got = _rows(tmp_path / "killed")
    assert len(got) == 10 and len({r["item_id"] for r in got}) == 10
    assert {r["item_id"]: r["output"] for r in got} == {r["item_id"]: r["output"] for r in _rows(tmp_path / "clean")}


def test_generate_only_needs_no_scoring_libraries_then_score_only(tiny, data_dir, tmp_path):
    model, tok = tiny
    cfg = _cfg(tmp_path / "g", data_dir, tasks=["gsm8k", "xstest", "mmlu"], wemask_rates=[0.0], limit=3,
               generate_only=True)
    proc = _child(cfg)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert json.loads(stdout.strip().splitlines()[-1]) == []  # none of the heavy libraries was imported
    rows = _rows(tmp_path / "g")
    assert all(r["metrics"] is None for r in rows if r["task"] != "mmlu") and not (tmp_path / "g" / "report.json").exists()
    summary = run_eval(EvalConfig(out=str(tmp_path / "g"), score_only=True))
    scored = _rows(tmp_path / "g")
    assert len(scored) == len(rows) == 9 and all(r["metrics"] is not None for r in scored)
    assert [r["output"] for r in scored] == [r["output"] for r in rows]
    assert summary["config"].tasks == ["gsm8k", "xstest", "mmlu"] and summary["unscored_rows"] == 0
    # same scores as scoring during generation
    direct = run_eval(_cfg(tmp_path / "d", data_dir, tasks=["gsm8k", "xstest", "mmlu"], wemask_rates=[0.0], limit=3),
                      model, tok, progress_bar=False)
    assert [(r["metric"], r["value"]) for r in direct["results"]] == [(r["metric"], r["value"])
                                                                     for r in summary["results"]]


def test_score_only_covers_every_command_that_wrote_to_the_out_dir(tiny, data_dir, tmp_path):
    """One task per command into one out dir (the saved config is the last command's): the report still
    covers every task and WeMask condition in the log, each paired against rate 0."""
    model, tok = tiny
    out = tmp_path / "multi"
    run_eval(_cfg(out, data_dir, tasks=["mmlu"], wemask_rates=[0.0, 0.1], wemask_modes=["correct"], limit=4,
                  generate_only=True),
             model, tok, progress_bar=False)
    run_eval(_cfg(out, data_dir, tasks=["xstest"], wemask_rates=[0.0], limit=4, generate_only=True),
             model, tok, progress_bar=False)
    assert json.loads((out / "eval_config.json").read_text())["tasks"] == ["xstest"]
    summary = run_eval(EvalConfig(out=str(out), score_only=True))
    assert summary["config"].tasks == ["xstest", "mmlu"]
    got = {(r["task"], r["cond"]) for r in summary["results"]}
    assert got == {("xstest", "0"), ("mmlu", "0"), ("mmlu", "0.1/correct")}
    paired = [r for r in summary["results"] if r["cond"] == "0.1/correct"]
    assert paired and all(r["n_paired"] == 4 for r in paired)


@pytest.mark.real
def test_smollm2_sweep_end_to_end(smollm2, data_dir, tmp_path):
    """The real model through the runner: WeMask at the ME layer's successor (block 12) moves MMLU
    log-likelihoods at rate 0.01 (k = 5 of 576 dims), and every condition is summarised against rate 0."""
    model, tok = smollm2
    cfg = EvalConfig(model="default", tasks=["mmlu", "xstest"], wemask_rates=[0.0, 0.01], me_layer=11, limit=4,
                     seed=0, data_dir=str(data_dir), out=str(tmp_path), batch_size=4, max_new_tokens=12)
    summary = run_eval(cfg, model, tok, progress_bar=False)
    rows = _rows(tmp_path)
    assert len(rows) == (4 + 4) * 2
    ll = {(r["item_id"], r["cond"]): r["output"] for r in rows if r["task"] == "mmlu"}
    moved = [max(abs(a - b) for a, b in zip(ll[(i, "0.01/correct")], ll[(i, "0")])) for i, c in ll if c == "0"]
    assert min(moved) > 1e-3  # masking 5 dims of the sink token's attention input is visible in every item
    assert all(isinstance(r["output"], str) and r["output"] for r in rows if r["task"] == "xstest")
    res = {(r["task"], r["metric"], r["cond"]) for r in summary["results"]}
    assert ("mmlu", "acc", "0") in res and ("mmlu", "acc", "0.01/correct") in res
