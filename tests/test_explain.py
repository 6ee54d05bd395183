"""melayer explain: each analysis against an independent computation (tiny random models), each claim's rule on a
case built to hold and one built to fail, and the spike of the real SmolLM2 at block 11."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import make_tiny
from melayer.adapters import adapter_for
from melayer.errors import MelayerError
from melayer.explanation import ExplainConfig, explain
from melayer.explanation.ablate import (cap_ffn_output, flatten_gamma, measure, normalise_ffn_product,
                                        normalise_scale, perplexity, set_massive, shrink_ffn_product,
                                        wikitext_windows, zero_neurons)
from melayer.explanation.claims import VERDICTS, Check
from melayer.explanation.common import Inputs, capture_block_outputs, effective_rank, prepare_inputs
from melayer.explanation.diversity import diversity
from melayer.explanation.ffn import ffn_role
from melayer.explanation.propagate import propagation
from melayer.explanation.rigidity import cross_input_cosine, layer_cosine, rigidity
from melayer.explanation.rmsnorm import decompose, rmsnorm_role
from melayer.explanation.sinks import late_queries, sinks
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


def test_rigidity_compares_only_distinct_first_tokens():
    """Prompts that start with the same token have identical token-0 states (causality): the claim's statistic
    ignores those pairs, and a set of such prompts is refused rather than called rigid."""
    model = make_tiny("llama")
    inputs = tiny_inputs()
    same = Inputs(inputs.input_ids.clone(), inputs.attention_mask, ["a", "b", "c"])
    same.input_ids[torch.arange(3), same.first] = 7  # one first token everywhere, different texts after it
    rig = rigidity(model, None, ME, same, dims=[3])
    assert rig.distinct_first_tokens == 1
    assert all(math.isnan(v) for v in rig.residual.token0_across)
    t0 = capture_block_outputs(model, same, [0, 3])
    rows = torch.arange(3)
    assert torch.allclose(t0[3][rows, same.first][0], t0[3][rows, same.first][1], atol=1e-5)  # identical by causality
    mixed = Inputs(same.input_ids.clone(), same.attention_mask, ["a", "b", "c"])
    mixed.input_ids[2, mixed.first[2]] = 11  # rows 0 and 1 share a first token, row 2 differs
    rig = rigidity(model, None, ME, mixed, dims=[3])
    h = capture_block_outputs(model, mixed, [3])[3][rows, mixed.first]
    u = torch.nn.functional.normalize(h, dim=-1)
    expect = float((u[0] @ u[2] + u[1] @ u[2] + u[2] @ u[0] + u[2] @ u[1]) / 4)  # only pairs with row 2
    assert rig.residual.token0_across[3] == pytest.approx(expect, rel=1e-4)
    assert rig.distinct_first_tokens == 2 and len(rig.residual.gain) == 3


# -- diversity --------------------------------------------------------------------------------------------

def test_effective_rank_of_known_matrices():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    u, v = torch.randn(9, 1), torch.randn(1, 5)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.diag(torch.tensor([3.0, 3.0, 0.0]))) == pytest.approx(2.0)
    p = torch.tensor([0.75, 0.25])  # singular values 3 and 1
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(p * p.log()).sum()))


def test_diversity_with_and_without_token0_against_svd():
    model, inputs = make_tiny("llama"), tiny_inputs()
    d = diversity(model, None, ME, inputs)
    x = {}
    with HookGroup() as hooks:
        hooks.pre(model.model.layers[2].self_attn, lambda m, a, k: x.update(v=k["hidden_states"].detach()),
                  with_kwargs=True)
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    with_0 = sum(effective_rank(x["v"][b][inputs.valid[b]]) for b in range(3)) / 3
    without = sum(effective_rank(x["v"][b][inputs.other_sel[b]]) for b in range(3)) / 3
    assert d.effective_rank[2] == pytest.approx(with_0, rel=1e-6) and d.without_token0[2] == pytest.approx(without)


# -- sinks ------------------------------------------------------------------------------------------------

def test_sink_mass_equals_manual_softmax():
    """Mass on token 0 from eager probabilities = softmax(q kᵀ / √d) recomputed from the attention inputs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, inputs = make_tiny("llama"), tiny_inputs()
    before = model.config._attn_implementation
    res = sinks(model, None, ME, inputs)
    late = late_queries(inputs)
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
        n = int(inputs.attention_mask[b].sum())
        late_pos = [f + j for j in range(1, n) if 2 * j >= n]  # the second half of the prompt
        assert late[b].nonzero().flatten().tolist() == late_pos
        mean_q.append(probs[b, :, late_pos, f].mean(-1))
        last_q.append(probs[b, :, -1, f])
    torch.testing.assert_close(torch.tensor(res.heads_late[ME]), torch.stack(mean_q).mean(0), rtol=1e-4, atol=1e-5)
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
    down = getattr(ad.mlp_module(block), ad.down)
    plain = run_with(down, pre=True)["x"].float()
    rms = plain.pow(2).mean(-1).add(1e-6).sqrt()
    with normalise_ffn_product(model, ME):
        got = run_with(down, pre=True)["x"].float()
        valid = inputs.valid
        torch.testing.assert_close(got[valid], (plain / rms[..., None])[valid], rtol=1e-4, atol=1e-5)
    with shrink_ffn_product(model, ME):
        got = run_with(down, pre=True)["x"].float()
        for b in range(3):
            ref = rms[b][inputs.other_sel[b]].median()
            factor = (ref / rms[b]).clamp(max=1.0)
            torch.testing.assert_close(got[b][inputs.valid[b]], (plain[b] * factor[:, None])[inputs.valid[b]],
                                       rtol=1e-4, atol=1e-5)
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
    """Every analysis on a tiny model, then the report: files, the claims list with CIs, the model left as it was."""
    import json

    model, inputs = make_tiny("llama"), tiny_inputs()
    config = ExplainConfig(model="tiny", me_layer=ME, wemask_rates=[0.25, 1.0], claim_rate=0.25)
    result = explain(model, None, config, progress=False, inputs=inputs)
    assert result.config.wemask_rates == [0.0, 0.25, 1.0] and result.me_layer_source == "given"
    assert [r.name for r in result["ablations"].rows][:2] == ["baseline", "gamma_flatten_0.5"]
    conditions = {(c.layers, c.rate) for c in result["wemask"].conditions}
    assert conditions == {(s, r) for s in ("after_me", "from_after_me") for r in (0.0, 0.25, 1.0)}
    paths = result.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    ids = [c["id"] for c in data["claims"]]
    frame = result.to_pandas()  # one row per claim, the numbers the report holds
    assert list(frame["claim"]) == ids and list(frame["verdict"]) == [c["verdict"] for c in data["claims"]]
    assert [None if v != v else v for v in frame["estimate"]] == [c["estimate"] for c in data["claims"]]
    assert ids == ["single_layer", "rmsnorm_amplifies", "ffn_writes", "residual_carries", "rigidity",
                   "sinks_after_me", "wemask_weakens_sinks", "diversity", "wemask_keeps_perplexity"]
    for c in data["claims"]:
        assert set(c) >= {"id", "estimate", "ci", "n", "threshold", "verdict"} and c["verdict"] in VERDICTS
        assert len(c["ci"]) == 2 and (c["n"] == 0 or c["ci"][0] <= c["estimate"] <= c["ci"][1])
    assert data["me_layer_1based"] == ME + 1
    assert json.loads((tmp_path / "explain_config.json").read_text())["me_layer"] == ME
    for name in ("rmsnorm", "ffn", "ablations", "propagation", "rigidity_heatmaps", "diversity", "sinks_curves",
                 "wemask_curves"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "## Paper claims" in paths["markdown"].read_text()
    assert hooks_left(model) == 0 and model.config._attn_implementation != "eager"


def test_bad_inputs_are_melayer_errors():
    model = make_tiny("llama")
    with pytest.raises(MelayerError):
        rigidity(model, None, 9, tiny_inputs())
    with pytest.raises(MelayerError):
        ExplainConfig(wemask_rates=[0.5, 2.0])
    with pytest.raises(MelayerError, match="claim rate"):
        ExplainConfig(wemask_rates=[0.01], claim_rate=0.05)
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
    assert all(s > 0.99 for s in role.write_share)  # the FFN writes the whole jump of the ME block
    prop = propagation(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM])
    assert all(b.relative_change < 0.05 for b in prop.blocks[SMOL_ME + 1:27])
    norm = rmsnorm_role(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM])
    assert abs(norm.gamma_dims[0]) < 1e-3 and norm.gamma_percentile[0] < 1  # γ nearly 0 on the massive dim


