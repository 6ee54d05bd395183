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
from .common import (Inputs, InputsLike, as_inputs, capture_block_outputs, check_layer, hidden_arg,
                     masked_median, model_device, num_layers, rms_eps, token0)

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
    device = model_device(model)
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
    token0_max_me: float  # mean over windows (or prompts) of token 0's max |h| at the ME block's output
    token0_max_last: float  # … at the last block's output (before the final norm)
    token0_dims_me: list[float] = field(default_factory=list)  # token 0 on the massive dims, ME output
    token0_dims_last: list[float] = field(default_factory=list)
    ppl: Optional[float] = None
    spike_left: float = float("nan")  # token0_max_me / baseline's (1 = untouched, 0 = gone)


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
    measured_on: str  # where token 0's values come from: "WikiText-2 windows" or "prompts"
    rows: list[AblationRow]
    alpha_convention: str = "γ_α = (1 − α)·γ + α·mean(γ); α = 0 is the unmodified model (the baseline row)"

    def row(self, name: str) -> AblationRow:
        return next(r for r in self.rows if r.name == name)


@torch.no_grad()
def measure(model, inputs: Inputs, me_layer: int, dims: Sequence[int],
            windows: Optional[torch.Tensor] = None) -> tuple[float, float, list[float], list[float], Optional[float]]:
    """Token 0's max |h| and massive-dim values at the ME and last block outputs, and perplexity.

    With WikiText windows, token 0 is read from the very forward passes that give the perplexity (one pass
    per setting; every window starts at its token 0); without them, from the prompts.
    """
    last = num_layers(model) - 1
    if windows is None:
        outs = capture_block_outputs(model, inputs, sorted({me_layer, last}))
        me0, last0, ppl = token0(outs[me_layer], inputs), token0(outs[last], inputs), None
    else:
        layers = adapter_for(model).layers(model)
        rows: dict[int, list[torch.Tensor]] = {me_layer: [], last: []}
        with HookGroup() as hooks:
            for i in rows:
                hooks.forward(layers[i], lambda m, a, o, i=i: rows[i].append(block_output(o)[:, 0].float().cpu()))
            ppl = perplexity(model, windows)
        me0, last0 = torch.cat(rows[me_layer]), torch.cat(rows[last])
    return (float(me0.abs().amax(-1).mean()), float(last0.abs().amax(-1).mean()),
            me0[:, list(dims)].mean(0).tolist(), last0[:, list(dims)].mean(0).tolist(), ppl)


def ablations(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int], neurons: Sequence[int],
              windows: Optional[torch.Tensor] = None, alphas: Sequence[float] = (0.0, 0.5, 1.0), cap: float = 2.0,
              seed: int = 0, progress: bool = True) -> Ablations:
    """Run every ablation (alone and jointly) and the baseline; all restore the model on exit."""
    from ..report import progress as bar

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
    rows = []
    for name, group, desc, make in bar(settings, desc="ablations", disable=not progress):
        with make():
            values = measure(model, inputs, me_layer, dims, windows)
        rows.append(AblationRow(name, group, desc, *values))
    base = rows[0].token0_max_me
    for r in rows:
        r.spike_left = r.token0_max_me / base if base else float("nan")
    return Ablations(me_layer, dims, neurons, random_neurons, cap, sun_mean,
                     0 if windows is None else int(windows.shape[0]),
                     0 if windows is None else int(windows.shape[1]),
                     "prompts" if windows is None else "WikiText-2 windows", rows)


@contextlib.contextmanager
def _joint(*managers):
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield
