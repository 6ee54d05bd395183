"""Loading, family adapters and residual capture, checked against independent computations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import FAMILIES, left_padded, make_tiny
from melayer.adapters import UnsupportedArchitecture, adapter_for
from melayer.capture import ResidualCapture


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_the_real_modules(family):
    """The adapter's attention input, FFN decomposition and γ match what the block really computes."""
    model = make_tiny(family)
    ad = adapter_for(model)
    block = ad.block(model, 1)
    seen = {}
    attn = ad.attn_module(block)
    h1 = attn.register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("attn_in", (k.get("hidden_states", a[0] if a else None)).detach()),
        with_kwargs=True)
    h2 = block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("block_in", (a[0] if a else k["hidden_states"]).detach()),
                                         with_kwargs=True)
    h3 = ad.mlp_module(block).register_forward_hook(lambda m, a, o: seen.update(mlp_in=a[0].detach(), mlp_out=o.detach()))
    ids, mask = left_padded([7, 5])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in (h1, h2, h3):
        h.remove()
    x = seen["block_in"]
    norm = ad.get(block, ad.attn_norm)
    if norm is None:  # olmo2: attention reads the residual stream itself
        torch.testing.assert_close(seen["attn_in"], x)
    else:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        manual = ad.norm_gain(norm) * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        torch.testing.assert_close(seen["attn_in"], manual, rtol=1e-4, atol=1e-5)
    W_gate, W_up, W_down = ad.ffn_weights(block)
    act = ad.ffn_activation(block, seen["mlp_in"])
    assert act.shape[-1] == W_down.shape[1] == W_gate.shape[0] == W_up.shape[0]
    torch.testing.assert_close(act @ W_down.T, seen["mlp_out"], rtol=1e-4, atol=1e-5)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match="supported: .*llama.*qwen3"):
        adapter_for(model)


def _ground_truth(model, ids, mask):
    """Block outputs from output_hidden_states, plus the last block's output with the final norm removed."""
    ad = adapter_for(model)
    with torch.no_grad():
        hs = list(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states)
        decoder = ad.decoder(model)
        final = decoder.norm
        decoder.norm = nn.Identity()
        try:
            last = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        finally:
            decoder.norm = final
    return hs[1:-1] + [last]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_output_hidden_states(family):
    model = make_tiny(family)
    ids, mask = left_padded([9, 6, 3], seed=1)
    blocks = _ground_truth(model, ids, mask)
    delim = torch.tensor([4, -1, 8])  # absolute positions (left padded), -1: none
    with ResidualCapture(model) as cap:
        stats = cap.run(ids, mask, delim)
    assert len(stats) == len(blocks) == model.config.num_hidden_layers
    for st, h in zip(stats, blocks):
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            first = int(real.nonzero()[0])
            hb = h[b, real].abs()
            assert st.max_abs[b] == pytest.approx(float(hb.max()), rel=1e-6)
            flat = int(hb.argmax())
            assert (int(st.max_pos[b]), int(st.max_dim[b])) == divmod(flat, hb.shape[1])
            assert st.median_abs[b] == pytest.approx(float(hb.flatten().median()), rel=1e-6)
            torch.testing.assert_close(st.first[b], h[b, first])
            others = real.clone()
            others[first] = False
            if delim[b] >= 0:
                others[int(delim[b])] = False
            torch.testing.assert_close(st.rest_max_abs[b], h[b, others].abs().amax(0))
            assert st.first_norm[b] == pytest.approx(float(h[b, first].norm()), rel=1e-5)
            assert st.rest_norm[b] == pytest.approx(float(h[b, real][1:].norm(dim=-1).mean()), rel=1e-5)
            expected_delim = h[b, int(delim[b])] if delim[b] >= 0 else torch.zeros(h.shape[-1])
            torch.testing.assert_close(st.delim[b], expected_delim)
            assert st.first.dtype == torch.float32


def test_capture_left_padding_matches_unbatched():
    model = make_tiny("qwen2")
    ids, mask = left_padded([10, 4], seed=2)
    with ResidualCapture(model) as cap:
        batched = cap.run(ids, mask)
        for b in range(2):
            real = mask[b].bool()
            alone = cap.run(ids[b:b + 1, real], mask[b:b + 1, real])
            for sb, sa in zip(batched, alone):
                torch.testing.assert_close(sb.first[b], sa.first[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(sb.median_abs[b], sa.median_abs[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(sb.rest_max_abs[b], sa.rest_max_abs[0], rtol=1e-4, atol=1e-5)


def test_capture_bf16_statistics_are_fp32_and_close():
    ids, mask = left_padded([8, 5], seed=3)
    ref = ResidualCapture(make_tiny("llama")).run(ids, mask)
    low = ResidualCapture(make_tiny("llama", dtype=torch.bfloat16)).run(ids, mask)
    for a, b in zip(ref, low):
        assert b.first.dtype == torch.float32 and b.median_abs.dtype == torch.float32
        torch.testing.assert_close(b.max_abs, a.max_abs, rtol=5e-2, atol=1e-3)
        torch.testing.assert_close(b.median_abs, a.median_abs, rtol=5e-2, atol=1e-3)


def test_capture_hooks_leave_the_model_unchanged():
    model = make_tiny("llama")
    ids, mask = left_padded([6, 6])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with ResidualCapture(model) as cap:
            cap.run(ids, mask)
            during = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not any(b._forward_hooks for b in adapter_for(model).layers(model))
