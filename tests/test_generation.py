"""The static-cache and compact engines must give exactly the tokens of plain ``generate`` (greedy), hooks included.

Ground truth everywhere is ``model.generate`` (engine="hf"). On CPU the static engine runs its decode step
eagerly; on CUDA (run on the GPU machine) the step is a captured CUDA graph and the same checks apply.
"""
from __future__ import annotations

import pytest
import torch

from helpers import PAD, left_padded, make_tiny
from melayer.errors import MelayerError
from melayer.generation import GenerationConfig, generate_batch, resolve_engine, static_generate
from melayer.hooks import HookGroup, TokenContext
from melayer.adapters import adapter_for

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(model, ids, mask, engine, max_new=24, eos=(2,)):
    device = next(model.parameters()).device
    cfg = GenerationConfig(max_new_tokens=max_new, engine=engine)
    return generate_batch(model, ids.to(device), mask.to(device), cfg, list(eos), PAD).cpu()


def frequent_token(model, ids, mask):
    """A token that greedy decoding emits mid-way in some rows: used as EOS so rows stop at different steps."""
    out = run(model, ids, mask, "hf", max_new=12, eos=(PAD,))
    return int(out[:, 4:].flatten().mode().values)


def position_hook(model, block=1):
    """Halves the attention input of every token at an absolute position divisible by 3: decode-step output
    depends on the positions the hook sees, so a graph with frozen positions would change the tokens."""
    hooks = HookGroup()
    ctx = TokenContext(model, hooks)

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        scale = torch.where(ctx.chunk_pos % 3 == 0, 0.5, 1.0).to(x.dtype)[None, :, None]
        x = x * scale
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": x}
        return (x, *args[1:]), kwargs

    ad = adapter_for(model)
    hooks.pre(ad.attn_module(ad.block(model, block)), hook, with_kwargs=True)
    return hooks


