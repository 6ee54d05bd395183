"""melayer.explain: each analysis against an independent computation (tiny random models), and the
spike of the real SmolLM2 at block 11 with its removal under ablation."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny
from melayer.adapters import adapter_for
from melayer.errors import MelayerError
from melayer.explain import ExplainConfig, explain, write
from melayer.explain.ablate import (cap_ffn_output, flatten_gamma, measure, normalise_scale, perplexity,
                                    set_massive, wikitext_windows, zero_neurons)
from melayer.explain.common import Inputs, capture_block_outputs, prepare_inputs
from melayer.explain.diversity import diversity, effective_rank
from melayer.explain.ffn import ffn_role
from melayer.explain.propagate import propagation
from melayer.explain.rigidity import cross_input_cosine, layer_cosine, rigidity
from melayer.explain.rmsnorm import decompose, rmsnorm_role
from melayer.explain.sinks import sinks
from melayer.hooks import HookGroup

ME = 1  # ME layer used on the tiny 4-block models


def tiny_inputs(batch: int = 3, length: int = 10, seed: int = 1, pad: int = 3) -> Inputs:
    """Random token ids, the first row unpadded and the others left-padded by ``pad`` positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, :pad] = 0
    ids[mask == 0] = 0
    return Inputs(ids, mask, [f"row {b}" for b in range(batch)])


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- RMSNorm ----------------------------------------------------------------------------------------------

def test_rmsnorm_decomposition_is_the_norm(tiny_family):
    """γ ⊙ x̂ from our decomposition equals what the model's own pre-FFN norm outputs."""
    model, inputs = make_tiny(tiny_family), tiny_inputs()
    ad = adapter_for(model)
    role = rmsnorm_role(model, None, ME, inputs, [3, 7])
    if ad.ffn_norm is None:
        assert not role.applicable
        return
    norm = ad.get(ad.block(model, ME), ad.ffn_norm)
    seen = {}
    with HookGroup() as hooks:
        hooks.forward(norm, lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    scale, xhat, gx = decompose(seen["x"], ad.norm_gain(norm), role_eps(norm))
    valid = inputs.valid
    torch.testing.assert_close(gx[valid], seen["y"].float()[valid], rtol=1e-4, atol=1e-5)
    h0 = seen["x"][torch.arange(3), inputs.first].float()
    assert role.scale_token0 == pytest.approx(float((1 / h0.pow(2).mean(-1).add(role_eps(norm)).sqrt()).mean()), rel=1e-5)
    assert role.gamma_dims == pytest.approx(ad.norm_gain(norm)[[3, 7]].tolist())
    g = ad.norm_gain(norm).abs()
    assert role.gamma_percentile[0] == pytest.approx(100 * float((g < g[3]).float().mean()))


def role_eps(norm) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


# -- FFN --------------------------------------------------------------------------------------------------

def test_ffn_attribution_sums_to_ffn_output(tiny_family):
    """Σ_j act_j · W_down[d, j] equals the FFN module's own output on dim d (token 0, mean over rows)."""
    model, inputs = make_tiny(tiny_family), tiny_inputs()
    role = ffn_role(model, None, ME, inputs, [0, 5, 17], top=8)
    for d in role.dims:
        assert d.attributed == pytest.approx(d.ffn_output, rel=1e-4, abs=1e-5)
        assert len(d.top_neurons) == 8 and d.cumulative_share[0] == pytest.approx(d.top_contributions[0] / d.attributed)
        assert d.neurons_for_share["0.99"] >= d.neurons_for_share["0.5"] >= 1


# -- propagation ------------------------------------------------------------------------------------------

def test_propagation_writes_sum_to_residual_difference(tiny_family):
    """carried + attention write + FFN write = the next block's input, read from output_hidden_states."""
    model, inputs = make_tiny(tiny_family), tiny_inputs()
    dims = list(range(64))
    prop = propagation(model, None, ME, inputs, dims)
    with torch.no_grad():
        hs = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True).hidden_states
    rows = torch.arange(3)
    for b in prop.blocks[:-1]:  # the last hidden state has the final norm applied
        nxt = hs[b.block + 1][rows, inputs.first].float().mean(0)
        cur = hs[b.block][rows, inputs.first].float().mean(0)
        written = torch.tensor(b.attn) + torch.tensor(b.ffn)
        torch.testing.assert_close(torch.tensor(b.carried), cur, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(written, nxt - cur, rtol=1e-3, atol=1e-4)
    assert prop.max_residual_error < 1e-4


# -- rigidity ---------------------------------------------------------------------------------------------

def test_cosines_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, 5, generator=gen)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    u = torch.nn.functional.normalize(v, dim=-1)
    pairs = [float(u[i] @ u[j]) for i in range(7) for j in range(7) if groups[i] != groups[j]]
    assert cross_input_cosine(v, groups) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    states = torch.randn(3, 4, 5, generator=gen)
    expect = torch.tensor([[sum(float(torch.cosine_similarity(states[l, n], states[m, n], dim=0)) for n in range(4)) / 4
                            for m in range(3)] for l in range(3)])
    torch.testing.assert_close(layer_cosine(states), expect, rtol=1e-5, atol=1e-6)


