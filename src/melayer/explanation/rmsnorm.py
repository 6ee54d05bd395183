"""RMSNorm's role at the ME layer: how the pre-FFN norm rescales token 0 and what γ does on the massive dims.

RMSNorm computes γ ⊙ x̂ with x̂ = h · s and s = 1/rms(h). A token whose residual has a small RMS gets a large
scale s, so its normalised input to the FFN is amplified; γ then weights each dim. We measure s per token,
where γ of the massive dims sits in the distribution of |γ|, and x̂ vs γ ⊙ x̂ on those dims.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup
from ..modelutils import check_layer, hidden_arg, masked_median, rms_eps
from ..report import markdown_table, new_figure
from .claims import Check, make_claim, not_measured
from .common import InputsLike, as_inputs, run_decoder
from .registry import Analysis, Context, register_analysis


@dataclass
class RMSNormRole:
    me_layer: int
    norm: Optional[str]  # attribute name of the pre-FFN norm (None: the family has none)
    dims: list[int]
    applicable: bool = True
    scale_token0: float = float("nan")  # mean over inputs of 1/rms(h) of token 0
    scale_others: float = float("nan")  # mean over inputs of the median 1/rms(h) of the other tokens
    scale_ratio: float = float("nan")  # scale_token0 / scale_others
    scale_ratio_per_prompt: list[float] = field(default_factory=list)  # each prompt's own ratio
    rms_token0: float = float("nan")
    rms_others: float = float("nan")
    scale_by_position: list[float] = field(default_factory=list)  # mean 1/rms per position from token 0
    gamma: list[float] = field(default_factory=list)  # effective γ of the norm (all dims)
    gamma_dims: list[float] = field(default_factory=list)  # γ on the massive dims
    gamma_percentile: list[float] = field(default_factory=list)  # share of dims with |γ| below |γ_d| (0-100)
    gamma_abs_median: float = float("nan")
    h_token0: list[float] = field(default_factory=list)  # norm input (residual) of token 0 on the dims
    h_others: list[float] = field(default_factory=list)  # mean |h| of the other tokens on the dims
    xhat_token0: list[float] = field(default_factory=list)  # x̂ = h / rms(h), token 0, per dim
    xhat_others: list[float] = field(default_factory=list)  # mean |x̂| of the other tokens
    gxhat_token0: list[float] = field(default_factory=list)  # γ ⊙ x̂ (the FFN input), token 0
    gxhat_others: list[float] = field(default_factory=list)
    ffn_input_norm_token0: float = float("nan")  # ||γ ⊙ x̂|| of token 0 (all dims)
    ffn_input_norm_others: float = float("nan")
    note: str = ""


def decompose(norm_input: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale s = 1/rms(h) (B,T), x̂ = h·s (B,T,D), γ ⊙ x̂) in fp32."""
    h = norm_input.float()
    scale = torch.rsqrt(h.pow(2).mean(-1) + eps)
    xhat = h * scale[..., None]
    return scale, xhat, xhat * gain.to(h.device)


