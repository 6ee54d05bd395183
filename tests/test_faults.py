"""Fault injection: bad inputs, corrupt files, kills at awkward moments. Each case asserts the exit code, one line on
stderr that names the problem, no traceback, nothing half-written and no row lost."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import save_tiny
from melayer.errors import MelayerError
from melayer.io import JsonlLog

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=600):
    """``melayer ARGS`` in a fresh process: (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "melayer.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def one_line_error(code, err, expect: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("melayer: error:")]
    assert code == 2, err
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err


# -- bad inputs: one line, exit 2, nothing written -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny(folder)
    return folder


def _bad_model(tmp_path, case):
    if case == "empty_gguf":
        (tmp_path / "m.gguf").write_bytes(b"")
        return tmp_path / "m.gguf", "is empty"
    if case == "text_gguf":
        (tmp_path / "m.gguf").write_text("this is a text file\n")
        return tmp_path / "m.gguf", "is not a GGUF file"
    if case == "truncated_gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
        return tmp_path / "m.gguf", "is truncated"
    if case == "truncated_default_gguf":
        from melayer.load import default_gguf_path

        data = default_gguf_path().read_bytes()
        (tmp_path / "m.gguf").write_bytes(data[: len(data) // 3])
        return tmp_path / "m.gguf", "cannot read GGUF"
    if case == "unknown_model_type":
        folder = tmp_path / "g"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
        return folder, "unsupported architecture 'gpt2'"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["empty_gguf", "text_gguf", "truncated_gguf", "truncated_default_gguf",
                                  "unknown_model_type"])
def test_bad_model_files_are_one_line_errors(tmp_path, case):
    model, expect = _bad_model(tmp_path, case)
    out = tmp_path / "out"
    code, _, err = cli("scan", model, "--out", out, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    one_line_error(code, err, expect)
    assert not (out / "report.json").exists()
    leftovers = list((tmp_path / "cache").rglob("*.safetensors")) if (tmp_path / "cache").exists() else []
    assert not leftovers  # nothing half-built in the cache


def _prompt_file(tmp_path, case):
    if case == "non_utf8":
        (tmp_path / "p.txt").write_bytes(b"caf\xe9 au lait\n")
        return tmp_path / "p.txt", "not UTF-8 text"
    if case == "text_not_string":
        (tmp_path / "p.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
        return tmp_path / "p.jsonl", "p.jsonl:2: 'text' must be a string"
    if case == "whitespace_prompt":
        (tmp_path / "p.jsonl").write_text('{"text": "fine"}\n{"text": "   "}\n')
        return tmp_path / "p.jsonl", "p.jsonl:2: empty prompt"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["non_utf8", "text_not_string", "whitespace_prompt"])
def test_bad_prompt_files_are_one_line_errors(tmp_path, tiny_dir, case):
    prompts, expect = _prompt_file(tmp_path, case)
    code, _, err = cli("scan", tiny_dir, "--prompts", prompts, "--out", tmp_path / "out")
    one_line_error(code, err, expect)
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("case", ["out_is_file", "out_not_writable", "batch_size_0", "empty_prompt", "k_is_0"])
def test_bad_arguments_fail_before_any_work(tmp_path, tiny_dir, case):
    if case == "out_is_file":
        (tmp_path / "f").write_text("x")
        code, _, err = cli("scan", tiny_dir, "--out", tmp_path / "f")
        one_line_error(code, err, "is a file, not a folder")
    elif case == "out_not_writable":
        if os.geteuid() == 0:  # root writes anywhere: use a path under a file instead
            (tmp_path / "f").write_text("x")
            code, _, err = cli("explain", tiny_dir, "--out", tmp_path / "f" / "sub")
            one_line_error(code, err, "--out")
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o500)
            code, _, err = cli("explain", tiny_dir, "--out", ro / "sub")
            one_line_error(code, err, "cannot be written")
    elif case == "batch_size_0":
        code, _, err = cli("scan", tiny_dir, "--batch-size", "0", "--out", tmp_path / "out")
        one_line_error(code, err, "--batch-size must be at least 1")
    elif case == "empty_prompt":
        code, _, err = cli("generate", tiny_dir, "--prompt", "")
        one_line_error(code, err, "a prompt is empty")
    else:  # k = floor(0.001 x 64) = 0: a warning, not silence
        code, out, err = cli("generate", tiny_dir, "--prompt", "w5 w6", "--wemask-rate", "0.001", "--me-layer", "1",
                             "--max-new-tokens", "2")
        assert code == 0 and "masks floor(0.001 x 64) = 0 dims" in err and "Traceback" not in err


def test_wemask_config_errors_name_the_file(tmp_path, tiny_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    (folder / "wemask_config.json").write_text(json.dumps({"rate": 3.0}))
    code, _, err = cli("generate", folder, "--prompt", "w5 w6")
    one_line_error(code, err, f"{folder / 'wemask_config.json'}: WeMask rate must be a number in [0, 1]")


def test_checkpoint_trained_with_a_mask_but_without_its_config_is_refused(tmp_path, tiny_dir):
    from melayer import load_model

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    (folder / "train_config.json").write_text(json.dumps({"wemask": {"rate": 0.01}}))
    with pytest.raises(MelayerError, match="trained with WeMask .* holds no wemask_config.json"):
        load_model(folder, device="cpu")


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "melayer.cli", "--debug", "scan", str(tmp_path / "m.gguf")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "MelayerError" in r.stderr


# -- the model cache heals itself --------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An isolated cache holding a copy of the default model's dequantised entry (built once per machine)."""
    from melayer import model_cache
    from melayer.load import KNOWN_GGUF_SHA256, default_gguf_path

    gguf = default_gguf_path()
    source = model_cache.gguf_to_cache(gguf, KNOWN_GGUF_SHA256[gguf.name])
    root = tmp_path / "melayer"  # what platformdirs gives with XDG_CACHE_HOME=tmp_path (for the CLI tests)
    shutil.copytree(source, root / "gguf" / source.name)
    monkeypatch.setattr(model_cache, "cache_root", lambda: root)
    return root / "gguf" / source.name, gguf


def test_cache_detects_truncation_and_same_size_corruption(cache):
    from melayer.model_cache import verify

    entry, _ = cache
    weights = entry / "model.safetensors"
    assert verify(entry) is None and verify(entry, deep=True) is None
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)  # zeroed bytes, same size, new mtime
    weights.write_bytes(bytes(data))
    assert "sha256 mismatch" in verify(entry)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    assert "bytes" in verify(entry) and "written" in verify(entry)
    (entry / "melayer_cache.json").unlink()
    assert verify(entry) == "no readable manifest"


def test_damaged_cache_is_rebuilt_with_a_notice_and_stale_builds_are_removed(cache, capsys):
    from melayer.model_cache import gguf_to_cache, verify

    entry, gguf = cache
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    stale = entry.parent / f".{entry.name[:12]}.killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert gguf_to_cache(gguf) == entry
    err = capsys.readouterr().err
    assert "is damaged (model.safetensors has 1000 bytes" in err and "rebuilding it" in err
    assert verify(entry, deep=True) is None and not stale.exists()


def test_cache_verify_command_reports_and_fixes(cache, tmp_path):
    entry, _ = cache
    (entry / "model.safetensors").write_bytes(b"broken")
    env = {"XDG_CACHE_HOME": str(tmp_path)}  # platformdirs: <XDG_CACHE_HOME>/melayer is the cache root
    code, out, err = cli("cache", "verify", env=env)
    assert code == 1 and "model.safetensors has 6 bytes" in out and "--fix" in err
    code, out, err = cli("cache", "verify", "--fix", env=env)
    assert code == 0 and not entry.exists()


CHILD_BUILD = """
import sys
from pathlib import Path
from melayer.model_cache import gguf_to_cache
print(gguf_to_cache(Path(sys.argv[1])), flush=True)
"""


def test_two_first_loads_at_once_both_succeed_and_a_killed_build_is_cleaned(tmp_path):
    from melayer.load import default_gguf_path

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    gguf = str(default_gguf_path())
    # killed while building: a temporary folder is left behind ...
    victim = subprocess.Popen([sys.executable, "-c", CHILD_BUILD, gguf], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    parent = tmp_path / "melayer" / "gguf"
    deadline = time.time() + 300
    while time.time() < deadline and not (parent.is_dir() and any(parent.glob(".*/*"))):
        time.sleep(0.2)  # killed once the temporary folder holds something
    victim.kill()
    victim.wait()
    assert any(p.is_dir() for p in parent.glob(".*")), "the build should have been cut off half-way"
    # ... and two loads at once: one builds (and removes the leftover), the other waits for the lock
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_BUILD, gguf], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert outs[0][0].strip() == outs[1][0].strip()
    assert not [p for p in parent.glob(".*") if p.is_dir()]


# -- the sample log never loses a complete row --------------------------------------------------------------------

def test_log_keeps_a_complete_last_row_without_newline(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert [r["a"] for r in JsonlLog(path)] == [1, 2]
    assert path.read_text().endswith('{"a": 2}\n')


def test_log_moves_a_torn_tail_aside_with_a_warning(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "outp')
    with pytest.warns(UserWarning, match="moved to samples.jsonl.torn-1"):
        log = JsonlLog(path)
    assert [r["a"] for r in log] == [1, 2]
    assert (tmp_path / "samples.jsonl.torn-1").read_text() == '{"a": 3, "outp'
    path.write_text(path.read_text() + "garbage")
    with pytest.warns(UserWarning, match="torn-2"):
        JsonlLog(path)


def test_log_names_file_and_line_of_corrupt_or_foreign_rows(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task": "t", "n": 1}\n{not json}\n{"task": "t"}\n')
    with pytest.raises(MelayerError, match=r"samples.jsonl:2: not a JSON record"):
        JsonlLog(path).read()
    path.write_text('{"task": "t", "n": 1}\n{"n": 2}\n')
    with pytest.raises(MelayerError, match=r"samples.jsonl:2: not a row of this log \(no task\)"):
        JsonlLog(path, required=("task",)).read()


CHILD_APPEND = """
import sys
from melayer.io import JsonlLog
log = JsonlLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    log.extend([{"i": i, "pad": "x" * 2000} for _ in range(1)])
"""


def test_rewriting_while_another_process_appends_loses_no_row(tmp_path):
    """--score-only rewrites the log (update) while another command appends to it: every row survives."""
    path = tmp_path / "samples.jsonl"
    JsonlLog(path).extend([{"i": -1, "pad": ""}])
    n = 400
    child = subprocess.Popen([sys.executable, "-c", CHILD_APPEND, str(path), str(n)])
    log = JsonlLog(path)
    rewrites = 0
    while child.poll() is None:
        log.update(lambda rows: [dict(r, scored=True) for r in rows])
        rewrites += 1
    assert child.returncode == 0 and rewrites > 1
    rows = JsonlLog(path).read()
    assert sorted(r["i"] for r in rows) == list(range(-1, n))


def test_sigkill_during_appends_loses_no_complete_row(tmp_path):
    import warnings

    for attempt in range(3):
        path = tmp_path / f"samples{attempt}.jsonl"
        child = subprocess.Popen([sys.executable, "-c", CHILD_APPEND, str(path), "100000"])
        while not path.exists() or path.stat().st_size < 200_000:  # writing is under way
            time.sleep(0.05)
        time.sleep(0.1 + 0.13 * attempt)
        child.send_signal(signal.SIGKILL)
        child.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn tail, if the kill hit a write, is moved aside
            rows = JsonlLog(path).read()
        assert rows and all(set(r) == {"i", "pad"} and len(r["pad"]) == 2000 for r in rows)
        assert [r["i"] for r in rows] == list(range(len(rows)))  # in order, none lost, none doubled
        assert path.read_bytes().endswith(b"\n")


# -- training checkpoints are whole or ignored --------------------------------------------------------------------

def test_resume_takes_the_newest_complete_checkpoint(tmp_path, capsys):
    from melayer.training.config import TrainConfig
    from melayer.training.runner import COMPLETE_MARK, _prepare_out

    out = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"x")
        if complete:
            (ckpt / COMPLETE_MARK).write_text(json.dumps({"global_step": step}))
    cfg = TrainConfig(out=str(out), resume=True)
    assert _prepare_out(cfg) == str(out / "checkpoint-4")
    assert "resuming from checkpoint-4 (checkpoint-6: incomplete" in capsys.readouterr().err
    with pytest.raises(MelayerError, match="already holds checkpoints"):
        _prepare_out(TrainConfig(out=str(out)))
    for step in (2, 4):
        (out / f"checkpoint-{step}" / COMPLETE_MARK).unlink()
    with pytest.raises(MelayerError, match="no complete checkpoint-N .*cut off while saving"):
        _prepare_out(cfg)


CHILD_TRAIN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from helpers import tiny_chat_model
    import transformers
    from melayer import load_model
    from melayer.masking import WeMaskConfig
    from melayer.training import TrainConfig, train

    tokenizer = load_model("default", device="cpu")[1]
    model = tiny_chat_model(tokenizer)
    save = transformers.PreTrainedModel.save_pretrained

    def dying_save(self, directory, *a, **k):  # the second checkpoint's weights are cut off half-way
        if str(directory).endswith("checkpoint-2"):
            os.makedirs(directory, exist_ok=True)
            open(os.path.join(directory, "model.safetensors"), "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, directory, *a, **k)

    transformers.PreTrainedModel.save_pretrained = dying_save
    cfg = TrainConfig(out=sys.argv[1], data_dir=sys.argv[2], limit=4, max_steps=3, batch_size=2, max_length=320,
                      warmup=0, logging_steps=1, save_steps=1, device="cpu", gradient_checkpointing=False,
                      wemask=WeMaskConfig(rate=0.1, me_layer=1))
    train(cfg, model=model, tokenizer=tokenizer)
""")


def test_kill_while_saving_a_checkpoint(tmp_path, data_dir):
    """SIGKILL in the middle of checkpoint-2's weights: checkpoint-2 is incomplete but carries its mask config,
    loading it fails in one line, and --resume continues from checkpoint-1."""
    from melayer import load_model
    from melayer.training.runner import _prepare_out
    from melayer.training.config import TrainConfig

    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]]
    rows = sorted(rows, key=lambda r: len(r["question"]) + len(r["answer"]))[:4]
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", CHILD_TRAIN.format(tests=str(ROOT / "tests")), str(out), str(data)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    cut = out / "checkpoint-2"
    assert (cut / "wemask_config.json").is_file() and (cut / "train_config.json").is_file()  # written first
    assert not (cut / "trainer_state.json").exists()
    with pytest.raises(MelayerError, match="cut off while saving"):
        load_model(cut, device="cpu")
    import dataclasses

    resumed = dataclasses.replace(TrainConfig.load(out / "train_config.json"), resume=True)
    assert _prepare_out(resumed) == str(out / "checkpoint-1")
