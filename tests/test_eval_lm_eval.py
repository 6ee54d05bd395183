"""The lm-eval `melayer` model on a task with local data: its log-likelihoods equal our own computation, with
and without WeMask, through the Python API and through the command line (our wrapper and the bare `lm_eval`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import byte_tokenizer, make_tiny

QUESTIONS = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "The sky is", "choices": ["green", "blue"], "answer": 1},
    {"question": "Ducks lay", "choices": ["eggs", "bricks", "songs", "clouds"], "answer": 0},
]

TASK_YAML = """task: melayer_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model, tok = make_tiny("llama"), byte_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "tasks").mkdir()
    (root / "data.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=root / "data.jsonl"))
    return root, model, tok


def _ours(model, tok, rate: float) -> list[list[float]]:
    """Summed log-probability of each choice after its question, one full forward per (question, choice)."""
    import torch

    from melayer.masking import wemask

    def logliks():
        out = []
        for q in QUESTIONS:
            ctx = tok(f"{q['question']}\nAnswer:")["input_ids"]
            row = []
            for c in q["choices"]:
                cont = tok(" " + c)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
                row.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            out.append(row)
        return out

    if rate == 0:
        return logliks()
    with wemask(model, rate=rate, me_layer=1):
        return logliks()


def _harness(root, rate: float) -> list[list[float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import melayer.evaluate.harness  # noqa: F401  (registers "melayer")

    res = lm_eval.simple_evaluate(model="melayer", model_args={"pretrained": str(root / "model"),
                                                               "wemask_rate": rate, "wemask_me_layer": 1},
                                  tasks=["melayer_tiny_mc"], task_manager=TaskManager(include_path=str(root / "tasks")),
                                  log_samples=True, batch_size=2)
    samples = sorted(res["samples"]["melayer_tiny_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_melayer_model_matches_our_logliks_without_wemask(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, model, tok = setup
    got, ref = _harness(root, 0.0), _ours(model, tok, 0.0)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, abs=1e-4)


def test_loglikelihood_computes_logits_only_where_continuations_are_scored(setup):
    """Requests of mixed lengths in one right-padded batch, real 0s (the padding token) inside and at the end of
    inputs, one request whose input is another's plus a 0 (ambiguous once padded: that batch gets full logits):
    every log-likelihood and greedy flag equals a full forward's, and the output layer saw only the last
    positions of the other batch."""
    import torch

    from melayer.evaluate.harness import MelayerLM

    root, model, tok = setup
    lm = MelayerLM(pretrained=str(root / "model"), batch_size=4, wemask_rate=0.0)
    clear = [(("", ""), [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [60, 61]),
             (("", ""), [1, 40, 41], [0, 62, 0]),  # a real 0 inside the input
             (("", ""), [1, 40, 41, 42, 0], [63]),  # the input ends in a real 0
             (("", ""), [1, 45, 46, 47, 48, 49, 50, 51, 52, 53], [0])]
    ambiguous = [(("", ""), [1, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79], [64]),
                 (("", ""), [1, 80, 81], [65]), (("", ""), [1, 80, 81, 0], [66]), (("", ""), [1, 82], [67, 68])]
    head, seen = lm.model.get_output_embeddings(), []
    spy = head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    forward, calls = lm.model.forward, []
    lm.model.forward = lambda input_ids, **kw: calls.append(input_ids.shape[1]) or forward(input_ids, **kw)
    try:
        got = lm._loglikelihood_tokens(clear + ambiguous, disable_tqdm=True)
    finally:
        spy.remove()
        lm.model.forward = forward
    for (_, ctx, cont), (loglik, greedy) in zip(clear + ambiguous, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        ref = [logp[len(ctx) - 1 + j] for j in range(len(cont))]
        assert loglik == pytest.approx(sum(float(r[t]) for r, t in zip(ref, cont)), abs=1e-4)
        assert greedy == all(int(r.argmax()) == t for r, t in zip(ref, cont))
    # batches by length: the 4 longest inputs (15 tokens padded) get the last 3 positions (the longest
    # continuation); the other 4 hold [1, 80, 81] and [1, 80, 81, 0], alike once padded: full logits
    assert sorted(zip(calls, seen)) == [(5, 5), (15, 3)]


# The bare `lm_eval` script finds "melayer" only through the installed melayer-lm-eval.pth (see setup.py).
LAUNCHERS = {"wrapper": [sys.executable, "-m", "melayer.evaluate.harness"],
             "bare_lm_eval": [str(Path(sysconfig.get_path("scripts"), "lm_eval"))]}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_melayer_lm_eval_command_line_applies_wemask(setup, tmp_path, launcher):
    root, model, tok = setup
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*LAUNCHERS[launcher], "--model", "melayer", "--model_args",  # no --device: lm-eval's "cuda:0" falls back
           f"pretrained={root / 'model'},wemask_rate=0.1,wemask_me_layer=1",
           "--tasks", "melayer_tiny_mc", "--include_path", str(root / "tasks"), "--output_path", str(tmp_path),
           "--log_samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "melayer: WeMask rate 0.1 (correct mode): 6 dims of token 0 zeroed at the attention input of blocks [2]" \
        in done.stderr  # the user is told what the mask does
    results = list(tmp_path.rglob("results_*.json"))
    samples = list(tmp_path.rglob("samples_melayer_tiny_mc_*.jsonl"))
    assert len(results) == len(samples) == 1
    assert "melayer_tiny_mc" in json.loads(results[0].read_text())["results"]
    rows = sorted((json.loads(line) for line in samples[0].read_text().splitlines()), key=lambda r: r["doc_id"])
    got = [[float(r[0]) for r in row["filtered_resps"]] for row in rows]
    masked, plain = _ours(model, tok, 0.1), _ours(model, tok, 0.0)
    for g, r in zip(got, masked):
        assert g == pytest.approx(r, abs=1e-4)
    assert masked != plain  # so the match above proves WeMask reached the harness's forward passes


def test_pth_hook_imports_nothing_heavy_at_python_start():
    code = "import sys; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    loaded = set(done.stdout.split())
    assert "_melayer_lm_eval" in loaded, "melayer-lm-eval.pth is not installed: reinstall melayer (pip install -e .)"
    assert not loaded & {"torch", "transformers", "lm_eval", "melayer", "numpy"}
