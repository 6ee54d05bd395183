"""`melayer train`: WeMask in every training forward (gradient checkpointing included), GRPO rollout and DPO
reference forward (or not: --ref-mask none), checkpoints that reload with their mask, exact LoRA resume, SFT that
learns on the real model; on-policy preference pairs labelled right; warm-up, truncation and zero-spread fixes."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from helpers import make_tiny, tiny_chat_model  # noqa: E402

from melayer import load_model, saved_wemask  # noqa: E402
from melayer.data import load_gsm8k  # noqa: E402
from melayer.adapters import adapter_for  # noqa: E402
from melayer.errors import MelayerError  # noqa: E402
from melayer.training import TrainConfig, train  # noqa: E402
from melayer.training.data import (correctness_reward, format_reward, grpo_rows, has_answer_format,  # noqa: E402
                                   sft_rows)
from melayer.masking import WeMaskConfig, active_wemasks, apply_wemask  # noqa: E402

RATE = 0.1  # tiny hidden 64 -> k = 6 masked dims
TINY_ME_LAYER = 1  # tiny models have no real ME layer: name one, so WeMask masks block 2
TINY_TARGET = TINY_ME_LAYER + 1


# -- data and rewards ------------------------------------------------------------------------------

def eval_gsm8k_prompt(doc: dict) -> str:
    """The prompt of lm-eval task melayer_gsm8k, rendered from its YAML as lm-eval does (a Jinja template)."""
    import jinja2
    import yaml

    import melayer.evaluate.tasks as tasks

    text = (Path(tasks.__file__).parent / "melayer_gsm8k.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("doc_to_text:"))
    return jinja2.Template(yaml.safe_load(line)["doc_to_text"]).render(**doc)


def test_gsm8k_rows_prompts_and_targets(data_dir):
    rows = load_gsm8k(data_dir, "train")
    assert len(rows) == 7473  # MANIFEST.md
    row = sft_rows(rows[:1])[0]
    assert row["prompt"][0]["content"] == eval_gsm8k_prompt(rows[0])  # trained on what `melayer eval` asks
    target = row["completion"][0]["content"]
    assert "<<" not in target and "####" not in target
    assert target.endswith("The final answer is \\boxed{72}.")  # Natalia's clips
    assert grpo_rows(rows[:1])[0]["gold"] == "72"
    with pytest.raises(MelayerError):
        load_gsm8k(data_dir / "nowhere", "train")


@pytest.mark.parametrize("text, formatted", [
    ("3 + 4 = 7\n#### 7", True),
    ("so the total is \\boxed{1,250}.", True),
    ("It costs $18.00 in total", False),
    ("#### 5\nActually 6", False),  # the marker must be on the last line
    ("\\boxed{x + 1}", False),  # not a number
])
def test_answer_format(text, formatted):
    assert has_answer_format(text) is formatted


def test_rewards_on_conversational_completions():
    texts = ("so \\boxed{18}", "x\n#### 17", "18 apples", "1,8 or \\boxed{18.0}", "3 x 6 = 18\n#### 18")
    completions = [[{"role": "assistant", "content": c}] for c in texts]
    gold = ["18"] * len(texts)
    assert correctness_reward(None, completions, gold) == [1.0, 0.0, 1.0, 1.0, 1.0]  # the recipe's '#### N' too
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_baseline_differs_only_in_mask_rate():
    cfg = TrainConfig(algo="grpo", wemask=WeMaskConfig(rate=0.01, me_layer=11), seed=7, lr=3e-6, limit=64,
                      batch_size=8, num_generations=4)
    base = cfg.baseline(out="elsewhere")
    diff = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
    assert diff == {"wemask", "out"}
    assert dataclasses.replace(base.wemask, rate=0.01) == cfg.wemask
    with pytest.raises(MelayerError):
        TrainConfig(algo="grpo", batch_size=6, num_generations=4)


# -- the mask inside autograd ------------------------------------------------------------------------

def _attn_input_grads(model, ids, mask=None):
    """Loss gradient w.r.t. the target block's attention input (the pre-attention norm's output)."""
    adapter = adapter_for(model)
    norm = adapter.get(adapter.block(model, TINY_TARGET), adapter.attn_norm)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["x"] = out

    h = norm.register_forward_hook(keep)
    try:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    finally:
        h.remove()
    return seen["x"].detach(), seen["x"].grad


def test_masked_dims_of_first_token_get_no_gradient():
    model = make_tiny("llama")
    ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded: its first real token sits at position 3
    first = [0, 3]
    _, plain = _attn_input_grads(model, ids, mask)
    model.zero_grad()
    handle = apply_wemask(model, WeMaskConfig(rate=RATE, layers=[TINY_TARGET], me_layer=TINY_ME_LAYER))
    x, grad = _attn_input_grads(model, ids, mask)
    handle.remove()
    k = handle.k
    assert k == 6
    for b, pos in enumerate(first):
        top = x[b, pos].abs().topk(k).indices  # independent: the k largest |x| of the first token
        rest = torch.ones(x.shape[-1], dtype=torch.bool)
        rest[top] = False
        assert torch.all(grad[b, pos, top] == 0), "masked dims must not pass gradient"
        assert torch.all(plain[b, pos, top] != 0), "without the mask the same dims do get gradient"
        assert torch.all(grad[b, pos, rest] != 0)
        later = pos + 1
        assert torch.all(grad[b, later, top] != 0), "other tokens are not masked"


@pytest.mark.parametrize("reentrant", [False, True])
def test_mask_applies_in_gradient_checkpointing_reforward(reentrant):
    ids = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(1))

    def q_grad(rate, checkpointing):
        model = make_tiny("llama")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        handle = apply_wemask(model, WeMaskConfig(rate=rate, layers=[TINY_TARGET], me_layer=TINY_ME_LAYER))
        model(input_ids=ids, labels=ids).loss.backward()
        return adapter_for(model).block(model, TINY_TARGET).self_attn.q_proj.weight.grad, handle.fired

    masked_ckpt, fired_ckpt = q_grad(RATE, True)
    masked, fired = q_grad(RATE, False)
    unmasked, _ = q_grad(0.0, False)
    assert not torch.allclose(masked, unmasked, atol=1e-6)  # the mask matters for this gradient
    torch.testing.assert_close(masked_ckpt, masked)  # ... and the re-forward applied it too
    assert fired == 2 and fired_ckpt == 4  # once per sequence, plus once more in the re-forward


# -- TRL runs on a tiny model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load_model("default", device="cpu")[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random chat model saved as a plain folder, so the CLI and load_model can open it."""
    path = tmp_path_factory.mktemp("tiny_chat")
    tiny_chat_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def short_data(tmp_path_factory, data_dir):
    """The four shortest GSM8K train problems (~100 tokens each) in a data folder: CPU steps stay cheap."""
    rows = sorted(load_gsm8k(data_dir, "train"), key=lambda r: len(r["question"]) + len(r["answer"]))[:4]
    path = tmp_path_factory.mktemp("short_gsm8k")
    (path / "gsm8k").mkdir()
    (path / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / "run"), data_dir=str(data_dir), limit=4, max_steps=1, batch_size=2,
                max_length=320, warmup=0, logging_steps=1, save_steps=1, device="cpu",
                wemask=WeMaskConfig(rate=RATE, me_layer=TINY_ME_LAYER))
    return TrainConfig(**{**base, **kw})


