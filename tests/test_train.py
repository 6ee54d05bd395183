"""`melayer train`: WeMask in every training forward (gradient checkpointing included) and GRPO rollout,
checkpoints that reload with their mask, exact LoRA resume, and SFT that learns on the real model."""
from __future__ import annotations

import dataclasses
import json

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
from melayer.evaluate.tasks import GSM8K  # noqa: E402
from melayer.training.data import (correctness_reward, format_reward, grpo_rows, has_answer_format,  # noqa: E402
                                   sft_rows)
from melayer.masking import WeMaskConfig, active_wemasks, apply_wemask  # noqa: E402

RATE = 0.1  # tiny hidden 64 -> k = 6 masked dims
TINY_ME_LAYER = 1  # tiny models have no real ME layer: name one, so WeMask masks block 2
TINY_TARGET = TINY_ME_LAYER + 1


# -- data and rewards ------------------------------------------------------------------------------

def test_gsm8k_rows_prompts_and_targets(data_dir):
    rows = load_gsm8k(data_dir, "train")
    assert len(rows) == 7473  # MANIFEST.md
    row = sft_rows(rows[:1])[0]
    assert row["prompt"][0]["content"] == GSM8K().prompt(rows[0])  # trained on what `melayer eval` asks
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
    texts = ("so \\boxed{18}", "x\n#### 17", "18 apples", "1,8 or \\boxed{18.0}")
    completions = [[{"role": "assistant", "content": c}] for c in texts]
    gold = ["18"] * len(texts)
    assert correctness_reward(None, completions, gold) == [1.0, 0.0, 1.0, 1.0]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 1.0]


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
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
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
