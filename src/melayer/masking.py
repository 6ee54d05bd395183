"""WeMask: zero the top-k dims of the first token's attention input in the block(s) after the ME layer.

Correct by construction: a forward pre-hook on each target block's attention module rewrites only
that module's input (the pre-attention norm's output, γ included), so the residual stream and the
FFN input stay untouched. The first token is found by absolute position (:class:`TokenContext`),
so during cached decoding new tokens are never masked while the cached K/V of position 0 stay
masked, and left-padded batches equal their unbatched sequences. ``mode="paper"`` reproduces the
official code instead: index 0 of every chunk, one dim set per batch (top-k of the batch mean); with
``per_sequence=True`` each sequence of a padded batch gets exactly what that code does to it run alone.
The hooks are tensor-only (no host syncs) and out-of-place, so they work under torch.compile,
in ``generate`` and in training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .adapters import adapter_for, base_model
from .errors import MelayerError
from .hooks import HookGroup, TokenContext
from .io import atomic_write_json, read_config_json
from .modelutils import hidden_arg, hidden_size, replace_hidden_arg
from .scanning import find_me_layer

LAYER_CHOICES = ("after_me", "from_after_me", "me")
SCORES = ("activation", "gamma")
MODES = ("correct", "paper")
CONFIG_NAME = "wemask_config.json"


@dataclass
class WeMaskConfig:
    """Which dims of the first token to mask, where, and how hard.

    ``rate``: fraction of the hidden size masked (k = floor(rate x hidden)); ``layers``: "after_me",
    "from_after_me", "me" or explicit 0-based block indices; ``score``: rank dims by |attention input|
    ("activation") or by |γ| of the pre-attention norm ("gamma"); ``gamma``: masked dims are multiplied
    by it (0 = hard zeroing, the paper); ``mode``: "correct" or "paper"; ``me_layer``: the ME block
    (None: found by ``melayer.scanning.find_me_layer``).
    """

    rate: float = 0.0
    layers: Union[str, list[int]] = "after_me"
    score: str = "activation"
    gamma: float = 0.0
    mode: str = "correct"
    me_layer: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0.0 <= self.rate <= 1.0:
            raise MelayerError(f"WeMask rate must be a number in [0, 1], got {self.rate!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.0 <= self.gamma <= 1.0:
            raise MelayerError(f"WeMask gamma must be a number in [0, 1], got {self.gamma!r}")
        if self.score not in SCORES:
            raise MelayerError(f"WeMask score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.mode not in MODES:
            raise MelayerError(f"WeMask mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.me_layer is not None and (not _is_int(self.me_layer) or self.me_layer < 0):
            raise MelayerError(f"WeMask me_layer must be a non-negative integer, got {self.me_layer!r}")
        if isinstance(self.layers, str):
            if self.layers not in LAYER_CHOICES:
                raise MelayerError(f"WeMask layers must be {', '.join(LAYER_CHOICES)} or a list of block indices, "
                                   f"got {self.layers!r}")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(_is_int(i) and i >= 0 for i in self.layers):
                raise MelayerError(f"WeMask layers must be a non-empty list of non-negative block indices, "
                                   f"got {list(self.layers)!r}")
            self.layers = sorted(set(int(i) for i in self.layers))
        else:
            raise MelayerError(f"WeMask layers must be a string or a list of block indices, got {self.layers!r}")

    def k(self, hidden_size: int) -> int:
        """Number of masked dims (floor, like the paper); 0 means WeMask is a no-op."""
        return int(math.floor(self.rate * hidden_size + 1e-9))

    @property
    def is_resolved(self) -> bool:
        return not isinstance(self.layers, str)

    def resolve_layers(self, num_layers: int, me_layer: Optional[int] = None) -> list[int]:
        """The 0-based target blocks for a model with ``num_layers`` blocks and the given ME block."""
        if isinstance(self.layers, str):
            me = self.me_layer if me_layer is None else me_layer
            if me is None:
                raise MelayerError(f"WeMask layers={self.layers!r} needs the ME layer; pass me_layer")
            if not 0 <= me < num_layers:
                raise MelayerError(f"ME layer {me} is outside the model's {num_layers} blocks")
            if self.layers == "me":
                return [me]
            if me + 1 >= num_layers:
                raise MelayerError(f"the ME layer {me} is the last block: there is no block after it to mask")
            return [me + 1] if self.layers == "after_me" else list(range(me + 1, num_layers))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise MelayerError(f"WeMask layers {bad} are outside the model's {num_layers} blocks (0-based)")
        return list(self.layers)

    def resolved(self, model, tokenizer=None) -> "WeMaskConfig":
        """A copy with explicit layers (and the ME layer found once), so a reload never re-scans."""
        if self.is_resolved:
            return dataclasses.replace(self)
        me = self.me_layer if self.me_layer is not None else _find_me_layer(model, tokenizer)
        layers = self.resolve_layers(len(adapter_for(model).layers(model)), me)
        return dataclasses.replace(self, layers=layers, me_layer=me)

    def save(self, directory, model=None, tokenizer=None) -> Path:
        """Write ``directory/wemask_config.json`` atomically, with layers resolved (``model`` resolves them)."""
        cfg = self
        if not self.is_resolved and self.rate > 0:
            if model is None:
                raise MelayerError("save a resolved WeMask config: use handle.config.save(dir) or pass model=")
            cfg = self.resolved(model, tokenizer)
        return atomic_write_json(Path(directory) / CONFIG_NAME, dataclasses.asdict(cfg))

    @classmethod
    def load(cls, path) -> "WeMaskConfig":
        """Read a saved config from its JSON file or from the folder holding it."""
        fields = read_config_json(cls, path, CONFIG_NAME, "WeMask config")
        try:
            return cls(**fields)
        except MelayerError as e:
            file = Path(path) / CONFIG_NAME if Path(path).is_dir() else Path(path)
            raise MelayerError(f"{file}: {e}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _find_me_layer(model, tokenizer) -> int:
    return int(find_me_layer(model, tokenizer))


# model -> the WeMask handles applied to it and not yet removed (weak: no attribute on the model)
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def active_wemasks(model) -> list["WeMaskHandle"]:
    """The WeMasks applied to ``model`` (or its PEFT wrapper's base) and not yet removed, oldest first."""
    return list(_ACTIVE.get(base_model(model), []))


class WeMaskHandle:
    """The hooks of one applied WeMask: ``remove()`` restores the model exactly."""

    def __init__(self, config: WeMaskConfig, layers: list[int], k: int, hooks, counters: dict[int, torch.Tensor],
                 model=None, switch: Optional[dict] = None):
        self.config = config
        self.layers = layers
        self.k = k
        self._hooks = hooks
        self._counters = counters
        self._switch = switch if switch is not None else {"on": True}
        self._model = weakref.ref(base_model(model)) if model is not None else None
        if self._model is not None:
            _ACTIVE.setdefault(self._model(), []).append(self)

    @property
    def fired(self) -> int:
        """Tokens masked so far, summed over target blocks (reading it syncs the device; the hooks never do)."""
        return int(sum(int(c.item()) for c in self._counters.values()))

    def fired_per_layer(self) -> dict[int, int]:
        return {i: int(c.item()) for i, c in self._counters.items()}

    def reset(self) -> None:
        for c in self._counters.values():
            c.zero_()

    @contextlib.contextmanager
    def paused(self):
        """The model runs unmasked inside the block (the hooks stay registered and resume on exit): a DPO
        reference forward through the policy's own modules, say."""
        previous = self._switch["on"]
        self._switch["on"] = False
        try:
            yield self
        finally:
            self._switch["on"] = previous

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        model = self._model() if self._model is not None else None
        if model is not None and self in _ACTIVE.get(model, []):
            _ACTIVE[model].remove(self)

    def __enter__(self) -> "WeMaskHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        c = self.config
        return (f"WeMaskHandle(rate={c.rate}, k={self.k}, layers={self.layers}, mode={c.mode!r}, "
                f"score={c.score!r}, gamma={c.gamma})")


def _apply(x: torch.Tensor, where: torch.Tensor, gamma: float) -> torch.Tensor:
    """x with the selected entries multiplied by gamma (hard zero for 0); out-of-place for autograd."""
    return x.masked_fill(where, 0.0) if gamma == 0 else torch.where(where, x * gamma, x)


def _dim_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries along the last dim."""
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, idx, True)


def _token_scores(x: torch.Tensor, index: torch.Tensor, gain_fn) -> torch.Tensor:
    """(B, H) ranking scores: |γ| (the same for every row) or |x| at each row's chunk index ``index`` (B,)."""
    if gain_fn is not None:
        return gain_fn().to(x.device).abs().expand(x.shape[0], -1)
    return x.gather(1, index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1).abs()


def _correct_hook(ctx, k: int, gamma: float, gain_fn, counter: torch.Tensor):
    def hook(module, args, kwargs):
        x = hidden_arg(args, kwargs)
        sel = ctx.first_token().to(x.device)  # (B, L): each sequence's first real token, if in this chunk
        row = sel.int().argmax(dim=1)  # chunk index of the first token (0 when absent: unused)
        score = _token_scores(x, row, gain_fn)
        score = score if gain_fn is not None else score.float()  # activations ranked in fp32
        where = sel.unsqueeze(-1) & _dim_mask(score, k).unsqueeze(1)
        counter.add_(sel.sum())
        return replace_hidden_arg(args, kwargs, _apply(x, where, gamma))

    return hook


def _paper_hook(k: int, gamma: float, gain_fn, counter: torch.Tensor, ctx=None):
    """The official mask: index 0 of every chunk, one dim set per batch (top-k of the batch mean).

    With ``ctx`` (``per_sequence``) each sequence gets what the official code does to it when it runs alone,
    which is how the paper evaluated: its chunk's first real token is masked (the first token in the prefill,
    every new token while decoding), with the top-k of that token's own |x|. A left-padded batch then equals
    its items run one at a time through the literal hook.
    """
    def hook(module, args, kwargs):
        x = hidden_arg(args, kwargs)
        positions = torch.arange(x.shape[1], device=x.device)
        if ctx is None:
            # the official code ranks in the model's dtype: so do we, to pick the very same dims
            score = gain_fn().to(x.device).abs() if gain_fn is not None else x[:, 0, :].abs().mean(dim=0)
            where = (positions == 0).view(1, -1, 1) & _dim_mask(score, k).view(1, 1, -1)
            counter.add_(x.shape[0])
        else:
            valid = ctx.valid.to(x.device)
            row = valid.int().argmax(dim=1)  # chunk index of the first real token (0 for an all-pad chunk)
            sel = (positions[None, :] == row[:, None]) & valid.any(dim=1, keepdim=True)
            where = sel.unsqueeze(-1) & _dim_mask(_token_scores(x, row, gain_fn), k).unsqueeze(1)
            counter.add_(sel.sum())
        return replace_hidden_arg(args, kwargs, _apply(x, where, gamma))

    return hook


def apply_wemask(model, config: Optional[WeMaskConfig] = None, tokenizer=None, *, per_sequence: bool = False,
                 **fields) -> WeMaskHandle:
    """Register WeMask on ``model`` (a transformers or PEFT model); ``handle.remove()`` undoes it.

    A config whose k is 0 (rate 0) registers nothing, so the model stays bit-identical. ``per_sequence``
    (paper mode only) applies the official mask to each sequence of a padded batch as if it ran alone, so the
    paper's one-item-at-a-time protocol can run batched (correct mode is always per sequence). Without it, the
    paper hook's output depends on which sequences share the batch, so generate with ``engine="hf"``: the
    compact engine drops finished sequences from the batch.
    """
    if config is None:
        config = WeMaskConfig(**fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    config.validate()
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    hidden = hidden_size(model)
    if config.rate > 0:  # resolved even when k rounds to 0, so handle.config can always be saved
        config = config.resolved(model, tokenizer)
    k = config.k(hidden)
    if k == 0:
        if config.rate > 0:
            warnings.warn(f"WeMask rate {config.rate:g} masks floor({config.rate:g} x {hidden}) = 0 dims of this "
                          f"model: nothing is masked (the smallest rate that masks a dim is {1 / hidden:.4g})",
                          stacklevel=2)
        return WeMaskHandle(config, [], 0, None, {}, model)
    if config.score == "gamma" and adapter.attn_norm is None:
        raise MelayerError(f"score='gamma' needs a pre-attention norm; the {adapter.family} family has none "
                           f"(its attention reads the raw residual): use score='activation'")
    layers = config.resolve_layers(len(blocks))
    hooks = HookGroup()
    switch = {"on": True}
    ctx = TokenContext(model, hooks) if config.mode == "correct" or per_sequence else None
    counters: dict[int, torch.Tensor] = {}
    with torch.inference_mode(False):
        for i in layers:
            block = blocks[i]
            device = next(block.parameters()).device
            counters[i] = torch.zeros((), dtype=torch.long, device=device)
            gain_fn = None
            if config.score == "gamma":
                norm = adapter.get(block, adapter.attn_norm)
                gain_fn = (lambda n=norm: adapter.norm_gain(n))
            if config.mode == "correct":
                fn = _correct_hook(ctx, k, config.gamma, gain_fn, counters[i])
            else:
                fn = _paper_hook(k, config.gamma, gain_fn, counters[i], ctx)
            hooks.pre(adapter.attn_module(block), _switchable(fn, switch), with_kwargs=True)
    return WeMaskHandle(config, layers, k, hooks, counters, model, switch)


def _switchable(fn, switch: dict):
    """``fn`` unless the handle is paused (a Python flag: no tensor work and no host sync when off)."""
    def hook(module, args, kwargs):
        return fn(module, args, kwargs) if switch["on"] else None

    return hook


class wemask:  # noqa: N801 - used like a function: ``with wemask(model, rate=0.01) as h:``
    """Context manager: WeMask applied inside the ``with`` block, removed on exit.

    ``wemask(model, 0.01)`` (a rate), ``wemask(model, config)`` or ``wemask(model, rate=..., layers=...)``.
    """

    def __init__(self, model, config: Union[WeMaskConfig, float, None] = None, tokenizer=None, *,
                 per_sequence: bool = False, **fields):
        if isinstance(config, WeMaskConfig):
            config = dataclasses.replace(config, **fields) if fields else config
        elif config is None:
            config = WeMaskConfig(**fields)
        else:
            config = WeMaskConfig(rate=config, **fields)
        self._args = (model, config, tokenizer)
        self._per_sequence = per_sequence
        self.handle: Optional[WeMaskHandle] = None

    def __enter__(self) -> WeMaskHandle:
        self.handle = apply_wemask(*self._args, per_sequence=self._per_sequence)
        return self.handle

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def parse_layers(text: str, sep: str = ",") -> Union[str, list[int]]:
    """A layer set: after_me, from_after_me, me, or 0-based block indices joined by ``sep``."""
    text = str(text).strip()
    if text in LAYER_CHOICES:
        return text
    try:
        layers = [int(t) for t in text.split(sep) if t.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise MelayerError(f"WeMask layers must be {', '.join(LAYER_CHOICES)} or block indices joined by "
                           f"{sep!r}, got {text!r}")
    return layers