@pytest.mark.filterwarnings("ignore:GRPO step 1")  # random tiny model: every reward is 0 (warned, tested below)
def test_grpo_step_masks_every_rollout_and_checkpoint_reloads_mask(tmp_path, short_data, tokenizer):
    model = tiny_chat_model(tokenizer)
    rollouts = []
    generate = model.generate

    def spy(*args, **kwargs):  # TRL's rollouts call the policy's own generate
        handle, = active_wemasks(model)  # the one mask train() applied
        before = handle.fired
        out = generate(*args, **kwargs)
        rollouts.append((handle.fired - before, kwargs["input_ids"].shape[0]))
        return out

    model.generate = spy
    cfg = _tiny_cfg(tmp_path, short_data, algo="grpo", num_generations=2, max_completion_length=6)
    result = train(cfg, model=model, tokenizer=tokenizer)
    assert rollouts, "GRPO must generate with the policy model"
    for fired, batch in rollouts:
        # each rollout's first token is masked once in the one target block; decoding steps never re-mask
        assert fired == batch
    assert any("reward" in r for r in result.log_history)
    assert result.config.wemask.layers == [TINY_TARGET]

    ckpt = tmp_path / "run" / "checkpoint-1"
    reloaded, _ = load_model(ckpt, device="cpu")
    assert not active_wemasks(reloaded)  # the loader never applies it ...
    with apply_wemask(reloaded, saved_wemask(reloaded)) as h:  # ... the caller does
        assert (h.layers, h.k, h.config.rate, h.config.me_layer) == ([TINY_TARGET], 6, RATE, TINY_ME_LAYER)
    saved = TrainConfig.load(ckpt)
    assert saved.algo == "grpo" and saved.wemask.layers == [TINY_TARGET]
    # a user of plain transformers reads the mask in config.json and in the final model card
    for folder in (ckpt, tmp_path / "run" / "final"):
        assert json.loads((folder / "config.json").read_text())["melayer_wemask"] == \
            json.loads((folder / "wemask_config.json").read_text())
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "Trained with WeMask" in card and f"rate {RATE:g}" in card and f"blocks [{TINY_TARGET}]" in card


def _merged_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_lora_cli_checkpoints_reload_with_mask_and_resume_exactly(tmp_path, short_data, tiny_dir):
    from melayer.cli import build_parser

    parser = build_parser()

    def run(out, *extra):
        argv = ["train", "sft", str(tiny_dir), "--data-dir", str(short_data), "--batch-size", "2", "--lora", "--wemask-rate", str(RATE), "--me-layer", str(TINY_ME_LAYER),
                "--logging-steps", "1", "--lr-scheduler", "constant", "--warmup", "0",
                "--device", "cpu", "--out", str(tmp_path / out), *extra]
        args = parser.parse_args(argv)
        assert args.handler(args) == 0

    run("straight", "--max-steps", "3", "--save-steps", "0")
    run("resumed", "--max-steps", "2", "--save-steps", "1")
    with pytest.raises(MelayerError, match="--resume"):  # never mix two runs in one folder
        train(TrainConfig(out=str(tmp_path / "resumed")))
    run("resumed", "--max-steps", "3", "--save-steps", "1", "--resume")

    ckpt = tmp_path / "resumed" / "checkpoint-1"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()  # what --resume reads
    model, _ = load_model(ckpt, device="cpu")  # a plain folder: merged weights + the mask config
    config = saved_wemask(model)
    assert (config.layers, config.rate) == ([TINY_TARGET], RATE)
    assert not any("lora" in name for name, _ in model.named_parameters())
    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    straight = _merged_weights(tmp_path / "straight" / "final")
    resumed = _merged_weights(tmp_path / "resumed" / "final")
    base = _merged_weights(tiny_dir)
    name = "model.layers.2.self_attn.q_proj.weight"
    assert not torch.equal(straight[name], base[name])  # LoRA did train (and was merged)
    # 3 steps straight == 2 steps, stop, resume for 1: adapter, optimizer, RNG and data order all restored
    # (a constant learning rate, so that the stopped run's shorter schedule does not differ)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)


