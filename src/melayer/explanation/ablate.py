"""Ablations at the ME layer: remove one ingredient at a time (and together) and see what is left of the spike.

Every ablation is a context manager around temporary hooks or a weight edit that is restored bit-exactly
on exit, even on error. Each setting reports token 0's max |h| at the ME block's output and at the last
block, and WikiText-2 perplexity on a small fixed subset.

γ flattening convention: γ_α = (1 − α)·γ + α·mean(γ) on the effective gain of the ME block's pre-FFN
norm, so α = 0 is the model itself and α = 1 a perfectly flat γ.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..adapters import adapter_for
from ..errors import MelayerError
from ..hooks import HookGroup, TokenContext, block_output
from ..report import markdown_table, new_figure, progress as progress_bar
from ..modelutils import check_layer, device_of, hidden_arg, masked_median, num_layers, rms_eps
from .registry import Analysis, Context, register_analysis
from .common import Inputs, InputsLike, as_inputs, capture_block_outputs, token0

WIKITEXT = Path("wikitext2") / "wiki.test.raw"


# -- the interventions --------------------------------------------------------------------------------

def _ffn_norm(model, layer: int):
    ad = adapter_for(model)
    if ad.ffn_norm is None:
        raise MelayerError(f"the {ad.family} family has no pre-FFN norm to ablate")
    return ad, ad.get(ad.block(model, layer), ad.ffn_norm)


@contextlib.contextmanager
def flatten_gamma(model, layer: int, alpha: float):
    """γ of the pre-FFN norm moved toward its mean by ``alpha`` (weight edit, restored on exit)."""
    if not 0.0 <= alpha <= 1.0:
        raise MelayerError(f"γ-flatten alpha must be in [0, 1], got {alpha}")
    ad, norm = _ffn_norm(model, layer)
    saved = norm.weight.detach().clone()
    gain = ad.norm_gain(norm)
    flat = (1 - alpha) * gain + alpha * gain.mean()
    try:
        with torch.no_grad():
            norm.weight.copy_((flat - ad.norm_gain_offset).to(norm.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


@contextlib.contextmanager
def zero_neurons(model, layer: int, neurons: Sequence[int]):
    """The given FFN neurons of the block silenced for every token (pre-hook on the down projection)."""
    ad = adapter_for(model)
    down = getattr(ad.mlp_module(ad.block(model, layer)), ad.down)
    idx = torch.as_tensor(list(neurons), dtype=torch.long, device=down.weight.device)

    def pre(module, args):
        return (args[0].index_fill(-1, idx, 0.0), *args[1:])

    with HookGroup() as hooks:
        hooks.pre(down, pre)
        yield


@contextlib.contextmanager
def normalise_scale(model, layer: int):
    """Token 0's RMSNorm scale 1/rms(h) at the pre-FFN norm replaced by the median scale of the other tokens."""
    _, norm = _ffn_norm(model, layer)
    eps = rms_eps(norm)
    hooks = HookGroup()
    ctx = TokenContext(model, hooks)

    def hook(module, args, kwargs, out):
        scale = torch.rsqrt(hidden_arg(args, kwargs).float().pow(2).mean(-1) + eps)
        first = ctx.first_token()
        target = masked_median(scale, ctx.valid & ~first)[:, None]
        factor = torch.where(first, target / scale, torch.ones_like(scale))
        return (out.float() * factor[..., None]).to(out.dtype)

    hooks.forward(norm, hook, with_kwargs=True)
    with hooks:
        yield


@contextlib.contextmanager
def cap_ffn_output(model, layer: int, c: float):
    """Token 0's FFN output norm capped at c × the median FFN output norm of the other tokens."""
    if c <= 0:
        raise MelayerError(f"FFN cap factor must be positive, got {c}")
    ad = adapter_for(model)
    hooks = HookGroup()
    ctx = TokenContext(model, hooks)

    def hook(module, args, out):
        norms = out.float().norm(dim=-1)
        first = ctx.first_token()
        cap = c * masked_median(norms, ctx.valid & ~first)[:, None]
        factor = torch.where(first, (cap / norms.clamp(min=1e-30)).clamp(max=1.0), torch.ones_like(norms))
        return (out.float() * factor[..., None]).to(out.dtype)

    hooks.forward(ad.mlp_module(ad.block(model, layer)), hook)
    with hooks:
        yield