@torch.no_grad()
def rmsnorm_role(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int],
                 max_positions: int = 32) -> RMSNormRole:
    """Decompose the ME block's pre-FFN RMSNorm into scale, x̂ and γ for token 0 vs the other tokens."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    ad = adapter_for(model)
    dims = list(dims)
    if ad.ffn_norm is None:
        return RMSNormRole(me_layer, None, dims, applicable=False,
                           note=f"the {ad.family} family's FFN reads the raw residual (no pre-FFN norm)")
    block = ad.block(model, me_layer)
    norm = ad.get(block, ad.ffn_norm)
    seen: dict[str, torch.Tensor] = {}
    with HookGroup() as hooks:
        hooks.pre(norm, lambda m, a, k: seen.__setitem__("h", hidden_arg(a, k).detach().float().cpu()),
                  with_kwargs=True)
        run_decoder(model, inputs)
    gain = ad.norm_gain(norm).cpu()
    scale, xhat, gxhat = decompose(seen["h"], gain, rms_eps(norm))
    first, others = inputs.first_sel, inputs.other_sel
    rows = torch.arange(len(inputs))

    def tok0(x: torch.Tensor) -> list[float]:
        return x[rows, inputs.first][:, dims].mean(0).tolist()

    def rest_abs(x: torch.Tensor) -> list[float]:
        a = x[:, :, dims].abs() * others[..., None]
        return (a.sum((0, 1)) / others.sum()).tolist()

    s0 = scale[first]
    s_rest = masked_median(scale, others)
    rms = 1.0 / scale
    ffn_in_norm = gxhat.norm(dim=-1)
    abs_gain = gain.abs()
    by_pos = []
    for p in range(max_positions):
        cols = inputs.first + p
        ok = cols < inputs.input_ids.shape[1]
        if not ok.any():
            break
        by_pos.append(float(scale[rows[ok], cols[ok]].mean()))
    return RMSNormRole(
        me_layer=me_layer, norm=ad.ffn_norm, dims=dims,
        scale_token0=float(s0.mean()), scale_others=float(s_rest.mean()),
        scale_ratio=float(s0.mean() / s_rest.mean()),
        scale_ratio_per_prompt=(s0 / s_rest).tolist(),
        rms_token0=float(rms[first].mean()), rms_others=float(masked_median(rms, others).mean()),
        scale_by_position=by_pos,
        gamma=gain.tolist(), gamma_dims=gain[dims].tolist(),
        gamma_percentile=[float((abs_gain < abs_gain[d]).float().mean() * 100) for d in dims],
        gamma_abs_median=float(abs_gain.median()),
        h_token0=tok0(seen["h"]), h_others=rest_abs(seen["h"]),
        xhat_token0=tok0(xhat), xhat_others=rest_abs(xhat),
        gxhat_token0=tok0(gxhat), gxhat_others=rest_abs(gxhat),
        ffn_input_norm_token0=float(ffn_in_norm[first].mean()),
        ffn_input_norm_others=float(ffn_in_norm[others].mean()),
    )


# -- in the explain report ----------------------------------------------------------------------------------

AMPLIFY = 2.0  # RMSNorm "amplifies" token 0 when its 1/rms scale is at least twice the ordinary tokens'


def run(ctx: Context) -> RMSNormRole:
    return rmsnorm_role(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, ctx.dims)


def claims(n: RMSNormRole, ctx: Context) -> list:
    statement = "RMSNorm amplifies token 0 at the ME layer (its pre-FFN scale exceeds the ordinary tokens')"
    unit = "token 0's 1/rms(h) at the ME block's pre-FFN norm ÷ the median of the other tokens' (per prompt)"
    rule = f"holds when the ratio's 95% CI lies above {AMPLIFY:g}"
    scope = f"block {ctx.me_layer} (paper: {ctx.me_layer + 1}), {len(ctx.inputs)} prompts"
    if not n.applicable:
        return [not_measured("rmsnorm_amplifies", statement, unit, rule, scope, AMPLIFY, n.note)]
    details = {"gamma_on_massive_dims": dict(zip(map(str, n.dims), n.gamma_dims)),
               "gamma_abs_percentile": dict(zip(map(str, n.dims), n.gamma_percentile))}
    ab = ctx.results.get("ablations")
    if ab is not None:
        details["spike_left"] = {r.name: r.spike_left for r in ab.rows if r.group == "rmsnorm"}
    test = Check.measure("scale_ratio", n.scale_ratio_per_prompt, AMPLIFY, ">=", seed=ctx.config.seed)
    return [make_claim("rmsnorm_amplifies", statement, [test], unit, rule, scope, details=details)]


def section(n: RMSNormRole, ctx: Context) -> list[str]:
    if not n.applicable:
        return [n.note, ""]
    return [f"Scale 1/rms(h): token 0 {n.scale_token0:.4g}, other tokens (median) {n.scale_others:.4g}, "
            f"ratio {n.scale_ratio:.3f} (rms {n.rms_token0:.4g} vs {n.rms_others:.4g}). "
            f"‖γ⊙x̂‖ (the FFN input): token 0 {n.ffn_input_norm_token0:.4g}, others {n.ffn_input_norm_others:.4g}. "
            f"Median |γ| = {n.gamma_abs_median:.4g}.", "",
            markdown_table(["dim", "γ", "|γ| percentile", "h tok0", "|h| others", "x̂ tok0", "|x̂| others",
                            "γ⊙x̂ tok0", "|γ⊙x̂| others"],
                           zip(n.dims, n.gamma_dims, n.gamma_percentile, n.h_token0, n.h_others,
                               n.xhat_token0, n.xhat_others, n.gxhat_token0, n.gxhat_others)),
            "![RMSNorm](rmsnorm.png)", ""]


def figures(n: RMSNormRole, ctx: Context) -> dict:
    if not n.applicable:
        return {}
    fig, (a, b) = new_figure(1, 2, figsize=(10, 3.6))
    pos = list(range(len(n.scale_by_position)))
    a.bar(pos, n.scale_by_position, color=["C3"] + ["C0"] * (len(pos) - 1))
    a.set(xlabel="position (0 = token 0)", ylabel="1 / rms(h)", title=f"RMS scale at block {ctx.me_layer}'s pre-FFN norm")
    b.hist(n.gamma, bins=60, color="C0")
    for dd, gv in zip(n.dims, n.gamma_dims):
        b.axvline(gv, color="C3", lw=1.5, label=f"dim {dd}: γ={gv:.3g}")
    b.set(xlabel="γ (effective gain)", ylabel="dims", title="γ of the pre-FFN norm")
    b.legend(fontsize=8)
    return {"rmsnorm": fig}


ANALYSIS = register_analysis(Analysis("rmsnorm", "RMSNorm at the ME layer (pre-FFN norm)", run, claims, section,
                                      figures, needs=("emergence",)))
