"""Small model and tensor helpers every feature shares (shapes, devices, hook arguments, norm internals)."""
from __future__ import annotations

import torch
from torch import nn

from .adapters import adapter_for, base_model
from .errors import MelayerError


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs go; the embeddings for a spread model)."""
    return next(model.parameters()).device


def text_config(model: nn.Module):
    """The decoder's config (the text part of a multimodal config)."""
    config = base_model(model).config
    return getattr(config, "get_text_config", lambda: config)()


def hidden_size(model: nn.Module) -> int:
    return int(text_config(model).hidden_size)


def num_layers(model: nn.Module) -> int:
    return len(adapter_for(model).layers(model))


def check_layer(model: nn.Module, layer: int) -> int:
    """``layer`` if it is a 0-based block index of ``model``, else a one-line error."""
    n = num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise MelayerError(f"ME layer must be a 0-based block index in [0, {n - 1}], got {layer!r}")
    return layer


def hidden_arg(args, kwargs) -> torch.Tensor:
    """The hidden-state argument of a block / attention / norm forward, positional or keyword."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def replace_hidden_arg(args, kwargs, x: torch.Tensor):
    """``(args, kwargs)`` with the hidden-state argument replaced by ``x`` (for forward pre-hooks)."""
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def rms_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, float):
            return v
    raise MelayerError(f"cannot find the epsilon of norm {type(norm).__name__}")


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row median of ``values`` (B, T) over the positions where ``mask`` is True (NaN if none)."""
    return torch.nanmedian(values.float().masked_fill(~mask, float("nan")), dim=1).values