def _ffn_product_hook(model, layer: int, scale_fn):
    """A pre-hook on the ME block's down projection that rescales each token's FFN product act(gate)·up."""
    ad = adapter_for(model)
    hooks = HookGroup()
    ctx = TokenContext(model, hooks)

    def pre(module, args):
        prod = args[0]
        rms = prod.float().pow(2).mean(-1).add(1e-6).sqrt()  # (B, T)
        factor = scale_fn(rms, ctx).masked_fill(~ctx.valid, 1.0)
        return ((prod.float() * factor[..., None]).to(prod.dtype), *args[1:])

    hooks.pre(getattr(ad.mlp_module(ad.block(model, layer)), ad.down), pre)
    return hooks


@contextlib.contextmanager
def shrink_ffn_product(model, layer: int):
    """The official code's ablation: every token's FFN product scaled to the median RMS of the other tokens,
    never enlarged (so token 0, whose product is largest, shrinks most)."""
    def scale(rms, ctx):
        ref = masked_median(rms, ctx.valid & ~ctx.first_token())[:, None]
        return (ref / rms).clamp(max=1.0)

    with _ffn_product_hook(model, layer, scale):
        yield


@contextlib.contextmanager
def normalise_ffn_product(model, layer: int):
    """The official code's other ablation: every token's FFN product RMS-normalised to 1."""
    with _ffn_product_hook(model, layer, lambda rms, ctx: 1.0 / rms):
        yield