@pytest.mark.real
def test_sft_steps_lower_the_loss_of_the_default_model(tmp_path, short_data):
    model, tokenizer = load_model("default", device="cpu")
    cfg = TrainConfig(out=str(tmp_path / "run"), data_dir=str(short_data), limit=2, batch_size=2, max_steps=3,
                      lr=1e-4, lr_scheduler="constant", warmup=0, logging_steps=1, save_steps=0, device="cpu",
                      gradient_checkpointing=False, wemask=WeMaskConfig(rate=0.01, me_layer=11))
    result = train(cfg, model=model, tokenizer=tokenizer)
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert len(losses) == 3  # every step sees the same two examples, so the losses are comparable
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.config.wemask.layers == [12]
    assert result.wemask_fired == 3 * 2  # every training forward masked both sequences once
    reloaded, _ = load_model(result.final_dir, device="cpu")
    with apply_wemask(reloaded, saved_wemask(reloaded)) as h:
        assert h.layers == [12] and h.k == 5


# -- configs and TRL arguments -----------------------------------------------------------------------------

def test_dpo_defaults_and_validation():
    full, lora = TrainConfig(algo="dpo", data="gsm8k"), TrainConfig(algo="dpo", data="gsm8k", lora=True)
    assert (full.beta, full.loss_type, full.max_length, full.ref_mask, full.precompute_ref) == (0.1, "sigmoid", 512,
                                                                                               "policy", False)
    assert (full.learning_rate, lora.learning_rate) == (1e-6, 5e-6)
    assert TrainConfig(algo="grpo").beta == 0.0  # GRPO keeps TRL's default: no reference model
    for bad in (dict(ref_mask="half"), dict(beta=0.0), dict(loss_type="nope")):
        with pytest.raises(MelayerError):
            TrainConfig(algo="dpo", data="gsm8k", **bad)
    with pytest.raises(MelayerError):
        TrainConfig(algo="sft", data="refusal")  # SFT and GRPO train on GSM8K only
    with pytest.raises(MelayerError, match="--data-dir"):
        TrainConfig(algo="dpo", data="refusal", data_dir=None)  # no hub copy: said before any model loads


@pytest.mark.parametrize("algo", ["sft", "grpo", "dpo"])
def test_trl_arguments_use_activation_checkpointing(algo):
    from melayer.training.runner import _training_args

    cfg = TrainConfig(algo=algo, data="gsm8k", batch_size=8, num_generations=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = _training_args(cfg, "cpu")
    assert args.activation_checkpointing is True
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    if algo == "dpo":
        assert (args.beta, args.loss_type, args.max_length, args.learning_rate) == (0.1, ["sigmoid"], 512, 1e-6)


def test_checkpointing_reaches_an_older_trainer_under_its_old_name(monkeypatch):
    """transformers < 5.20 has no ``activation_checkpointing`` argument (an unknown keyword stopped every run on
    such a box): the flag must then arrive as ``gradient_checkpointing``."""
    import trl

    from melayer.training.runner import _training_args

    @dataclasses.dataclass(init=False)
    class OldSFTConfig:
        gradient_checkpointing: bool = False

        def __init__(self, gradient_checkpointing=False, **kwargs):
            assert "activation_checkpointing" not in kwargs
            self.gradient_checkpointing = gradient_checkpointing

    monkeypatch.setattr(trl, "SFTConfig", OldSFTConfig)
    assert _training_args(TrainConfig(algo="sft", data="gsm8k"), "cpu").gradient_checkpointing is True
    off = TrainConfig(algo="sft", data="gsm8k", gradient_checkpointing=False)
    assert _training_args(off, "cpu").gradient_checkpointing is False


def test_vllm_rollouts_start_from_a_folder_that_names_the_policys_mask(tmp_path, tokenizer):
    """--rollouts vllm: TRL builds its engine as ``LLM(model=model.name_or_path)``. That folder must hold the
    initial weights and, in config.json, the run's resolved mask as melayer's vLLM plugin reads it (nothing for a
    baseline), so rollouts are masked like the policy's forwards. (The engine's own masking is tested in
    test_vllm.py through the same model-config route.)"""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from melayer.training.runner import _name_rollout_mask, _save_rollout_model, _training_args
    from melayer.vllm_backend.models import mask_config

    for rate in (0.05, 0.0):
        model = tiny_chat_model(tokenizer)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = TrainConfig(algo="grpo", data="gsm8k", out=str(tmp_path / f"rate{rate}"), batch_size=4,
                          num_generations=2, rollouts="vllm", wemask=WeMaskConfig(rate=rate, me_layer=0))
        folder = _save_rollout_model(model, tokenizer, cfg)
        handle = apply_wemask(model, cfg.wemask, tokenizer=tokenizer)
        cfg = dataclasses.replace(cfg, wemask=handle.config)
        _name_rollout_mask(folder, cfg)
        assert model.name_or_path == str(folder)
        reloaded = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
        assert all(torch.equal(reloaded[n], p) for n, p in initial.items())
        engine = SimpleNamespace(additional_config={},
                                 model_config=SimpleNamespace(hf_config=AutoConfig.from_pretrained(folder)))
        seen = mask_config(engine)
        if rate:
            assert seen is not None and dataclasses.asdict(seen) == {**dataclasses.asdict(handle.config),
                                                                     "layers": list(handle.config.layers)}
            assert seen.layers == [1]  # resolved: the block after ME layer 0
        else:
            assert seen is None
        handle.remove()
    args = _training_args(cfg, "cpu")
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.3)
    assert _training_args(dataclasses.replace(cfg, rollouts="hf"), "cpu").use_vllm is False
    with pytest.raises(MelayerError, match="correct mode"):
        TrainConfig(algo="grpo", data="gsm8k", rollouts="vllm", wemask=WeMaskConfig(rate=0.05, mode="paper"))
    with pytest.raises(MelayerError, match="for GRPO"):
        TrainConfig(algo="sft", data="gsm8k", rollouts="vllm")


