"""WeMask: invariants on tiny random models of every family, paper parity, persistence, CLI, real SmolLM2."""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from helpers import has_hooks, make_tiny, paper_wemask, positions, random_seqs, save_tiny
from melayer.adapters import adapter_for
from melayer.errors import MelayerError
from melayer.masking import WeMaskConfig, apply_wemask, parse_layers, wemask
from melayer.text import left_pad

SMOLLM2_ME = 11  # SmolLM2-135M-Instruct: dim 507 of token 0 explodes in block 11


# -- helpers -------------------------------------------------------------------------------------------

def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@contextlib.contextmanager
def capture_attn_input(model, layer, store: list):
    """Record the attention input of block ``layer`` on every forward (registered order decides whether
    it sees the input before or after WeMask's own pre-hook)."""
    adapter = adapter_for(model)
    attn = adapter.attn_module(adapter.block(model, layer))

    def hook(module, args, kwargs):
        store.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        h.remove()


def greedy(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                              **kw)


def cached_step_logits(model, ids, mask, continuation):
    """Teacher-forced cached decoding: logits after the prompt, then after each continuation token."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        steps = [out.logits[:, -1]]
        cache_kw = "cache" if "cache" in out else "past_key_values"
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=continuation[:, t:t + 1], attention_mask=mask,
                        position_ids=positions(mask)[:, -1:], use_cache=True, **{cache_kw: out[cache_kw]})
            steps.append(out.logits[:, -1])
    return steps


# -- config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    dict(rate=-0.1), dict(rate=1.5), dict(rate="0.1"), dict(rate=True), dict(gamma=1.2), dict(gamma=-1),
    dict(score="norm"), dict(mode="official"), dict(layers="after"), dict(layers=[]), dict(layers=[-1]),
    dict(layers=[1.5]), dict(layers=3), dict(me_layer=-2), dict(me_layer="11"),
])
def test_config_rejects_bad_fields(fields):
    with pytest.raises(MelayerError) as e:
        WeMaskConfig(**fields)
    assert "\n" not in str(e.value)


def test_config_k_and_layer_resolution():
    assert WeMaskConfig(rate=0.01).k(576) == 5  # floor, as in the paper
    assert WeMaskConfig(rate=0.29).k(100) == 29  # no float-rounding loss
    assert WeMaskConfig(rate=1.0).k(64) == 64
    assert WeMaskConfig(layers="after_me").resolve_layers(30, 11) == [12]
    assert WeMaskConfig(layers="from_after_me").resolve_layers(30, 11) == list(range(12, 30))
    assert WeMaskConfig(layers="me", me_layer=4).resolve_layers(30) == [4]
    assert WeMaskConfig(layers=[5, 2, 5]).resolve_layers(30) == [2, 5]
    for cfg, args in [(WeMaskConfig(), (30, None)), (WeMaskConfig(), (30, 29)), (WeMaskConfig(), (30, 30)),
                      (WeMaskConfig(layers=[30]), (30, None))]:
        with pytest.raises(MelayerError):
            cfg.resolve_layers(*args)


def test_parse_layers():
    assert parse_layers("after_me") == "after_me"
    assert parse_layers("3, 5") == [3, 5]
    with pytest.raises(MelayerError):
        parse_layers("3,x")


# -- invariants on every family -------------------------------------------------------------------------

def test_rate_zero_registers_nothing_and_is_bit_identical(tiny_family):
    model = make_tiny(tiny_family)
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    base = logits(model, ids, mask)
    for rate in (0.0, 0.01):  # 0.01 x 64 dims -> k = 0
        with wemask(model, rate, me_layer=0) as handle:
            assert handle.layers == [] and not has_hooks(model)
            assert torch.equal(logits(model, ids, mask), base)
    assert handle.config.layers == [1]  # a nonzero rate is still resolved, so its config can be saved


def test_remove_restores_exactly(tiny_family):
    model = make_tiny(tiny_family)
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    base = logits(model, ids, mask)
    handle = apply_wemask(model, WeMaskConfig(rate=0.25, layers="from_after_me", me_layer=0))
    assert handle.layers == [1, 2, 3] and handle.k == 16
    assert not torch.allclose(logits(model, ids, mask), base, atol=1e-4)
    handle.remove()
    assert not has_hooks(model)
    assert torch.equal(logits(model, ids, mask), base)


def test_batched_left_padded_equals_unbatched(tiny_family):
    model = make_tiny(tiny_family)
    seqs = random_seqs([7, 3, 5])
    ids, mask = left_pad(seqs, 0)
    plain = logits(model, ids, mask)
    with wemask(model, rate=0.25, layers="from_after_me", me_layer=0) as handle:
        batched = logits(model, ids, mask)
        assert handle.fired == 3 * 3  # one first token per sequence, per target block
        for b, s in enumerate(seqs):
            one = logits(model, *left_pad([s], 0))[0]
            torch.testing.assert_close(batched[b, -len(s):], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[mask.bool()], plain[mask.bool()], atol=1e-3)  # the mask did act


def test_cached_generate_equals_full_recompute(tiny_family):
    model = make_tiny(tiny_family)
    ids, mask = left_pad(random_seqs([6, 3]), 0)
    n = 6
    with wemask(model, rate=0.25, layers="from_after_me", me_layer=0) as handle:
        gen = greedy(model, ids, mask, n)
        assert handle.fired == 2 * 3  # prefill only: decode tokens are never masked
        full_mask = torch.cat([mask, torch.ones(2, n, dtype=torch.long)], dim=1)
        full = logits(model, gen.sequences, full_mask)
    for t in range(n):
        torch.testing.assert_close(gen.logits[t], full[:, ids.shape[1] - 1 + t], atol=1e-4, rtol=1e-4)


# -- semantics --------------------------------------------------------------------------------------------

def _first_real(mask, b):
    return int(mask[b].nonzero()[0])


def test_correct_masks_first_real_token_only_and_never_decode_tokens():
    model = make_tiny("llama")
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    raw, masked = [], []
    with capture_attn_input(model, 2, raw):
        with wemask(model, rate=0.25, me_layer=1) as handle, capture_attn_input(model, 2, masked):
            greedy(model, ids, mask, 4)
            assert handle.fired == 2
    k = 16
    x, y = raw[0], masked[0]  # prefill
    for b in range(2):
        first = _first_real(mask, b)
        top = x[b, first].abs().topk(k).indices
        assert torch.all(y[b, first, top] == 0)
        keep = torch.ones(64, dtype=torch.bool)
        keep[top] = False
        assert torch.equal(y[b, first, keep], x[b, first, keep])
        rows = torch.arange(ids.shape[1]) != first
        assert torch.equal(y[b, rows], x[b, rows])  # pads and later tokens untouched
    for x, y in zip(raw[1:], masked[1:]):  # decode steps: untouched
        assert x.shape[1] == 1 and torch.equal(x, y)


def test_paper_mode_masks_chunk_index_zero_with_one_batch_dim_set():
    model = make_tiny("llama")
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    raw, masked = [], []
    with capture_attn_input(model, 2, raw):
        with wemask(model, rate=0.25, me_layer=1, mode="paper") as handle, capture_attn_input(model, 2, masked):
            greedy(model, ids, mask, 4)
            assert handle.fired == 2 * 4  # every forward (prefill + 3 decode steps) masks index 0
    for x, y in zip(raw, masked):
        top = x[:, 0].abs().mean(0).topk(16).indices
        assert torch.all(y[:, 0, top] == 0)  # same dims in both sequences, even on sequence 1's pad token
        changed = (x != y)
        assert not changed[:, 1:].any() and changed[:, 0].sum() == torch.count_nonzero(x[:, 0, top])


def test_score_gamma_picks_largest_gain_dims():
    for family in ("llama", "gemma"):  # gemma's effective gain is 1 + weight
        model = make_tiny(family)
        adapter = adapter_for(model)
        gain = adapter.norm_gain(adapter.get(adapter.block(model, 2), adapter.attn_norm))
        ids, mask = left_pad(random_seqs([5]), 0)
        raw, masked = [], []
        with capture_attn_input(model, 2, raw), wemask(model, rate=0.1, layers=[2], score="gamma"):
            with capture_attn_input(model, 2, masked):
                logits(model, ids, mask)
        zeroed = (masked[0][0, 0] == 0) & (raw[0][0, 0] != 0)
        assert set(zeroed.nonzero().flatten().tolist()) == set(gain.abs().topk(6).indices.tolist())
    with pytest.raises(MelayerError, match="pre-attention norm"):
        apply_wemask(make_tiny("olmo2"), WeMaskConfig(rate=0.1, layers=[2], score="gamma"))


def test_soft_gamma_scales_selected_dims():
    model = make_tiny("qwen2")
    ids, mask = left_pad(random_seqs([5]), 0)
    raw, masked = [], []
    with capture_attn_input(model, 1, raw), wemask(model, rate=0.25, layers=[1], gamma=0.3):
        with capture_attn_input(model, 1, masked):
            logits(model, ids, mask)
    x, y = raw[0][0, 0], masked[0][0, 0]
    top = x.abs().topk(16).indices
    torch.testing.assert_close(y[top], x[top] * 0.3)
    keep = torch.ones(64, dtype=torch.bool)
    keep[top] = False
    assert torch.equal(y[keep], x[keep]) and torch.equal(masked[0][0, 1:], raw[0][0, 1:])


def test_olmo2_masks_attention_input_not_residual():
    """OLMo-2's attention reads the residual: WeMask must alter only attention's copy of it."""
    model = make_tiny("olmo2")
    ids, mask = left_pad(random_seqs([5]), 0)
    raw, masked = [], []
    with capture_attn_input(model, 2, raw), wemask(model, rate=0.25, layers=[2]):
        with capture_attn_input(model, 2, masked):
            logits(model, ids, mask)
    assert torch.count_nonzero(masked[0][0, 0] == 0) == 16
    assert torch.count_nonzero(raw[0][0, 0] == 0) == 0  # the residual itself kept every dim


def test_gradients_flow_through_unmasked_dims_only():
    model = make_tiny("llama").train()
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    attn = adapter_for(model).attn_module(adapter_for(model).block(model, 2))
    seen = []

    def keep_grad(module, args, kwargs):
        kwargs["hidden_states"].retain_grad()
        seen.append(kwargs["hidden_states"])

    h = attn.register_forward_pre_hook(keep_grad, with_kwargs=True)  # before WeMask: sees the raw input
    with wemask(model, rate=0.25, me_layer=1):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        out.pow(2).mean().backward()
    h.remove()
    x, g = seen[0].detach(), seen[0].grad
    for b in range(2):
        first = _first_real(mask, b)
        top = x[b, first].abs().topk(16).indices
        assert torch.all(g[b, first, top] == 0)
        keep = torch.ones(64, dtype=torch.bool)
        keep[top] = False
        assert torch.all(g[b, first, keep] != 0)
        assert torch.all(g[b, first + 1:] != 0)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    base = make_tiny("llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                     init_lora_weights=False))
    merged = copy.deepcopy(lora).merge_and_unload()
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    plain = logits(lora, ids, mask)
    with wemask(merged, rate=0.25, me_layer=1):
        expected = logits(merged, ids, mask)
    with wemask(lora, rate=0.25, me_layer=1) as handle:
        got = logits(lora, ids, mask)
        assert handle.layers == [2] and handle.fired == 2
        lora.train()
        lora(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.pow(2).mean().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_hooks_trace_into_one_graph_under_torch_compile():
    """fullgraph=True fails on any graph break, e.g. a host sync (.item()) or data-dependent branch."""
    model = make_tiny("llama")
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    with wemask(model, rate=0.25, me_layer=1) as handle:
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            got = compiled(input_ids=ids, attention_mask=mask).logits
        assert handle.fired == 2 * 2  # the counter also advances inside the compiled graph
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# -- paper parity ---------------------------------------------------------------------------------------

def test_paper_mode_matches_independent_qwen3_reimplementation():
    model = make_tiny("qwen3")
    ids, mask = left_pad(random_seqs([7, 4]), 0)  # ragged: the paper masks sequence 1's pad at index 0
    layers = [1, 3]
    plain = logits(model, ids, mask)
    with paper_wemask(model, layers, rate=0.25):
        ref_logits = logits(model, ids, mask)
        ref_gen = greedy(model, ids, mask, 6)
    assert not has_hooks(model) and torch.equal(logits(model, ids, mask), plain)
    with wemask(model, rate=0.25, layers=layers, mode="paper"):
        got_logits = logits(model, ids, mask)
        got_gen = greedy(model, ids, mask, 6)
    assert not torch.allclose(ref_logits, plain, atol=1e-3)
    assert torch.equal(got_logits, ref_logits)
    assert torch.equal(got_gen.sequences, ref_gen.sequences)
    for a, b in zip(got_gen.logits, ref_gen.logits):
        assert torch.equal(a, b)


def test_per_sequence_paper_mode_batched_equals_each_item_alone_under_the_literal_hook():
    """The eval runner's paper mode: a left-padded batch gets, row by row, what the official hook does to
    the item run alone (the paper's protocol), through prefill and every cached decode step."""
    model = make_tiny("qwen3")
    seqs = random_seqs([7, 4, 9])
    ids, mask = left_pad(seqs, 0)
    with wemask(model, rate=0.25, me_layer=1, mode="paper", per_sequence=True) as handle:
        batched = greedy(model, ids, mask, 6)
        assert handle.fired == 3 * 6  # each row: its first token, then every new token
    with wemask(model, rate=0.25, me_layer=1, mode="paper"):
        literal_batch = greedy(model, ids, mask, 6)
        alone = [greedy(model, *left_pad([s], 0), 6) for s in seqs]
    width = ids.shape[1]
    for row, ref in enumerate(alone):
        assert torch.equal(batched.sequences[row, width:], ref.sequences[0, len(seqs[row]):])
        for a, b in zip(batched.logits, ref.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)
    # the literal hook on the same batch masks row 1's pad instead of its first token: the test can fail
    assert not torch.allclose(literal_batch.logits[0][1], batched.logits[0][1], atol=1e-3)


def test_correct_equals_paper_on_prefill_and_differs_only_in_decode():
    model = make_tiny("qwen3")
    ids, mask = left_pad(random_seqs([7]), 0)  # one unpadded sequence: both modes pick the same dims
    cont = torch.tensor([random_seqs([5], seed=1)[0]])
    steps = {}
    for mode in ("correct", "paper"):
        with wemask(model, rate=0.25, me_layer=1, mode=mode):
            steps[mode] = cached_step_logits(model, ids, mask, cont)
            full = logits(model, torch.cat([ids, cont], 1), torch.ones(1, 12, dtype=torch.long))[0, 6:]
        steps[mode + "_full"] = full
    assert torch.equal(steps["correct"][0], steps["paper"][0])  # prefill: identical
    torch.testing.assert_close(steps["correct_full"], steps["paper_full"], atol=0, rtol=0)  # no decode at all
    for t in range(1, 6):  # each decode step: paper masks the new token, correct does not
        assert not torch.allclose(steps["correct"][t], steps["paper"][t], atol=1e-3)
        torch.testing.assert_close(steps["correct"][t][0], steps["correct_full"][t], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(steps["paper"][t][0], steps["paper_full"][t], atol=1e-3)


# -- persistence and CLI ----------------------------------------------------------------------------------

def test_save_then_load_is_pure_and_saved_wemask_reapplies(tmp_path):
    """load_model never installs hooks; saved_wemask gives the config that reproduces the saved run exactly."""
    from melayer import load_model, saved_wemask

    model = save_tiny(tmp_path)
    ids, mask = left_pad(random_seqs([6, 4]), 0)
    with pytest.raises(MelayerError, match="resolved"):
        WeMaskConfig(rate=0.25, layers="from_after_me").save(tmp_path)
    with wemask(model, rate=0.25, layers="from_after_me", me_layer=1) as handle:
        expected = logits(model, ids, mask)
        handle.config.save(tmp_path)
    saved = json.loads((tmp_path / "wemask_config.json").read_text())
    assert saved == dict(rate=0.25, layers=[2, 3], score="activation", gamma=0.0, mode="correct", me_layer=1)
    assert WeMaskConfig.load(tmp_path) == WeMaskConfig(**saved)
    loaded, _ = load_model(tmp_path, device="cpu")
    assert not has_hooks(loaded)  # the loader only loads
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))
    config = saved_wemask(loaded)
    assert config == WeMaskConfig(**saved) and saved_wemask(str(tmp_path)) == config
    with wemask(loaded, config):
        assert torch.equal(logits(loaded, ids, mask), expected)
    assert not has_hooks(loaded)
    # an unresolved config resolves against the model when saved
    WeMaskConfig(rate=0.1, layers="after_me", me_layer=0).save(tmp_path, model=model)
    assert WeMaskConfig.load(tmp_path / "wemask_config.json").layers == [1]
    (tmp_path / "wemask_config.json").write_text('{"rate": 0.1, "typo": 1}')
    with pytest.raises(MelayerError, match="unknown fields"):
        WeMaskConfig.load(tmp_path)