@pytest.mark.real
def test_smollm2_ablations_remove_the_spike(smol, data_dir):
    model, tokenizer, inputs = smol
    windows = wikitext_windows(tokenizer, data_dir, n_tokens=64, window=64)
    base_me, base_last, base_ppl = measure(model, inputs, SMOL_ME, [SMOL_DIM], windows)
    neurons = ffn_role(model, tokenizer, SMOL_ME, inputs, [SMOL_DIM]).ablate_neurons
    with zero_neurons(model, SMOL_ME, neurons):
        me, last, ppl = measure(model, inputs, SMOL_ME, [SMOL_DIM], windows)
    assert me.abs().amax(-1).max() < 0.01 * base_me.abs().amax(-1).min()
    assert last[:, SMOL_DIM].abs().max() < 0.1 * base_last[:, SMOL_DIM].abs().min()  # the residual no longer carries it
    with shrink_ffn_product(model, SMOL_ME):  # the official code's ablation removes it too
        me, _, _ = measure(model, inputs, SMOL_ME, [SMOL_DIM])
    assert me[:, SMOL_DIM].abs().max() < 0.1 * base_me[:, SMOL_DIM].abs().min()
    with set_massive(model, SMOL_ME, [SMOL_DIM], [0.0]):
        _, _, ppl_zero = measure(model, inputs, SMOL_ME, [SMOL_DIM], windows)
    assert base_ppl < perplexity(model, windows) * (1 + 1e-6)  # restored
    assert ppl_zero > 2 * base_ppl  # Sun et al.: the massive value is needed