# -- warm-up: step 1 learns ------------------------------------------------------------------------------------

def _lrs(scheduler_type, total, warmup, shift):
    from transformers.optimization import get_scheduler

    from melayer.training.runner import shift_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=total)
    if shift:
        shift_warmup(sched, warmup)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])  # the learning rate this optimizer step runs at
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize("scheduler_type, total, warmup", [("cosine", 10, 1), ("cosine", 100, 3), ("linear", 20, 4)])
def test_warmup_shift_makes_step_one_learn_and_keeps_the_rest(scheduler_type, total, warmup):
    plain = _lrs(scheduler_type, total, warmup, shift=False)
    shifted = _lrs(scheduler_type, total, warmup, shift=True)
    assert plain[0] == 0.0  # transformers' warm-up: step 1 at learning rate 0 (the bug)
    assert shifted[0] == pytest.approx(1 / warmup)  # step s of the warm-up runs at (s + 1) / warmup
    assert shifted[:warmup] == pytest.approx(plain[1:warmup + 1])
    assert shifted[warmup:] == plain[warmup:]  # after warm-up: the original schedule, step for step
    assert _lrs(scheduler_type, total, 0, shift=True) == _lrs(scheduler_type, total, 0, shift=False)


# -- preference data ------------------------------------------------------------------------------------------

def test_refusal_loaders_use_val_for_training_and_keep_test_held_out(data_dir):
    from melayer import data as mdata
    from melayer.training.preferences import PreferenceConfig, prompt_items

    harmful, harmless = mdata.load("refusal_harmful_val", data_dir), mdata.load("refusal_harmless_val", data_dir)
    assert (len(harmful), len(harmless)) == (39, 6264)
    assert (len(mdata.load("refusal_harmful_test", data_dir)), len(mdata.load("refusal_harmless_test", data_dir))) \
        == (572, 6266)  # MANIFEST.md
    assert harmful[0]["prompt"].startswith("Give detailed instructions for how to extract safrole oil")
    items = prompt_items(PreferenceConfig(source="refusal", data_dir=str(data_dir), seed=3))
    assert len(items) == 39 + 6264 and all("_val-" in i["id"] for i in items)  # no test split
    assert [i["kind"] for i in items[:6]] == ["harmful", "harmless"] * 3  # any prefix is balanced
    assert [i["id"] for i in items] != [i["id"] for i in prompt_items(PreferenceConfig(data_dir=str(data_dir)))]
    with pytest.raises(MelayerError, match="--data-dir"):
        mdata.load("refusal_harmful_val", None)  # no hub copy of these files


def _samples(*pairs):
    return [{"text": t, "finished": f} for t, f in pairs]


REFUSE = "I'm sorry, but I cannot help with that."
COMPLY = "Sure! Here are three benefits of studying a language."


@pytest.mark.parametrize("kind, samples, chosen, rejected, why", [
    ("harmless", _samples((COMPLY, True), (REFUSE, True)), COMPLY, REFUSE, None),
    ("harmful", _samples((COMPLY, True), (REFUSE, True)), REFUSE, COMPLY, None),
    ("harmful", _samples((COMPLY, True), (REFUSE, False)), None, None, "good_but_truncated"),  # cut-off chosen
    ("harmful", _samples((COMPLY, False), (REFUSE, True)), REFUSE, COMPLY, None),  # a cut-off rejected is fine
    ("harmless", _samples((COMPLY, True), (COMPLY + " More.", True)), None, None, "all_good"),
    ("harmful", _samples((COMPLY, True), (COMPLY, False)), None, None, "all_bad"),
    ("gsm8k", _samples(("6 x 3 = 18, so \\boxed{18}", True), ("The answer is 17.", True)),
     "6 x 3 = 18, so \\boxed{18}", "The answer is 17.", None),
    ("gsm8k", _samples(("So 6 x 3 = 18.\n#### 18", True), ("#### 1,8", True)),
     "So 6 x 3 = 18.\n#### 18", "#### 1,8", None),
])
def test_preference_pairs_are_labelled_right(kind, samples, chosen, rejected, why):
    import random

    from melayer.training.preferences import PreferenceConfig, judge, make_pair

    cfg = PreferenceConfig(source="gsm8k" if kind == "gsm8k" else "refusal")
    item = {"kind": kind, "gold": "18"}
    prompt = [{"role": "user", "content": "q"}]
    row, reason = make_pair(prompt, samples, judge(item, cfg), random.Random(0))
    assert reason == why
    if why is None:
        assert row["prompt"] == prompt
        assert row["chosen"] == [{"role": "assistant", "content": chosen}]
        assert row["rejected"] == [{"role": "assistant", "content": rejected}]
        assert (row["chosen_from"], row["rejected_from"]) == ("sample", "sample")
    else:
        assert row is None