def _cli(argv):
    from melayer.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.handler(args)


def test_cli_generate(tmp_path, capsys, monkeypatch):
    model = save_tiny(tmp_path)
    prompts = ["w10 w11 w12 w13", "w40 w41"]
    tokens = ["--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "5", "--device", "cpu"]
    ids, mask = left_pad([[10, 11, 12, 13], [40, 41]], 0)
    with wemask(model, rate=0.25, layers=[2, 3]):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=[2])[:, ids.shape[1]:]
    expected = [" ".join(f"w{i}" for i in row.tolist() if i > 3) for row in out]

    assert _cli([ "generate", str(tmp_path), *tokens, "--wemask-rate", "0.25", "--wemask-layers", "2,3"]) == 0
    assert capsys.readouterr().out.splitlines() == expected

    monkeypatch.setenv("COLUMNS", "250")
    assert _cli(["generate", str(tmp_path), *tokens, "--wemask-rate", "0.25", "--wemask-layers", "2,3",
                 "--compare"]) == 0
    table = capsys.readouterr().out
    assert "without WeMask" in table and "with WeMask" in table and expected[0] in table
    with pytest.raises(MelayerError, match="--compare needs"):
        _cli(["generate", str(tmp_path), *tokens, "--compare"])
    with pytest.raises(MelayerError, match="--me-layer needs"):
        _cli(["generate", str(tmp_path), *tokens, "--me-layer", "1"])
    with pytest.raises(MelayerError, match="chat template"):
        _cli(["generate", str(tmp_path), *tokens, "--chat"])