# -- each claim's rule: a case built to hold, one built to fail ----------------------------------------------------

def test_claim_verdict_needs_the_whole_interval_on_one_side():
    assert Check.measure("x", [0.9, 0.95, 0.92, 0.97, 0.93], 0.5).verdict == "holds"
    assert Check.measure("x", [0.1, 0.2, 0.15, 0.12], 0.5).verdict == "does_not_hold"
    straddle = Check.measure("x", [0.1, 0.9, 0.2, 0.8, 0.45, 0.55], 0.5)
    assert straddle.ci[0] < 0.5 < straddle.ci[1] and straddle.verdict == "inconclusive"
    assert Check.measure("x", [0.01, 0.012, 0.008], 0.02, "<=").verdict == "holds"
    assert Check.measure("x", [0.05, 0.06, 0.07], 0.02, "<=").verdict == "does_not_hold"
    empty = Check.measure("x", [float("nan")], 0.5)
    assert (empty.n, empty.verdict) == (0, "inconclusive")


def _ctx(results=None, **config):
    from melayer.explanation.registry import Context

    cfg = ExplainConfig(**config)
    ctx = Context(None, None, cfg, tiny_inputs(batch=4), me_layer=ME, dims=[3], results=results or {})
    return ctx


def _verdict(claims, claim_id):
    return next(c for c in claims if c.id == claim_id).verdict


def test_rule_single_layer():
    from melayer.detect import Emergence
    from melayer.explanation import emergence as em_mod

    em = Emergence("single", ME, ME + 1, ME, "first", 3)
    one = em_mod.EmergenceResult(em, "given", me_share=[0.97, 0.95, 0.99, 0.96], other_share=[0.02, 0.03, 0.01, 0.02])
    two = em_mod.EmergenceResult(em, "given", me_share=[0.34, 0.36, 0.33, 0.35], other_share=[0.58, 0.57, 0.6, 0.59])
    assert _verdict(em_mod.claims(one, _ctx()), "single_layer") == "holds"
    assert _verdict(em_mod.claims(two, _ctx()), "single_layer") == "does_not_hold"
    none = em_mod.EmergenceResult(Emergence("none", None, None, None, None, None), "given")
    claim = em_mod.claims(none, _ctx())[0]
    assert (claim.verdict, claim.n) == ("inconclusive", 0)


def test_rule_rmsnorm_ffn_residual():
    from melayer.explanation import ffn as ffn_mod
    from melayer.explanation import propagate, rmsnorm

    def norm(ratios):
        return rmsnorm.RMSNormRole(ME, "post_attention_layernorm", [3], scale_ratio_per_prompt=ratios)

    assert _verdict(rmsnorm.claims(norm([3.1, 2.9, 3.4, 3.0]), _ctx()), "rmsnorm_amplifies") == "holds"
    assert _verdict(rmsnorm.claims(norm([0.8, 0.82, 0.79, 0.81]), _ctx()), "rmsnorm_amplifies") == "does_not_hold"
    dim = ffn_mod.DimAttribution(3, 1.0, 1.0, 0.1, [5], [1.0], [1.0], {"0.5": 1, "0.9": 1, "0.99": 1})
    writes = ffn_mod.FFNRole(ME, 128, [dim], [5], write_share=[0.99, 1.0, 0.98, 0.97])
    assert _verdict(ffn_mod.claims(writes, _ctx()), "ffn_writes") == "holds"
    writes.write_share = [0.1, 0.05, 0.12, 0.08]
    assert _verdict(ffn_mod.claims(writes, _ctx()), "ffn_writes") == "does_not_hold"
    block = propagate.BlockWrite(2, [1.0], [0.0], [0.0], [1.0], 0.0)
    carried = propagate.Propagation(ME, [3], [block], 0.0, steady_share=[1.0, 0.95, 1.0, 0.9])
    assert _verdict(propagate.claims(carried, _ctx()), "residual_carries") == "holds"
    carried.steady_share = [0.3, 0.2, 0.4, 0.25]
    assert _verdict(propagate.claims(carried, _ctx()), "residual_carries") == "does_not_hold"