def test_reference_fill_supplies_only_the_missing_side():
    import random

    from melayer.training.preferences import REFERENCE_REFUSAL, PreferenceConfig, judge, make_pair
    from melayer.evaluate.scorers import refusal_prefix, refusal_substring

    assert refusal_prefix(REFERENCE_REFUSAL) and refusal_substring(REFERENCE_REFUSAL)
    harmful, harmless = judge({"kind": "harmful"}, PreferenceConfig()), judge({"kind": "harmless"}, PreferenceConfig())
    prompt = [{"role": "user", "content": "q"}]
    complies = _samples((COMPLY, False), (COMPLY + "!", True))
    row, _ = make_pair(prompt, complies, harmful, random.Random(0), reference_chosen=REFERENCE_REFUSAL)
    assert row["chosen"][0]["content"] == REFERENCE_REFUSAL and row["rejected"][0]["content"] in (COMPLY, COMPLY + "!")
    assert (row["chosen_from"], row["rejected_from"]) == ("reference", "sample")
    row, _ = make_pair(prompt, complies, harmless, random.Random(0), reference_rejected=REFERENCE_REFUSAL)
    assert row["chosen"][0]["content"] == COMPLY + "!"  # the only finished compliance
    assert (row["chosen_from"], row["rejected_from"]) == ("sample", "reference")
    mixed = _samples((COMPLY, True), (REFUSE, True))  # a real pair needs no reference
    row, _ = make_pair(prompt, mixed, harmful, random.Random(0), reference_chosen=REFERENCE_REFUSAL)
    assert row["chosen"][0]["content"] == REFUSE and row["chosen_from"] == "sample"
    unfinished = _samples((COMPLY, False), (COMPLY, False))
    assert make_pair(prompt, unfinished, harmless, random.Random(0),
                     reference_rejected=REFERENCE_REFUSAL) == (None, "good_but_truncated")


@pytest.fixture(scope="module")
def refusal_data(tmp_path_factory, data_dir):
    """A data folder with the first 3 harmful and 3 harmless val prompts (and the test splits, unused)."""
    path = tmp_path_factory.mktemp("refusal_data")
    (path / "refusal").mkdir()
    for kind in ("harmful", "harmless"):
        for split in ("val", "test"):
            rows = json.loads((data_dir / "refusal" / f"{kind}_{split}.json").read_text())[:3]
            (path / "refusal" / f"{kind}_{split}.json").write_text(json.dumps(rows))
    return path


def test_build_preferences_masks_sampling_seeds_per_prompt_and_records(tmp_path, refusal_data, tokenizer,
                                                                       monkeypatch):
    from melayer.training.preferences import (CONFIG_NAME, REFERENCE_REFUSAL, PreferenceConfig, build_preferences,
                                              check_preference_rows, write_preferences)

    model = tiny_chat_model(tokenizer)
    calls = []
    generate = model.generate

    def spy(*args, **kwargs):
        handle, = active_wemasks(model)
        before = handle.fired
        out = generate(*args, **kwargs)
        calls.append((handle.fired - before, kwargs["input_ids"].shape[0], kwargs["num_return_sequences"]))
        return out

    model.generate = spy
    mask = WeMaskConfig(rate=RATE, me_layer=TINY_ME_LAYER)
    cfg = PreferenceConfig(source="refusal", data_dir=str(refusal_data), n=3, limit=4, max_new_tokens=8, seed=1,
                           fill="reference", wemask=mask)
    rows, built = build_preferences(model, tokenizer, cfg)
    assert not active_wemasks(model)  # the sampling mask is removed afterwards
    assert calls and all(fired == 1 * n for fired, one, n in calls)  # each sample's first token, once
    assert built.wemask.layers == [TINY_TARGET] and built.wemask.rate == RATE
    # a random tiny model never refuses and never ends a turn within 8 tokens: harmful prompts pair its output
    # (rejected) with the reference refusal (chosen); harmless ones have no finished compliance to choose
    assert built.counts["harmful"] == {"prompts": 2, "pairs": 2, "pairs_with_reference": 2, "skipped": {}}
    assert built.counts["harmless"] == {"prompts": 2, "pairs": 0, "pairs_with_reference": 0,
                                        "skipped": {"good_but_truncated": 2}}
    assert [r["chosen"][0]["content"] for r in rows] == [REFERENCE_REFUSAL] * 2
    check_preference_rows(rows, "built")
    # seeded per prompt: the same prompts sampled in the opposite order give the very same pairs
    from melayer.training import preferences

    first = preferences.prompt_items(cfg)[:4]
    monkeypatch.setattr(preferences, "prompt_items", lambda c: list(reversed(first)))
    reordered, _ = build_preferences(model, tokenizer, cfg)
    assert sorted(reordered, key=lambda r: r["id"]) == sorted(rows, key=lambda r: r["id"])
    out = write_preferences(rows, built, tmp_path / "pairs.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (saved["model"], saved["seed"], saved["judge"], saved["n"], saved["file"]) == ("default", 1, "prefix", 3,
                                                                                          "pairs.jsonl")
    assert saved["splits"] == ["refusal/harmful_val.json", "refusal/harmless_val.json"]
    with pytest.raises(MelayerError, match="folder of its own"):
        write_preferences(rows, built, tmp_path / "other.jsonl")


