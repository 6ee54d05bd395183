"""What every explain analysis shares: encoded inputs, one hooked forward pass, the massive dims.

Inputs are left-padded batches; the first *real* token of each row ("token 0") is found from the
attention mask, so padding never shifts what an analysis calls the first token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..adapters import adapter_for, base_model
from ..errors import MelayerError
from ..hooks import HookGroup, block_output


@dataclass
class Inputs:
    """A left-padded batch of prompts; ``first[b]`` is the column of row b's first real token."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    texts: list[str]

    @property
    def first(self) -> torch.Tensor:
        return self.attention_mask.int().argmax(dim=1)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def first_sel(self) -> torch.Tensor:
        """(B, T) bool: the first real token of each row."""
        cols = torch.arange(self.input_ids.shape[1])
        return cols[None, :] == self.first[:, None]

    @property
    def other_sel(self) -> torch.Tensor:
        """(B, T) bool: the real tokens other than the first ("ordinary" tokens)."""
        return self.valid & ~self.first_sel

    def __len__(self) -> int:
        return self.input_ids.shape[0]


InputsLike = Union[Inputs, Sequence[str]]


def prepare_inputs(tokenizer, prompts: Optional[Sequence] = None, max_tokens: int = 96) -> Inputs:
    """Encode prompts (strings or :class:`melayer.scan.Prompt`; default: the scan's built-in texts)."""
    from ..scan import DEFAULT_TEXTS, Prompt, encode, left_pad

    prompts = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in (prompts or DEFAULT_TEXTS)]
    if not prompts:
        raise MelayerError("no prompts to explain")
    encoded = []
    for p in prompts:
        ids = encode(tokenizer, p)[:max_tokens]
        if len(ids) < 2:
            raise MelayerError(f"prompt needs at least 2 tokens (token 0 and an ordinary one): {p.text!r}")
        encoded.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(encoded, pad)
    return Inputs(ids, mask, [p.text for p in prompts])


def as_inputs(tokenizer, inputs: InputsLike) -> Inputs:
    return inputs if isinstance(inputs, Inputs) else prepare_inputs(tokenizer, inputs)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_decoder(model: nn.Module, inputs: Inputs) -> None:
    """One forward pass of the bare decoder (no logits): hooks do the observing."""
    device = model_device(model)
    adapter_for(model).decoder(model)(input_ids=inputs.input_ids.to(device),
                                      attention_mask=inputs.attention_mask.to(device), use_cache=False)


def num_layers(model: nn.Module) -> int:
    return len(adapter_for(model).layers(model))


def check_layer(model: nn.Module, me_layer: int) -> int:
    n = num_layers(model)
    if isinstance(me_layer, bool) or not isinstance(me_layer, int) or not 0 <= me_layer < n:
        raise MelayerError(f"ME layer must be a 0-based block index in [0, {n - 1}], got {me_layer!r}")
    return me_layer


def hidden_arg(args, kwargs) -> torch.Tensor:
    """The hidden-state argument of a block / attention / norm forward, positional or keyword."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def capture_block_outputs(model: nn.Module, inputs: Inputs, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """fp32 outputs (B, T, D) of the given blocks for one forward pass."""
    layers = adapter_for(model).layers(model)
    out: dict[int, torch.Tensor] = {}
    with HookGroup() as hooks:
        for i in blocks:
            hooks.forward(layers[i], lambda m, a, o, i=i: out.__setitem__(i, block_output(o).detach().float().cpu()))
        run_decoder(model, inputs)
    return out


def token0(h: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """(B, D) rows of the first real token."""
    return h[torch.arange(h.shape[0]), inputs.first]


def massive_dims(model: nn.Module, inputs: Inputs, me_layer: int, rel: float = 0.25, max_dims: int = 4) -> list[int]:
    """Dims of token 0 at the ME block's output whose mean |value| is within ``rel`` of the largest one.

    These are the dims every analysis follows (SmolLM2: [507]); on a model without massive activations
    it still returns the largest dim, so the mechanics stay testable.
    """
    h0 = token0(capture_block_outputs(model, inputs, [me_layer])[me_layer], inputs).abs().mean(0)
    values, dims = h0.sort(descending=True)
    keep = dims[values >= rel * values[0]][:max_dims]
    return [int(d) for d in keep]


def rms_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, float):
            return v
    raise MelayerError(f"cannot find the epsilon of norm {type(norm).__name__}")


def hidden_size(model: nn.Module) -> int:
    config = base_model(model).config
    return int(getattr(config, "get_text_config", lambda: config)().hidden_size)


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row median of ``values`` (B, T) over the positions where ``mask`` is True (NaN if none)."""
    return torch.nanmedian(values.float().masked_fill(~mask, float("nan")), dim=1).values