# -- real model ---------------------------------------------------------------------------------------------

def _smol_batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.real
def test_smollm2_after_me_masks_top_dims_of_token0(smollm2):
    model, tokenizer = smollm2
    ids, mask = _smol_batch(tokenizer, ["The capital of France is"])
    raw, masked = [], []
    with capture_attn_input(model, 12, raw), wemask(model, rate=0.01, me_layer=SMOLLM2_ME) as handle:
        with capture_attn_input(model, 12, masked):
            logits(model, ids, mask)
        assert handle.layers == [12] and handle.k == 5 and handle.fired == 1
    x, y = raw[0][0], masked[0][0]
    top = x[0].abs().topk(5).indices
    assert torch.all(y[0, top] == 0) and torch.all(x[0, top].abs() > 0)
    changed = (x != y).nonzero()
    assert changed[:, 0].eq(0).all() and set(changed[:, 1].tolist()) == set(top.tolist())
    # the masked dims are token 0's massive residual dims (507 first, ~22,500 after the ME layer): the
    # norm squashes them to O(1) but they still lead the attention input
    block = adapter_for(model).block(model, 12)
    residual = []
    h = block.register_forward_pre_hook(lambda m, a, kw: residual.append((a[0] if a else kw["hidden_states"])[0, 0]),
                                        with_kwargs=True)
    logits(model, ids, mask)
    h.remove()
    assert 507 in top.tolist() and residual[0][507].abs() > 10_000
    assert set(top.tolist()) == set(residual[0].abs().topk(5).indices.tolist())