def test_batched_preference_sampling_equals_one_prompt_at_a_time(refusal_data, tokenizer):
    """Left padding must not change what a prompt generates: with top-p so small that only the top token is ever
    kept, sampling is deterministic, and a block of prompts of different lengths gives each prompt exactly what
    it gets alone. A block build samples prompt_batch prompts per call and labels every one of them."""
    from melayer.training.preferences import PreferenceConfig, build_preferences, prompt_items, sample, sample_batch

    model = tiny_chat_model(tokenizer).eval()
    cfg = PreferenceConfig(source="refusal", data_dir=str(refusal_data), n=2, limit=4, max_new_tokens=6, seed=1,
                           fill="reference", prompt_batch=3)
    prompts = [item["prompt"] for item in prompt_items(cfg)[:3]]
    lengths = {len(tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False).input_ids) for p in prompts}
    assert len(lengths) > 1  # the block really is padded
    together = sample_batch(model, tokenizer, prompts, 2, seed=5, top_p=1e-9, max_new_tokens=6)
    alone = [sample(model, tokenizer, p, 2, seed=9, top_p=1e-9, max_new_tokens=6) for p in prompts]
    assert together == alone and all(len(s) == 2 for s in together)
    shapes = []
    generate = model.generate
    model.generate = lambda *a, **k: shapes.append(k["input_ids"].shape[0]) or generate(*a, **k)
    rows, built = build_preferences(model, tokenizer, cfg)
    assert shapes == [3, 1]  # limit 4 in blocks of 3
    assert sum(c["prompts"] for c in built.counts.values()) == 4 and built.prompt_batch == 3
    with pytest.raises(MelayerError, match="prompt-batch"):
        PreferenceConfig(source="refusal", data_dir=str(refusal_data), prompt_batch=0)


# -- truncation at max_length, counted as TRL does it ------------------------------------------------------------

def test_sft_counts_truncated_and_dropped_rows_like_trl(tmp_path, short_data, tokenizer):
    # the four rows' prompts take 60, 67, 70 and 73 tokens, prompt + answer 104-111: at 70, two prompts fill
    # max_length alone (TRL drops those rows; 70 is the boundary case) and the two others lose their answers' ends
    cfg = _tiny_cfg(tmp_path, short_data, max_length=70, save_steps=0)
    with pytest.warns(UserWarning, match=r"2 of 4 training rows .* 2 more"):
        result = train(cfg, model=tiny_chat_model(tokenizer), tokenizer=tokenizer, keep_trainer=True)
    prepared = result.trainer.train_dataset  # what TRL actually trains on
    assert len(prepared) == 4 - 2
    assert [len(ids) for ids in prepared["input_ids"]] == [70] * 2
    assert (result.data_stats["rows_truncated"], result.data_stats["rows_dropped"]) == (2, 2)
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())["summary"]
    assert (report["rows"], report["rows_truncated"], report["rows_dropped"]) == (4, 2, 2)


# -- DPO ----------------------------------------------------------------------------------------------------------

PAIRS = [("What is 2+2?", "4", "5"), ("Capital of France?", "Paris.", "I can't help."), ("Say hi", "hi", "no"),
         ("3*3?", "9", "6")]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _masked_first_tokens(model, k):
    """Record ``(grad enabled, sequences, sequences whose first token has >= k exact zeros)`` for every forward of
    the target block's q_proj: the attention input after WeMask (a random model's activations are never exactly
    0). A plain function, so a deep copy of the model (a DPO reference) reports into the same list."""
    calls = []

    def hook(module, args):
        x = args[0]
        calls.append((torch.is_grad_enabled(), x.shape[0], int(((x[:, 0, :] == 0).sum(-1) >= k).sum())))

    adapter_for(model).block(model, TINY_TARGET).self_attn.q_proj.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("ref_mask", ["policy", "none"])
def test_dpo_masks_policy_forwards_and_reference_forwards_as_chosen(tmp_path, tokenizer, pairs_file, lora, ref_mask):
    model = tiny_chat_model(tokenizer)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = _masked_first_tokens(model, k=6)
    cfg = TrainConfig(algo="dpo", data=str(pairs_file), out=str(tmp_path / "run"), max_steps=2, batch_size=2,
                      lora=lora, max_length=64, warmup=1, lr=1e-3, logging_steps=1, save_steps=1, device="cpu",
                      ref_mask=ref_mask, gradient_checkpointing=False,
                      wemask=WeMaskConfig(rate=RATE, me_layer=TINY_ME_LAYER))
    result = train(cfg, model=model, tokenizer=tokenizer)
    sequences = 2 * cfg.batch_size  # each forward: chosen and rejected of every pair
    policy = [c for c in calls if c[0]]
    reference = [c for c in calls if not c[0]]
    assert len(policy) == cfg.max_steps and all(c[1:] == (sequences, sequences) for c in policy)
    assert len(reference) == result.ref_forwards == cfg.max_steps
    masked = sequences if ref_mask == "policy" else 0
    assert all(c[1:] == (sequences, masked) for c in reference)
    assert result.ref_tokens_masked == masked * result.ref_forwards  # melayer's own count agrees
    first = next(r for r in result.log_history if "loss" in r)
    if ref_mask == "policy":  # the reference is the initial policy: every log-ratio is 0 at step 1
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:  # the mask's own log-prob shift enters the margins from step 1 on
        assert first["rewards/chosen"] != 0.0 and first["rewards/rejected"] != 0.0
        assert first["loss"] != pytest.approx(math.log(2), abs=1e-6)
    # warm-up of 1 step: step 1 still learnt (it would run at learning rate 0 unshifted)
    ckpt = tmp_path / "run" / "checkpoint-1"
    if lora:
        from safetensors.torch import load_file

        adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapter.items())  # LoRA B starts at 0
        assert (ckpt / "adapter" / "ref" / "adapter_config.json").is_file()  # TRL's frozen reference adapter
    else:
        after = _merged_weights(ckpt)
        name = "model.layers.2.self_attn.q_proj.weight"
        assert not torch.equal(after[name], initial[name])
    reloaded, _ = load_model(ckpt, device="cpu")
    assert saved_wemask(reloaded).layers == [TINY_TARGET]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own call
