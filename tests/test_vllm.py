"""The vLLM backend: WeMask inside vLLM's own model classes gives melayer's HF WeMask's greedy tokens, and
``melayer eval --engine vllm`` gives ``--engine hf``'s answers; the melayer-side checks before vLLM starts.

Tests marked ``vllm`` need vLLM: they run its side in a subprocess of this interpreter when vLLM is importable
here, else of the vLLM venv (``.venv-vllm``, built by ``make test``, or ``$MELAYER_VLLM_PYTHON``), and are skipped
when there is neither. The others run in the main suite (no vLLM needed).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import save_tiny
from melayer.errors import MelayerError
from melayer.masking import WeMaskConfig
from melayer.vllm_backend import KEY, check_architecture, engine_kwargs, wemask_entry

ROOT = Path(__file__).resolve().parents[1]


def _vllm_python():
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for candidate in (os.environ.get("MELAYER_VLLM_PYTHON"), ROOT / ".venv-vllm" / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


VLLM_PYTHON = _vllm_python()
needs_vllm = pytest.mark.skipif(VLLM_PYTHON is None, reason="vLLM is not importable here and there is no vLLM venv "
                                "(make test builds .venv-vllm; or set MELAYER_VLLM_PYTHON)")


def _run_vllm(args, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    """``VLLM_PYTHON args`` with this checkout's melayer first on the path."""
    env = {**os.environ, **env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([VLLM_PYTHON, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


# -- before vLLM starts (no vLLM needed) -------------------------------------------------------------------------

def test_entry_is_the_resolved_config_and_none_without_a_mask():
    cfg = WeMaskConfig(rate=0.05, layers=[12], me_layer=11)
    assert wemask_entry(cfg) == {"rate": 0.05, "layers": [12], "score": "activation", "gamma": 0.0,
                                 "mode": "correct", "me_layer": 11}
    assert wemask_entry(None) is None and wemask_entry(WeMaskConfig(rate=0.0)) is None
    with pytest.raises(MelayerError, match="resolved"):
        wemask_entry(WeMaskConfig(rate=0.05, layers="after_me"))
    with pytest.raises(MelayerError, match="activation"):
        wemask_entry(WeMaskConfig(rate=0.05, layers=[1], score="gamma"))


def test_engine_kwargs_keep_the_callers_arguments():
    entry = wemask_entry(WeMaskConfig(rate=0.05, layers=[3]))
    user = {"model": "m", "tensor_parallel_size": 4, "data_parallel_size": 2, "pipeline_parallel_size": 2,
            "additional_config": {"other": 1, KEY: {"stale": True}}}
    out = engine_kwargs(entry, user, on_gpu=True)
    assert out == {**user, "additional_config": {"other": 1, KEY: entry}}
    assert user["additional_config"] == {"other": 1, KEY: {"stale": True}}  # the caller's dict is not touched
    # no mask is said explicitly: it overrides a mask named in the model's config.json
    assert engine_kwargs(None, user, on_gpu=True)["additional_config"] == {"other": 1, KEY: {"rate": 0.0}}
    assert engine_kwargs(None, {"additional_config": {KEY: entry}}, on_gpu=False) == {
        "additional_config": {KEY: {"rate": 0.0}}}
    with pytest.raises(MelayerError, match="model_impl"):
        engine_kwargs(entry, {"model_impl": "transformers"}, on_gpu=False)


def test_paper_mode_gets_its_exact_settings_or_a_one_line_refusal():
    entry = wemask_entry(WeMaskConfig(rate=0.05, layers=[3], mode="paper"))
    cpu = engine_kwargs(entry, {}, on_gpu=False)
    assert cpu["enable_chunked_prefill"] is False and cpu["enable_prefix_caching"] is False
    assert "enforce_eager" not in cpu  # no CUDA graphs on a CPU
    assert engine_kwargs(entry, {}, on_gpu=True)["enforce_eager"] is True
    for wrong in ({"enable_prefix_caching": True}, {"enable_chunked_prefill": True}):
        with pytest.raises(MelayerError, match="paper mode is exact"):
            engine_kwargs(entry, wrong, on_gpu=False)
    with pytest.raises(MelayerError, match="enforce_eager"):
        engine_kwargs(entry, {"enforce_eager": False}, on_gpu=True)
    correct = wemask_entry(WeMaskConfig(rate=0.05, layers=[3]))
    assert engine_kwargs(correct, {"enable_prefix_caching": True}, on_gpu=True) == {
        "enable_prefix_caching": True, "additional_config": {KEY: correct}}


def test_architecture_check(tmp_path):
    save_tiny(tmp_path / "llama", "llama")
    assert check_architecture(tmp_path / "llama") == "LlamaForCausalLM"
    save_tiny(tmp_path / "olmo2", "olmo2")
    with pytest.raises(MelayerError, match="Olmo2ForCausalLM: use --engine hf"):
        check_architecture(tmp_path / "olmo2")


def _vllm_config(additional=None, hf=None):
    return SimpleNamespace(additional_config=additional if additional is not None else {},
                           model_config=SimpleNamespace(hf_config=SimpleNamespace(**({KEY: hf} if hf else {}))))


def test_the_worker_reads_additional_config_else_the_model_config():
    from melayer.vllm_backend.models import mask_config

    entry = {"rate": 0.05, "layers": [12], "mode": "correct", "gamma": 0.0}
    assert mask_config(_vllm_config()) is None
    assert mask_config(_vllm_config({KEY: entry}, hf={"rate": 0.5, "layers": [1]})).rate == 0.05
    vc = _vllm_config(hf={"rate": 0.1, "layers": "after_me", "me_layer": 11})  # config.json / hf_overrides
    assert mask_config(vc) == WeMaskConfig(rate=0.1, layers="after_me", me_layer=11)
    assert vc.additional_config[KEY]["rate"] == 0.1  # copied where vLLM's compile-cache key sees it
    with pytest.raises(MelayerError, match="unknown keys"):
        mask_config(_vllm_config({KEY: {**entry, "k": 3}}))
    # melayer's unmasked engine on a checkpoint trained with WeMask: its explicit rate 0 wins over config.json
    trained = {"rate": 0.05, "layers": [12], "me_layer": 11}
    assert mask_config(_vllm_config(engine_kwargs(None, {}, on_gpu=False)["additional_config"], hf=trained)) is None
    assert mask_config(_vllm_config({}, hf=trained)).rate == 0.05  # without it, config.json's mask would apply


def test_correct_hook_masks_the_first_token_rows_of_a_flattened_batch():
    from melayer.vllm_backend.models import _hook

    torch.manual_seed(0)
    x = torch.randn(7, 16)  # three requests flattened: a prefill [0, 1, 2], a decode step at 5, a prefill [0, 1, 2]
    positions = torch.tensor([0, 1, 2, 5, 0, 1, 2])
    args, kwargs = _hook(3, 0.0, paper=False)(None, (), {"positions": positions, "hidden_states": x})
    y = kwargs["hidden_states"]
    for row in range(7):
        expected = x[row].clone()
        if positions[row] == 0:
            expected[x[row].abs().topk(3).indices] = 0
        assert torch.equal(y[row], expected)
    assert not torch.equal(x, y)  # out of place: the caller's tensor (vLLM's residual input) is untouched


def test_plugin_registers_lazy_subclasses_and_leaves_other_plugins_alone(monkeypatch):
    from melayer.vllm_backend import plugin

    class Registry:  # vLLM's ModelRegistry, as far as the plugin uses it
        models = {"LlamaForCausalLM": SimpleNamespace(module_name="vllm.model_executor.models.llama"),
                  "Qwen2ForCausalLM": SimpleNamespace(module_name="someone_elses_plugin.models")}

        def register_model(self, arch, target):
            self.models[arch] = SimpleNamespace(module_name=target.split(":")[0], target=target)

    registry = Registry()
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(ModelRegistry=registry))
    plugin.register()
    plugin.register()  # vLLM may load plugins more than once
    assert registry.models["LlamaForCausalLM"].target == "melayer.vllm_backend.models:WeMaskLlamaForCausalLM"
    assert plugin.owner(registry, "LlamaForCausalLM") == plugin.MODELS_MODULE
    assert registry.models["Qwen2ForCausalLM"].module_name == "someone_elses_plugin.models"  # not ours to replace
    assert set(registry.models) == {"LlamaForCausalLM", "Qwen2ForCausalLM"}  # nothing vLLM lacks is added


def test_plugin_imports_nothing_heavy():
    code = ("import sys; import melayer.vllm_backend.plugin; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('vllm', 'lm_eval', 'transformers') "
            "or m == 'melayer.vllm_backend.models'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_engine_vllm_without_vllm_is_a_one_line_error():
    from melayer.evaluate import EvalConfig

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(MelayerError, match="needs vLLM"):
        EvalConfig(engine="vllm").validate()


def test_answers_of_vllm_and_hf_are_never_mixed_in_one_out_dir(tmp_path):
    from melayer.evaluate.runner import CONFIG_NAME, EvalConfig, check_resumable

    (tmp_path / CONFIG_NAME).write_text(json.dumps({**EvalConfig().__dict__, "engine": "vllm"}))
    (tmp_path / "responses.jsonl").write_text("")
    with pytest.raises(MelayerError, match="engine: 'vllm' -> 'auto'"):
        check_resumable(EvalConfig(), tmp_path)
    check_resumable(EvalConfig(engine="vllm"), tmp_path)


# -- vLLM against melayer's HF WeMask (the real default model, fp32 on CPU) ---------------------------------------

N_PROMPTS, NEW_TOKENS = 6, 24


def _gsm8k_prompts(tokenizer, data_dir: Path, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for r in rows]


def _hf_greedy(model, tokenizer, prompts, config) -> list[list[int]]:
    """melayer's HF WeMask on one left-padded batch with melayer's compact engine, as melayer eval runs it (both
    masks equal the prompts' unbatched runs: tests/test_wemask.py); each row up to and with its EOS."""
    from melayer.generation import GenerationConfig, generate_batch
    from melayer.masking import wemask
    from melayer.text import eos_ids, left_pad, pad_id

    eos = eos_ids(tokenizer, model)
    ids, mask = left_pad(prompts, pad_id(tokenizer))
    with wemask(model, config or WeMaskConfig(), per_sequence=True), torch.no_grad():
        new = generate_batch(model, ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS, engine="compact"), eos,
                             pad_id(tokenizer))
    rows = []
    for row in new.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


@pytest.mark.vllm
@pytest.mark.real
@needs_vllm
def test_vllm_wemask_gives_hf_wemask_greedy_tokens(smollm2, data_dir, tmp_path):
    from melayer.load import local_location

    model, tok = smollm2
    prompts = _gsm8k_prompts(tok, data_dir, N_PROMPTS)
    masked = WeMaskConfig(rate=0.05, me_layer=11).resolved(model)  # block 12 (the eval test below scans)
    cases = {"rate 0": None, "rate 0.05": masked, "rate 0.05 (model config)": masked,
             "rate 0.05 paper": WeMaskConfig(**{**masked.__dict__, "mode": "paper"}),
             "rate 0 (config.json says 0.05)": None}  # a WeMask-trained checkpoint evaluated unmasked
    # In-process engines (no engine-core and worker processes: ~4 s to start instead of ~30 s on a CPU); the
    # spawned processes, where the plugin must load by itself, are what the eval test below runs.
    job = {"model": local_location("default")[1], "prompts": prompts, "max_tokens": NEW_TOKENS,
           "engine": {"dtype": "float32", "enforce_eager": True, "seed": 0, "max_model_len": 2048,
                      "gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 1 << 30,
                      "distributed_executor_backend": "uni"},
           "cases": [{"name": n, "wemask": c.__dict__ if c else None,
                      "route": "hf_overrides" if "model config" in n else None,
                      "model_config_mask": masked.__dict__ if "config.json" in n else None}
                     for n, c in cases.items()]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    _run_vllm([str(ROOT / "tests" / "vllm_generate.py"), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
              VLLM_ENABLE_V1_MULTIPROCESSING="0")
    got = json.loads((tmp_path / "out.json").read_text())
    for name, config in cases.items():
        hf = _hf_greedy(model, tok, prompts, config)
        assert got[name]["ids"] == hf, name
        [worker] = got[name]["workers"]
        assert worker["model_class"] == "melayer.vllm_backend.models.WeMaskLlamaForCausalLM"  # the plugin's
        assert worker["mask"] == (None if config is None else {"rate": 0.05, "k": 28, "layers": masked.layers,
                                                               "mode": config.mode, "gamma": 0.0})
    differ = [a != b for a, b in zip(got["rate 0.05"]["ids"], got["rate 0"]["ids"])]
    assert sum(differ) >= 2, differ  # the mask changes the tokens, so the equality above can fail


@pytest.mark.vllm
@pytest.mark.real
@needs_vllm
def test_melayer_eval_engine_vllm_gives_engine_hf_answers(data_dir, tmp_path):
    from melayer.evaluate import EvalConfig, run_eval

    common = ["--tasks", "melayer_gsm8k", "--limit", "2", "--wemask-rates", "0,0.05", "--max-new-tokens", "32",
              "--data-dir", str(data_dir)]
    _run_vllm(["-m", "melayer.cli", "eval", "default", "--engine", "vllm", *common, "--out", str(tmp_path / "vllm")])
    run_eval(EvalConfig(model="default", tasks=["melayer_gsm8k"], limit=2, wemask_rates=[0.0, 0.05],
                        max_new_tokens=32, data_dir=str(data_dir), out=str(tmp_path / "hf"), engine="hf"))

    def answers(folder):
        rows = (tmp_path / folder / "responses.jsonl").read_text().splitlines()
        return {(r["cond"], r["key"]): r["response"] for r in map(json.loads, rows)}

    vllm, hf = answers("vllm"), answers("hf")
    assert len(vllm) == 4 and vllm == hf
    assert {c for c, _ in vllm} == {"0", "0.05/correct/after_me"}
    record = json.loads((tmp_path / "vllm" / "provenance.json").read_text())
    assert record["engine"]["engine"] == "vllm" and record["versions"]["vllm"]
    assert (tmp_path / "vllm" / "report.md").is_file()


@pytest.mark.vllm
@pytest.mark.real
@needs_vllm
def test_grpo_vllm_rollouts_are_masked_like_the_policy(data_dir, tmp_path):
    """``--rollouts vllm``: TRL's colocated engine samples, the hooked policy rescores every sampled token, and TRL
    logs how far the two log-probs differ. With the mask in the engine (through the rollout folder's config.json)
    the gap is the one an unmasked baseline shows (the engine's bf16 against the policy's fp32); an engine left
    unmasked under a masked policy shows a gap several times larger, so the check can fail."""
    runs = {}
    for name, args in {"masked": ["0.05"], "baseline": ["0"], "engine unmasked": ["0.05", "--unmasked-engine"]}.items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        _run_vllm([str(ROOT / "tests" / "vllm_grpo.py"), str(data_dir), str(out), *args], timeout=1200,
                  VLLM_ENABLE_V1_MULTIPROCESSING="0")
        runs[name] = json.loads((out / "result.json").read_text())
    masked = runs["masked"]
    assert masked["engine_class"] == "melayer.vllm_backend.models.WeMaskLlamaForCausalLM"
    assert masked["engine_mask"] == {"rate": 0.05, "k": 28, "layers": [12], "mode": "correct", "gamma": 0.0}
    assert masked["rollout_config_mask"] == masked["policy_mask"] and masked["hf_fired"] > 0
    assert runs["baseline"]["engine_mask"] is None and runs["baseline"]["rollout_config_mask"] is None
    assert runs["engine unmasked"]["engine_mask"] is None and runs["engine unmasked"]["hf_fired"] > 0

    def gap(run):
        steps = run["steps"]
        assert len(steps) == 2  # both steps generated: the second after TRL pushed the updated weights
        return sum(s["sampling/sampling_logp_difference/mean"] for s in steps) / len(steps)

    assert gap(masked) < 2 * gap(runs["baseline"]), (gap(masked), gap(runs["baseline"]))
    assert gap(runs["engine unmasked"]) > 4 * gap(masked), (gap(runs["engine unmasked"]), gap(masked))