@contextlib.contextmanager
def set_massive(model, layer: int, dims: Sequence[int], values: Sequence[float]):
    """Sun et al.'s test: token 0's values on ``dims`` at the block's output overwritten with ``values``."""
    ad = adapter_for(model)
    hooks = HookGroup()
    ctx = TokenContext(model, hooks)

    def hook(module, args, output):
        h = block_output(output)
        dim_sel = torch.zeros(h.shape[-1], dtype=torch.bool, device=h.device)
        dim_sel[list(dims)] = True
        full = torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device)
        full[list(dims)] = torch.as_tensor(list(values), dtype=h.dtype, device=h.device)
        new = torch.where(ctx.first_token()[..., None] & dim_sel, full, h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    hooks.forward(ad.block(model, layer), hook)
    with hooks:
        yield


# -- measurement ----------------------------------------------------------------------------------------

def wikitext_windows(tokenizer, data_dir: str | Path, n_tokens: int = 2048, window: int = 256) -> torch.Tensor:
    """(W, window) token windows from the start of WikiText-2's test split; BOS first when the model uses one."""
    data_dir = Path(data_dir)
    path = next((p for p in (data_dir / WIKITEXT, data_dir / WIKITEXT.name, data_dir) if p.is_file()), None)
    if path is None:
        raise MelayerError(f"WikiText-2 not found: expected {data_dir / WIKITEXT}")
    if window < 2 or n_tokens < window:
        raise MelayerError(f"need window >= 2 and ppl tokens >= window, got {n_tokens} tokens, window {window}")
    bos = tokenizer.bos_token_id
    uses_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    body = window - 1 if uses_bos else window
    count = n_tokens // window
    text = path.read_text(encoding="utf-8")[: 12 * body * count + 1000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = min(count, len(ids) // body)
    if count == 0:
        raise MelayerError(f"{path} is too short for one window of {window} tokens")
    rows = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if uses_bos:
        rows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over all windows (``batch`` windows per forward to bound logits memory)."""
    device = device_of(model)
    nll, count = 0.0, 0
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                       reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@dataclass
class AblationRow:
    name: str
    group: str  # "baseline", "rmsnorm", "ffn", "joint", "sun", "control"
    description: str
    token0_max_me: float  # mean over prompts of token 0's max |h| at the ME block's output
    token0_max_last: float  # … at the last block's output (before the final norm)
    token0_dims_me: list[float] = field(default_factory=list)  # token 0 on the massive dims, ME output
    token0_dims_last: list[float] = field(default_factory=list)
    ppl: Optional[float] = None  # WikiText-2 perplexity (None: not measured)
    spike_left: float = float("nan")  # mean over prompts of token 0's max |h| at the ME output / the baseline's
    spike_left_per_prompt: list[float] = field(default_factory=list)


@dataclass
class Ablations:
    me_layer: int
    dims: list[int]
    neurons: list[int]
    random_neurons: list[int]
    cap: float
    sun_mean_values: list[float]  # the per-dim means over inputs used by the "set to mean" test
    ppl_windows: int
    ppl_window_tokens: int
    rows: list[AblationRow]
    alpha_convention: str = "γ_α = (1 − α)·γ + α·mean(γ); α = 0 is the unmodified model (the baseline row)"

    def row(self, name: str) -> AblationRow:
        return next(r for r in self.rows if r.name == name)


@torch.no_grad()
def measure(model, inputs: Inputs, me_layer: int, dims: Sequence[int],
            windows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, Optional[float]]:
    """Token 0's block outputs (B, D) at the ME block and the last block, on the prompts, and the WikiText-2
    perplexity of the windows (None without windows)."""
    last = num_layers(model) - 1
    outs = capture_block_outputs(model, inputs, sorted({me_layer, last}))
    return token0(outs[me_layer], inputs), token0(outs[last], inputs), (perplexity(model, windows)
                                                                        if windows is not None else None)


def ablations(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int], neurons: Sequence[int],
              windows: Optional[torch.Tensor] = None, alphas: Sequence[float] = (0.0, 0.5, 1.0), cap: float = 2.0,
              seed: int = 0, progress: bool = True) -> Ablations:
    """Run every ablation (alone and jointly) and the baseline; all restore the model on exit."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    dims, neurons = list(dims), list(neurons)
    if not neurons:
        raise MelayerError("no FFN neurons to ablate")
    inter = adapter_for(model).ffn_weights(adapter_for(model).block(model, me_layer))[2].shape[1]
    gen = torch.Generator().manual_seed(seed)
    chosen = set(neurons)
    pool = torch.tensor([j for j in range(inter) if j not in chosen])
    random_neurons = pool[torch.randperm(len(pool), generator=gen)[: len(neurons)]].sort().values.tolist()
    me0 = token0(capture_block_outputs(model, inputs, [me_layer])[me_layer], inputs)
    sun_mean = me0[:, dims].mean(0).tolist()
    has_norm = adapter_for(model).ffn_norm is not None
    n = len(neurons)

    settings: list[tuple[str, str, str, Callable[[], contextlib.AbstractContextManager]]] = [
        ("baseline", "baseline", "unmodified model (γ flatten α = 0)", contextlib.nullcontext)]
    if has_norm:
        settings += [(f"gamma_flatten_{a:g}", "rmsnorm", f"pre-FFN γ flattened toward its mean, α = {a:g}",
                      lambda a=a: flatten_gamma(model, me_layer, a)) for a in alphas if a > 0]
        settings.append(("rms_scale", "rmsnorm", "token 0's 1/rms scale set to the other tokens' median",
                         lambda: normalise_scale(model, me_layer)))
    settings += [
        (f"zero_top{n}_neurons", "ffn", f"the top {n} attributed FFN neurons zeroed",
         lambda: zero_neurons(model, me_layer, neurons)),
        (f"zero_random{n}_neurons", "control", f"{n} random other FFN neurons zeroed",
         lambda: zero_neurons(model, me_layer, random_neurons)),
        ("shrink_ffn_product", "ffn", "each token's FFN product act(gate)·up shrunk to the others' median RMS "
         "(never enlarged; the official code's ablation)", lambda: shrink_ffn_product(model, me_layer)),
        ("normalise_ffn_product", "ffn", "each token's FFN product act(gate)·up RMS-normalised (the official "
         "code's ablation)", lambda: normalise_ffn_product(model, me_layer)),
        (f"cap_ffn_{cap:g}x", "ffn", f"token 0's FFN output norm capped at {cap:g} × the others' median",
         lambda: cap_ffn_output(model, me_layer, cap)),
    ]
    if has_norm:
        settings += [
            (f"gamma_flatten_1+zero_top{n}", "joint", "γ flattened (α = 1) and the top neurons zeroed",
             lambda: _joint(flatten_gamma(model, me_layer, 1.0), zero_neurons(model, me_layer, neurons))),
            (f"rms_scale+zero_top{n}", "joint", "token 0's scale normalised and the top neurons zeroed",
             lambda: _joint(normalise_scale(model, me_layer), zero_neurons(model, me_layer, neurons))),
        ]
    settings += [
        ("sun_zero", "sun", "token 0's massive values set to 0 at the ME output",
         lambda: set_massive(model, me_layer, dims, [0.0] * len(dims))),
        ("sun_mean", "sun", "token 0's massive values set to their mean over inputs at the ME output",
         lambda: set_massive(model, me_layer, dims, sun_mean)),
    ]
    rows, base = [], None
    for name, group, desc, make in progress_bar(settings, desc="ablations", disable=not progress):
        with make():
            me_out, last_out, ppl = measure(model, inputs, me_layer, dims, windows)
        peak = me_out.abs().amax(-1)
        base = peak if base is None else base
        left = (peak / base.clamp(min=1e-30)).tolist()
        rows.append(AblationRow(name, group, desc, float(peak.mean()), float(last_out.abs().amax(-1).mean()),
                                me_out[:, dims].mean(0).tolist(), last_out[:, dims].mean(0).tolist(), ppl,
                                sum(left) / len(left), left))
    return Ablations(me_layer, dims, neurons, random_neurons, cap, sun_mean,
                     0 if windows is None else int(windows.shape[0]),
                     0 if windows is None else int(windows.shape[1]), rows)


@contextlib.contextmanager
def _joint(*managers):
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


# -- in the explain report ----------------------------------------------------------------------------------

def run(ctx: Context) -> Ablations:
    c = ctx.config
    return ablations(ctx.model, ctx.tokenizer, ctx.me_layer, ctx.inputs, ctx.dims,
                     ctx.results["ffn"].ablate_neurons, ctx.windows, c.gamma_alphas, c.ffn_cap, c.seed, ctx.progress)


def section(ab: Ablations, ctx: Context) -> list[str]:
    me, dims = ctx.me_layer, ctx.dims
    ppl_note = (f"WikiText-2 perplexity on {ab.ppl_windows} windows of {ab.ppl_window_tokens} tokens"
                if ab.ppl_windows else "perplexity not measured (no --ppl-data-dir)")
    return [f"Token 0's max |h| at the ME output (block {me}) and the last block, mean over the prompts; "
            f"spike left = that max over the baseline's, per prompt, then averaged; {ppl_note}. "
            f"{ab.alpha_convention}. FFN cap c = {ab.cap:g}. Sun et al.'s mean values: "
            f"{[round(v, 2) for v in ab.sun_mean_values]}.", "",
            markdown_table(["setting", "group", "max |h| tok0 @ME", "spike left", "max |h| tok0 @last",
                            f"dim {dims[0]} @ME", f"dim {dims[0]} @last", "PPL"],
                           [(x.name, x.group, x.token0_max_me, x.spike_left, x.token0_max_last,
                             x.token0_dims_me[0], x.token0_dims_last[0], x.ppl) for x in ab.rows]),
            "![ablations](ablations.png)", ""]


def figures(ab: Ablations, ctx: Context) -> dict:
    with_ppl = ab.ppl_windows > 0
    fig, axes = new_figure(1, 2 if with_ppl else 1, figsize=(11 if with_ppl else 6.5, 0.35 * len(ab.rows) + 1.5),
                           sharey=True, squeeze=False)
    a = axes[0, 0]
    names = [x.name for x in ab.rows][::-1]
    y = range(len(names))
    a.barh([v - 0.2 for v in y], [x.token0_max_me for x in ab.rows][::-1], 0.4,
           label=f"ME output (block {ctx.me_layer})")
    a.barh([v + 0.2 for v in y], [x.token0_max_last for x in ab.rows][::-1], 0.4, label="last block")
    a.set_xscale("log")
    a.set_yticks(list(y), names, fontsize=8)
    a.set(xlabel="token 0 max |h|")
    a.legend(fontsize=8)
    if with_ppl:
        b = axes[0, 1]
        b.barh(list(y), [x.ppl for x in ab.rows][::-1], color="C2")
        b.set_xscale("log")
        b.set(xlabel="WikiText-2 perplexity")
    return {"ablations": fig}


ANALYSIS = register_analysis(Analysis("ablations", "Ablations at the ME layer", run, section=section,
                                      figures=figures, needs=("ffn",)))