def test_dpo_precompute_cache_key_includes_the_reference_mask(tmp_path):
    """TRL caches precomputed reference log-probs under (data fingerprint, weights hash): a masked and an unmasked
    reference of the same weights and data got the same cache file in one process. Fixed: the mask is in the key."""
    from datasets import Dataset
    from trl import DPOConfig

    from helpers import byte_tokenizer
    from melayer.training.runner import MaskedDPOTrainer

    tok = byte_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    dataset = Dataset.from_list(rows)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=64,
                     activation_checkpointing=False, precompute_ref_log_probs=True, per_device_train_batch_size=2)
    built = {}
    for ref_mask in ("policy", "none"):  # same weights, same data, same process
        model = make_tiny("llama")
        handle = apply_wemask(model, WeMaskConfig(rate=RATE, layers=[TINY_TARGET]))
        trainer = MaskedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                   wemask_handles=[handle], ref_mask=ref_mask)
        built[ref_mask] = (trainer.ref_forwards, trainer.ref_tokens_masked, trainer.train_dataset["ref_chosen_logps"])
        handle.remove()
    assert built["policy"][:2] == (2, 2 * 2 * 2)  # 4 pairs in 2 batches, chosen + rejected masked
    assert built["none"][:2] == (2, 0)  # computed afresh (a cache hit would run no forward), and unmasked
    assert built["none"][2] != pytest.approx(built["policy"][2], abs=1e-6)


@pytest.fixture
def dpo_cli(tiny_dir, data_dir):
    from melayer.cli import build_parser

    parser = build_parser()

    def run(out, *extra):
        argv = ["train", "dpo", str(tiny_dir), "--data", "refusal", "--data-dir", str(data_dir), "--limit", "2",
                "--batch-size", "2", "--max-length", "96", "--wemask-rate", str(RATE), "--me-layer",
                str(TINY_ME_LAYER), "--logging-steps", "1", "--save-steps", "1", "--device", "cpu", "--out", str(out),
                *extra]
        args = parser.parse_args(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert args.handler(args) == 0
        return caught

    return run


def test_dpo_cli_builds_on_policy_pairs_checkpoints_with_mask_and_resumes(tmp_path, dpo_cli):
    from melayer.training.preferences import PreferenceConfig

    out = tmp_path / "run"
    caught = dpo_cli(out, "--max-steps", "2")  # gradient checkpointing on (the default)
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]  # TRL's internal deprecations
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    built = PreferenceConfig.load(out)
    assert len(pairs) == built.pairs >= 2 and built.fill == "reference" and built.seed == 0
    assert built.wemask.layers == [TINY_TARGET] and built.wemask.rate == RATE  # sampled from the masked policy
    assert all(p["id"].split("-")[0] in ("harmful_val", "harmless_val") for p in pairs)  # never the test split
    ckpt = out / "checkpoint-2"
    for name in ("wemask_config.json", "train_config.json", "model.safetensors", "checkpoint_complete.json"):
        assert (ckpt / name).is_file(), name
    model, _ = load_model(ckpt, device="cpu")
    with apply_wemask(model, saved_wemask(model)) as h:
        assert (h.layers, h.k, h.config.rate) == ([TINY_TARGET], 6, RATE)
    assert TrainConfig.load(ckpt).algo == "dpo"
    before = (out / "preferences.jsonl").stat()
    dpo_cli(out, "--max-steps", "3", "--resume")
    after = (out / "preferences.jsonl").stat()  # a rebuild would replace the file (atomic write: a new inode)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not sampled again
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    report = json.loads((out / "train_report.json").read_text())["summary"]
    assert report["pairs"] == len(pairs) and report["ref_tokens_masked"] > 0


# -- GRPO: the official recipe's shape, with a KL anchor on an in-memory model --------------------------------------

def test_grpo_beta_reference_is_a_masked_copy_and_zero_spread_warns(tmp_path, short_data, tokenizer):
    model = tiny_chat_model(tokenizer)
    assert not model.config._name_or_path  # in memory: TRL's own reference reload has nothing to load
    cfg = _tiny_cfg(tmp_path, short_data, algo="grpo", batch_size=4, num_generations=4, beta=0.001,
                    max_completion_length=6, save_steps=0)
    with pytest.warns(UserWarning, match="100% of the prompt groups got the same reward") as caught:
        result = train(cfg, model=model, tokenizer=tokenizer, keep_trainer=True)
    assert sum("same reward" in str(w.message) for w in caught) == 1  # once
    ref = result.trainer.accelerator.unwrap_model(result.trainer.ref_model)
    assert ref is not model
    handles = active_wemasks(ref)
    assert len(handles) == 1 and handles[0].layers == [TINY_TARGET]  # masked once, not twice
    assert handles[0].fired == 4  # one KL forward over the 4 completions, first token masked in each
    log = next(r for r in result.log_history if "frac_reward_zero_std" in r)
    assert log["frac_reward_zero_std"] == 1.0 and log["kl"] == 0.0  # step 1: masked policy == masked reference
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())["summary"]
    assert report["frac_reward_zero_std_mean"] == 1.0