def test_rigidity_identical_inputs_cosine_one():
    model = make_tiny("llama")
    one = tiny_inputs(batch=1, pad=0)
    same = Inputs(one.input_ids.repeat(3, 1), one.attention_mask.repeat(3, 1), ["a"] * 3)
    rig = rigidity(model, None, ME, same)
    for stream in (rig.residual, rig.attention_input):
        assert stream.token0_across == pytest.approx([1.0] * 4, abs=1e-5)
        assert stream.other_across[0] < 0.99  # different positions of one text are not identical
        assert [stream.token0_layers[i][i] for i in range(4)] == pytest.approx([1.0] * 4, abs=1e-5)
    different = rigidity(model, None, ME, tiny_inputs())
    assert max(different.residual.token0_across) < 0.99


# -- diversity --------------------------------------------------------------------------------------------

def test_effective_rank_of_known_matrices():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    u, v = torch.randn(9, 1), torch.randn(1, 5)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.diag(torch.tensor([3.0, 3.0, 0.0]))) == pytest.approx(2.0)
    p = torch.tensor([0.75, 0.25])  # singular values 3 and 1
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(p * p.log()).sum()))


def test_wemask_changes_attention_inputs_only_from_the_masked_layer():
    """WeMask after ME layer 1 masks block 2's attention input: ranks of blocks 0-1 are untouched."""
    model, inputs = make_tiny("llama"), tiny_inputs()
    div = diversity(model, None, ME, inputs, [0.0, 0.25])
    plain, masked = div.curve(0.0).effective_rank, div.curve(0.25).effective_rank
    assert div.curve(0.25).masked_dims == 16
    assert masked[:ME + 1] == pytest.approx(plain[:ME + 1], rel=1e-6)
    assert masked[ME + 1] != pytest.approx(plain[ME + 1], rel=1e-4)


# -- sinks ------------------------------------------------------------------------------------------------