@pytest.mark.real
def test_smollm2_batched_generation_matches_unbatched_and_recompute(smollm2):
    model, tokenizer = smollm2
    texts = ["Write one word about the sea:", "2 + 2 ="]
    ids, mask = _smol_batch(tokenizer, texts)
    n = 4
    with wemask(model, rate=0.01, me_layer=SMOLLM2_ME):
        gen = greedy(model, ids, mask, n)
        full = logits(model, gen.sequences, torch.cat([mask, torch.ones(2, n, dtype=torch.long)], 1))
        for b, text in enumerate(texts):
            one = greedy(model, *_smol_batch(tokenizer, [text]), n)
            assert one.sequences[0, -n:].tolist() == gen.sequences[b, -n:].tolist()
    for t in range(n):
        torch.testing.assert_close(gen.logits[t], full[:, ids.shape[1] - 1 + t], atol=2e-3, rtol=1e-4)


@pytest.mark.real
def test_smollm2_me_layer_from_scan(smollm2):
    pytest.importorskip("melayer.scan")
    model, tokenizer = smollm2
    with wemask(model, rate=0.01) as handle:  # tokenizer=None: the scan uses random token ids
        assert handle.config.me_layer == SMOLLM2_ME and handle.layers == [SMOLLM2_ME + 1]