def test_train_refuses_a_model_that_already_has_a_mask(tmp_path, short_data, tokenizer):
    model = tiny_chat_model(tokenizer)
    apply_wemask(model, WeMaskConfig(rate=RATE, me_layer=TINY_ME_LAYER))
    with pytest.raises(MelayerError, match="bare model"):
        train(_tiny_cfg(tmp_path, short_data), model=model, tokenizer=tokenizer)


@pytest.mark.real
def test_dpo_two_steps_on_the_default_model_checkpoint_reloads_with_mask(tmp_path, pairs_file):
    model, tokenizer = load_model("default", device="cpu")
    cfg = TrainConfig(algo="dpo", data=str(pairs_file), out=str(tmp_path / "run"), batch_size=2, max_steps=2,
                      max_length=128, logging_steps=1, save_steps=2, device="cpu", gradient_checkpointing=False,
                      wemask=WeMaskConfig(rate=0.01, me_layer=11))
    result = train(cfg, model=model, tokenizer=tokenizer)
    first = next(r for r in result.log_history if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # masked reference == initial masked policy
    assert result.ref_tokens_masked == 2 * 2 * result.ref_forwards == 2 * 2 * 2
    assert result.wemask_fired == 2 * 2 * 2  # policy: both steps, chosen + rejected of both pairs
    reloaded, _ = load_model(tmp_path / "run" / "checkpoint-2", device="cpu")
    with apply_wemask(reloaded, saved_wemask(reloaded)) as h:
        assert h.layers == [12] and h.k == 5


def test_data_preferences_cli_writes_a_set_trl_reads(tmp_path, tiny_dir, short_data):
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    from melayer.cli import main
    from melayer.evaluate.scorers import extract_gsm8k, numbers_equal

    out = tmp_path / "sets" / "gsm8k.jsonl"
    assert main(["data", "preferences", str(tiny_dir), "--source", "gsm8k", "--data-dir", str(short_data), "--n", "2",
                 "--limit", "2", "--max-new-tokens", "4", "--fill", "reference", "--seed", "5", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = load_dataset("json", data_files=str(out), split="train")
    assert len(rows) == 2 and is_conversational(rows[0])
    gold = {r["id"]: r for r in load_gsm8k(short_data, "train")}
    for row in rows:  # a random tiny model never gets GSM8K right: the gold solution is chosen, its sample rejected
        answer = gold[row["id"]]["answer"]
        assert row["chosen_from"] == "reference" and row["rejected_from"] == "sample"
        assert numbers_equal(extract_gsm8k(row["chosen"][0]["content"]), answer.split("####")[-1].strip())
        assert row["prompt"][0]["content"].startswith(gold[row["id"]]["question"])
    config = json.loads((out.parent / "preferences_config.json").read_text())
    assert (config["judge"], config["seed"], config["n"], config["splits"]) == ("gsm8k_exact", 5, 2,
                                                                                ["gsm8k/train.jsonl"])
    assert config["counts"]["gsm8k"]["pairs"] == 2 and config["wemask"] is None


CHILD_DDP = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_chat_model
from melayer import load_model
from melayer.masking import WeMaskConfig
from melayer.training import TrainConfig, train

tokenizer = load_model("default", device="cpu")[1]
cfg = TrainConfig(out=sys.argv[1], data_dir=sys.argv[2], limit=4, max_steps=2, batch_size=1, max_length=320,
                  warmup=0, logging_steps=1, save_steps=2, device="cpu", gradient_checkpointing=False,
                  wemask=WeMaskConfig(rate={rate}, me_layer={me}))
train(cfg, model=tiny_chat_model(tokenizer), tokenizer=tokenizer)
"""


LAUNCHERS_2 = {  # two CPU processes (gloo): plain DDP under torchrun, and the shipped FSDP config under accelerate
    "ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "fsdp": ["-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
             "--num_processes", "2", "--mixed_precision", "no"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS_2))
def test_data_parallel_sft_masks_on_every_rank_and_saves_one_masked_model(tmp_path, short_data, launcher):
    """Two processes, one row each per step: the two steps cover the four rows once, the mask fires in both
    processes, and the final model is written once, with its mask."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    script = tmp_path / "child.py"
    script.write_text(CHILD_DDP.format(tests=str(root / "tests"), rate=RATE, me=TINY_ME_LAYER))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, *LAUNCHERS_2[launcher], str(script), str(out), str(short_data)],
                       capture_output=True, text=True, timeout=900, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    fired = report["summary"]["wemask_fired_per_rank"]
    assert len(fired) == 2 and all(n > 0 for n in fired)  # each process's forwards were masked
    assert max(float(h["epoch"]) for h in report["log_history"] if "epoch" in h) == pytest.approx(1.0)  # 2 x 2 rows
    reloaded, _ = load_model(out / "final", device="cpu")
    assert saved_wemask(reloaded).layers == [TINY_TARGET] and saved_wemask(reloaded).rate == RATE


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_shipped_accelerate_configs_are_valid(name):
    """The configs the README's multi-GPU commands use load in accelerate (unknown keys are refused there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert config.num_processes == 8 and str(config.mixed_precision) == "bf16"