def test_sink_mass_equals_manual_softmax():
    """Mass on token 0 from eager probabilities = softmax(q kᵀ / √d) recomputed from the attention inputs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, inputs = make_tiny("llama"), tiny_inputs()
    before = model.config._attn_implementation
    res = sinks(model, None, ME, inputs)
    assert model.config._attn_implementation == before
    attn = model.model.layers[ME].self_attn
    seen = {}
    with HookGroup() as hooks:
        hooks.pre(attn, lambda m, a, k: seen.update(x=k["hidden_states"], pe=k["position_embeddings"]),
                  with_kwargs=True)
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    x, (cos, sin) = seen["x"], seen["pe"]
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, 16).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / 4.0
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & inputs.valid[:, None, :]
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    mean_q, last_q = [], []
    for b in range(B):
        f = int(inputs.first[b])
        mean_q.append(probs[b, :, f + 1:, f].mean(-1))
        last_q.append(probs[b, :, -1, f])
    torch.testing.assert_close(torch.tensor(res.heads_mean[ME]), torch.stack(mean_q).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(res.heads_last[ME]), torch.stack(last_q).mean(0), rtol=1e-4, atol=1e-5)


# -- ablations --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_ablations_act_and_restore_exactly(family):
    model, inputs = make_tiny(family), tiny_inputs()
    ad = adapter_for(model)
    block = ad.block(model, ME)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    rows = torch.arange(3)

    def run_with(module, pre=False):
        seen = {}
        with HookGroup() as hooks:
            if pre:
                hooks.pre(module, lambda m, a: seen.update(x=a[0].detach()))
            else:
                hooks.forward(module, lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
            with torch.no_grad():
                model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
        return seen

    norm = ad.get(block, ad.ffn_norm)
    with flatten_gamma(model, ME, 1.0):
        gain = ad.norm_gain(norm)
        assert torch.allclose(gain, gain.mean().expand_as(gain), atol=1e-6)
    with zero_neurons(model, ME, [3, 9]):
        seen = run_with(getattr(ad.mlp_module(block), ad.down), pre=True)
        assert seen["x"][..., [3, 9]].abs().max() == 0 and seen["x"].abs().max() > 0
    with cap_ffn_output(model, ME, 0.5):
        y = run_with(ad.mlp_module(block))["y"].float().norm(dim=-1)
        for b in range(3):
            others = y[b][inputs.other_sel[b]]
            assert y[b, inputs.first[b]] <= 0.5 * others.median() * (1 + 1e-5)
    with normalise_scale(model, ME):
        seen = run_with(norm)
        x = seen["x"].float()
        scale = x.pow(2).mean(-1).add(role_eps(norm)).rsqrt()
        for b in range(3):
            target = scale[b][inputs.other_sel[b]].median()
            expect = x[b, inputs.first[b]] * target * ad.norm_gain(norm)
            torch.testing.assert_close(seen["y"][b, inputs.first[b]].float(), expect, rtol=1e-4, atol=1e-5)
    with set_massive(model, ME, [2, 5], [7.0, -3.0]):
        h = capture_block_outputs(model, inputs, [ME])[ME]
        assert h[rows, inputs.first][:, [2, 5]].tolist() == [[7.0, -3.0]] * 3
        assert h[rows, inputs.first + 1][:, 2].ne(7.0).all()
    with pytest.raises(RuntimeError):
        with flatten_gamma(model, ME, 0.5), zero_neurons(model, ME, [1]), cap_ffn_output(model, ME, 1.0):
            raise RuntimeError("interrupted")
    assert hooks_left(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        again = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    assert torch.equal(again, logits)


def test_explain_end_to_end_writes_the_report(tmp_path):
    """All analyses on a tiny model, then the report: files, one verdict per claim, the model left as it was."""
    import json

    model, inputs = make_tiny("llama"), tiny_inputs()
    config = ExplainConfig(model="tiny", me_layer=ME, wemask_rates=[0.25])
    result = explain(model, None, config, progress=False, inputs=inputs)
    assert result.config.wemask_rates == [0.0, 0.25] and result.me_layer_source == "given"
    assert [r.name for r in result.ablations.rows][:2] == ["baseline", "gamma_flatten_0.5"]
    paths = write(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["claims"]) == 6 and {c["verdict"] for c in data["claims"]} <= {"holds", "does not hold"}
    assert json.loads((tmp_path / "explain_config.json").read_text())["me_layer"] == ME
    for name in ("rmsnorm", "ffn", "ablations", "propagation", "rigidity_heatmaps", "diversity", "sinks_curves"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "## Paper claims" in paths["markdown"].read_text()
    assert hooks_left(model) == 0 and model.config._attn_implementation != "eager"


def test_bad_inputs_are_melayer_errors():
    model = make_tiny("llama")
    with pytest.raises(MelayerError):
        rigidity(model, None, 9, tiny_inputs())
    with pytest.raises(MelayerError):
        ExplainConfig(wemask_rates=[0.5, 2.0])
    with pytest.raises(MelayerError):
        with flatten_gamma(model, ME, 1.5):
            pass
    olmo = make_tiny("olmo2")
    with pytest.raises(MelayerError):
        with flatten_gamma(olmo, ME, 1.0):
            pass


# -- the real model ---------------------------------------------------------------------------------------

SMOL_ME, SMOL_DIM = 11, 507
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of Australia?",
           "def add(a, b):\n    return a + b"]


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    return model, tokenizer, prepare_inputs(tokenizer, PROMPTS)


@pytest.mark.real
def test_smollm2_spike_is_born_at_block_11_by_two_neurons(smol):
    model, tokenizer, inputs = smol
    outs = capture_block_outputs(model, inputs, [SMOL_ME - 1, SMOL_ME])
    rows = torch.arange(len(inputs))
    before, after = outs[SMOL_ME - 1][rows, inputs.first], outs[SMOL_ME][rows, inputs.first]
    assert after[:, SMOL_DIM].min() > 10_000 and before.abs().max() < 1_000
    assert after.abs().argmax(-1).tolist() == [SMOL_DIM] * len(inputs)
    role = ffn_role(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM])
    d = role.dims[0]
    assert d.ffn_output > 10_000 and d.attributed == pytest.approx(d.ffn_output, rel=1e-4)
    assert d.neurons_for_share["0.9"] <= 3  # measured: neurons 1229 and 1487 carry 99.6 %
    prop = propagation(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM])
    assert all(b.relative_change < 0.05 for b in prop.blocks[SMOL_ME + 1:27])
    norm = rmsnorm_role(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM])
    assert abs(norm.gamma_dims[0]) < 1e-3 and norm.gamma_percentile[0] < 1  # γ nearly 0 on the massive dim


@pytest.mark.real
def test_smollm2_ablations_remove_the_spike(smol, data_dir):
    model, tokenizer, inputs = smol
    windows = wikitext_windows(tokenizer, data_dir, n_tokens=64, window=64)
    base_me, base_last, _, _, base_ppl = measure(model, inputs, SMOL_ME, [SMOL_DIM], windows)
    neurons = ffn_role(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM]).ablate_neurons
    with zero_neurons(model, SMOL_ME, neurons):
        me, last, _, _, ppl = measure(model, inputs, SMOL_ME, [SMOL_DIM], windows)
    assert me < 0.01 * base_me and last < 0.1 * base_last
    with set_massive(model, SMOL_ME, [SMOL_DIM], [0.0]):
        _, _, _, _, ppl_zero = measure(model, inputs, SMOL_ME, [SMOL_DIM], windows)
    assert base_ppl < perplexity(model, windows) * (1 + 1e-6)  # restored
    assert ppl_zero > 2 * base_ppl  # Sun et al.: the massive value is needed