def test_rule_rigidity_and_its_guard():
    from melayer.explanation import rigidity as rig_mod

    def rig(gain, distinct=4):
        stream = rig_mod.StreamRigidity([], [], [], [], gain=gain, gain_rest=[0.0] * len(gain))
        return rig_mod.Rigidity(ME, [3], distinct, stream, stream)

    claim = rig_mod.claims(rig([0.5, 0.6, 0.55, 0.52]), _ctx())[0]
    assert claim.verdict == "holds" and "carried by the massive dims" in claim.note  # the control disagrees
    assert rig_mod.claims(rig([0.01, -0.02, 0.0, 0.02]), _ctx())[0].verdict == "does_not_hold"
    guard = rig_mod.claims(rig([0.5, 0.6], distinct=1), _ctx())[0]
    assert (guard.verdict, guard.n) == ("inconclusive", 0) and "same token" in guard.note


def test_rule_sinks_after_me_needs_both_tests():
    from melayer.explanation import sinks as sinks_mod

    def s(co, drop):
        return sinks_mod.Sinks(ME, [], [], [], [], co_occurrence=co, causal_drop=drop)

    assert _verdict(sinks_mod.claims(s([0.4, 0.5, 0.45, 0.42], [0.3, 0.35, 0.32, 0.31]), _ctx()), "sinks_after_me") \
        == "holds"
    assert _verdict(sinks_mod.claims(s([0.4, 0.5, 0.45, 0.42], [0.0, 0.01, -0.01, 0.0]), _ctx()), "sinks_after_me") \
        == "does_not_hold"  # co-occurs, but zeroing the massive value leaves the sinks: not caused by it
    assert _verdict(sinks_mod.claims(s([0.0, 0.02, -0.01, 0.01], [0.3, 0.35, 0.32, 0.31]), _ctx()), "sinks_after_me") \
        == "does_not_hold"


def test_rule_wemask_claims_and_layer_set_disagreement():
    from melayer.explanation import wemask_effects as we

    def cond(layers, rate, sink, erank, nll):
        return we.Condition(layers, rate, 0, ME + 1, sink, erank, [], [], [], nll)

    base = dict(sink=[0.6] * 4, erank=[10.0] * 4, nll=[100.0, 101.0, 99.0])
    w = we.WeMaskEffects(ME, [63, 63, 63], [
        cond("after_me", 0.0, **base), cond("from_after_me", 0.0, **base),
        cond("after_me", 0.05, [0.3, 0.32, 0.28, 0.31], [10.5, 10.6, 10.4, 10.5], [100.2, 101.1, 99.1]),
        cond("from_after_me", 0.05, [0.6, 0.61, 0.59, 0.6], [10.0, 10.01, 9.99, 10.0], [110.0, 112.0, 109.0])])
    ctx = _ctx({"wemask": w}, wemask_rates=[0.05], claim_rate=0.05)
    claims = {c.id: c for c in we.claims(w, ctx)}
    assert claims["wemask_weakens_sinks"].verdict == "holds"
    assert claims["wemask_weakens_sinks"].details["other_layer_sets"] == {"from_after_me": "does_not_hold"}
    assert "from_after_me layer set disagrees" in claims["wemask_weakens_sinks"].note
    assert claims["diversity"].verdict == "holds"
    assert claims["wemask_keeps_perplexity"].verdict == "holds"  # +0.4 nats over 189 tokens: ~0.2 %
    ctx = _ctx({"wemask": w}, wemask_rates=[0.05], claim_rate=0.05, claim_layers="from_after_me")
    claims = {c.id: c for c in we.claims(w, ctx)}
    assert claims["wemask_weakens_sinks"].verdict == "does_not_hold"
    assert claims["wemask_keeps_perplexity"].verdict == "does_not_hold"  # +10 nats over 189 tokens: ~5 %