@pytest.mark.parametrize("engine", ["static", "compact"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2", "phi3", "gemma2"])
def test_engine_equals_hf_left_padding_and_eos(family, device, engine):
    if engine == "static" and family == "gemma2":
        pytest.skip("sliding-window layers: the static engine refuses them (test_engine_resolution)")
    model = make_tiny(family).to(device)
    ids, mask = left_padded([9, 3, 6, 1], seed=1)
    eos = frequent_token(model, ids, mask)
    hf = run(model, ids, mask, "hf", eos=(eos,))
    out = run(model, ids, mask, engine, eos=(eos,))
    assert (hf == eos).any(), "the chosen EOS never appears: the EOS path is untested"
    assert out.shape == hf.shape
    assert torch.equal(out, hf)


def test_compact_drops_finished_rows_and_still_equals_generate():
    """Rows stop at different steps: the compact engine runs later steps on fewer rows (it must, or it saves
    nothing) and still returns generate's tokens, pads included."""
    from melayer.generation import compact_generate

    model = make_tiny("llama")
    ids, mask = left_padded([5, 7, 3], seed=1)
    ref = run(model, ids, mask, "hf", max_new=12, eos=(PAD,))
    eos = sorted({int(ref[0, 2]), int(ref[1, 8])})
    hf = run(model, ids, mask, "hf", max_new=40, eos=eos)
    widths = []
    ad = adapter_for(model)
    with HookGroup() as hooks:
        hooks.forward(ad.decoder(model), lambda m, a, out: widths.append(out.last_hidden_state.shape[0]))
        out = compact_generate(model, ids, mask, 40, eos, PAD)
    assert torch.equal(out, hf)
    assert widths[0] == 3 and min(widths) < 3, f"batch widths per step: {widths}"
    assert widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("device", DEVICES)
def test_static_stops_early_and_pads_after_eos(device):
    model = make_tiny("llama").to(device)
    ids, mask = left_padded([5, 7], seed=1)
    ref = run(model, ids, mask, "hf", max_new=12, eos=(PAD,))
    eos = sorted({int(ref[0, 3]), int(ref[1, 9])})  # every row ends by step 9, at different steps
    hf = run(model, ids, mask, "hf", max_new=64, eos=eos)
    out, info = static_generate(model, ids.to(device), mask.to(device), 64, eos, PAD, check_every=4)
    again, _ = static_generate(model, ids.to(device), mask.to(device), 64, eos, PAD)  # reuses the reset cache
    assert hf.shape[1] <= 10, "no early stop in the reference"
    assert torch.equal(out.cpu(), hf)
    assert torch.equal(again.cpu(), hf)
    assert info.steps < 63  # the loop itself stopped once every row was done
    assert info.cuda_graph == (device == "cuda")


@pytest.mark.parametrize("engine", ["static", "compact"])
@pytest.mark.parametrize("device", DEVICES)
def test_position_sensitive_hook_is_exact(device, engine):
    model = make_tiny("llama").to(device)
    ids, mask = left_padded([8, 2, 5], seed=1)
    plain = run(model, ids, mask, "hf", max_new=20)
    with position_hook(model):
        hf = run(model, ids, mask, "hf", max_new=20)
        out = run(model, ids, mask, engine, max_new=20)
    assert not torch.equal(hf, plain), "the hook has no effect: the test could not fail"
    assert torch.equal(out, hf)


def test_hooks_see_absolute_positions_during_static_decode():
    model = make_tiny("llama")
    ids, mask = left_padded([6, 3], seed=1)
    seen = []
    with HookGroup() as hooks:
        ctx = TokenContext(model, hooks)
        hooks.forward(adapter_for(model).decoder(model),
                      lambda *a: seen.append((ctx.chunk_pos.clone(), ctx.first.clone(), ctx.first_token().clone())))
        static_generate(model, ids, mask, 5, [PAD], PAD)
    assert torch.equal(seen[0][0], torch.arange(6))
    assert torch.equal(seen[0][1], torch.tensor([0, 3]))  # first real token under left padding
    assert seen[0][2].sum() == 2
    for step, (pos, first, sel) in enumerate(seen[1:]):
        assert pos.tolist() == [6 + step]
        assert torch.equal(first, torch.tensor([0, 3]))
        assert not sel.any()  # decode steps never hold the first token
    assert len(seen) == 5


@pytest.mark.parametrize("engine", ["static", "compact"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,per_sequence", [("correct", False), ("paper", False), ("paper", True)])
def test_wemask_engine_equals_hf(device, mode, per_sequence, engine):
    from melayer.masking import wemask

    if engine == "compact" and mode == "paper" and not per_sequence:
        pytest.skip("the literal index-0 hook masks a pad of the batch's shorter rows: its output depends on which "
                    "rows share the batch, which compaction changes by design (eval uses per_sequence)")
    model = make_tiny("qwen3").to(device)
    ids, mask = left_padded([7, 4, 10], seed=1)
    plain = run(model, ids, mask, "hf")
    with wemask(model, rate=0.2, me_layer=1, mode=mode, per_sequence=per_sequence) as handle:
        hf = run(model, ids, mask, "hf")
        fired_hf = handle.fired
        handle.reset()
        out = run(model, ids, mask, engine)
        fired = handle.fired
    assert not torch.equal(hf, plain), "WeMask has no effect here: the test could not fail"
    assert torch.equal(out, hf)
    if engine == "static":  # the compact engine stops decoding finished rows, so it masks fewer new tokens
        assert fired == fired_hf


def test_engine_resolution():
    llama = make_tiny("llama")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine(llama, GenerationConfig(), cpu) == "compact"
    assert resolve_engine(llama, GenerationConfig(do_sample=True), cpu) == "hf"
    assert resolve_engine(llama, GenerationConfig(), cuda) == "static"
    assert resolve_engine(llama, GenerationConfig(do_sample=True), cuda) == "hf"
    with pytest.raises(MelayerError, match="greedy"):
        resolve_engine(llama, GenerationConfig(engine="static", do_sample=True), cpu)
    with pytest.raises(MelayerError, match="unknown generation engine"):
        resolve_engine(llama, GenerationConfig(engine="vllm"), cpu)
    gemma2 = make_tiny("gemma2")  # sliding-window layers: only generate handles them
    assert resolve_engine(gemma2, GenerationConfig(), cuda) == "hf"
    with pytest.raises(MelayerError, match="sliding"):
        resolve_engine(gemma2, GenerationConfig(engine="static"), cpu)
    llama.generation_config.repetition_penalty = 1.3
    assert resolve_engine(llama, GenerationConfig(), cuda) == "hf"
    assert resolve_engine(llama, GenerationConfig(), cpu) == "hf"
    with pytest.raises(MelayerError, match="repetition_penalty"):
        resolve_engine(llama, GenerationConfig(engine="compact"), cpu)


def test_eager_attention_matches_generate():
    model = make_tiny("llama", attn_implementation="eager")
    ids, mask = left_padded([5, 9, 2], seed=1)
    assert torch.equal(run(model, ids, mask, "static"), run(model, ids, mask, "hf"))


@pytest.mark.real
def test_real_model_static_equals_hf(smollm2):
    model, tok = smollm2
    prompts = ["The capital of France is", "Write a haiku about the sea.", "2 + 2 ="]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    from melayer.generation import eos_ids

    cfg = dict(max_new_tokens=24)
    eos = eos_ids(tok, model)
    hf = generate_batch(model, enc["input_ids"], enc["attention_mask"], GenerationConfig(engine="hf", **cfg),
                        eos, tok.pad_token_id)
    for engine in ("static", "compact"):
        out = generate_batch(model, enc["input_ids"], enc["attention_mask"],
                             GenerationConfig(engine=engine, **cfg), eos, tok.pad_token_id)
        assert torch.equal(out, hf), engine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_host_syncing_hook_falls_back_to_eager_decode():
    model = make_tiny("llama").to("cuda")
    ids, mask = left_padded([4, 6], seed=1)
    calls = []
    ad = adapter_for(model)
    with HookGroup() as hooks:  # reads a value back to the host on every forward: cannot be captured
        hooks.forward(ad.block(model, 0), lambda m, a, out: calls.append(float(out.float().abs().sum().item())))
        hf = run(model, ids, mask, "hf", max_new=12)
        with pytest.warns(UserWarning, match="capture"):
            out, info = static_generate(model, ids.cuda(), mask.cuda(), 12, [2], PAD)
    assert not info.cuda_graph
    assert torch.equal(out.cpu(), hf)
    # the failed capture must leave the device usable: random ops (sampling, inductor's benchmarks) and new captures
    torch.randn(8, device="cuda")
    out, info = static_generate(model, ids.cuda(), mask.cuda(), 12, [2], PAD)
    assert info.cuda_graph
    assert torch.equal(out.cpu(), run(model, ids, mask, "hf", max_new=12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled decode is a GPU feature (slow to compile on CPU)")
def test_compiled_decode_follows_hooks_added_and_removed_after_compiling():
    model = make_tiny("llama").to("cuda")
    ids, mask = left_padded([8, 2, 5], seed=1)
    plain = run(model, ids, mask, "hf", max_new=20)

    def compiled():
        out, info = static_generate(model, ids.cuda(), mask.cuda(), 20, [2], PAD, compile=True)
        assert info.cuda_graph
        return out.cpu()

    assert torch.equal(compiled(), plain)
    with position_hook(model):  # registered after the first compilation: must not be ignored
        hf = run(model, ids, mask, "hf", max_new=20)
        assert not torch.equal(hf, plain)
        assert torch.equal(compiled(), hf)
        assert torch.equal(compiled(), hf)  # reuses the compiled code and the cache
    assert torch.equal(compiled(), plain)  # removed: must not linger in the compiled code
