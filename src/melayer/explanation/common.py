"""What every explain analysis shares: encoded inputs, one hooked forward pass, the massive dims.

Inputs are left-padded batches; the first *real* token of each row ("token 0") is found from the
attention mask, so padding never shifts what an analysis calls the first token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..adapters import adapter_for
from ..errors import MelayerError
from ..hooks import HookGroup, block_output
from ..modelutils import device_of
from ..prompt_sets import SCAN_TEXTS
from ..text import Prompt, encode, left_pad, pad_id


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
    """Encode prompts (strings or :class:`melayer.text.Prompt`; default: the scan's built-in texts)."""
    prompts = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in (prompts or SCAN_TEXTS)]
    if not prompts:
        raise MelayerError("no prompts to explain")
    encoded = []
    for p in prompts:
        ids = encode(tokenizer, p)[:max_tokens]
        if len(ids) < 2:
            raise MelayerError(f"prompt needs at least 2 tokens (token 0 and an ordinary one): {p.text!r}")
        encoded.append(ids)
    ids, mask = left_pad(encoded, pad_id(tokenizer))
    return Inputs(ids, mask, [p.text for p in prompts])


def as_inputs(tokenizer, inputs: InputsLike) -> Inputs:
    return inputs if isinstance(inputs, Inputs) else prepare_inputs(tokenizer, inputs)


def run_decoder(model: nn.Module, inputs: Inputs) -> None:
    """One forward pass of the bare decoder (no logits): hooks do the observing."""
    device = device_of(model)
    adapter_for(model).decoder(model)(input_ids=inputs.input_ids.to(device),
                                      attention_mask=inputs.attention_mask.to(device), use_cache=False)


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


def effective_rank(x: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values of a 2-D matrix (fp64 for stability)."""
    s = torch.linalg.svdvals(x.double())
    s = s[s > s.max() * 1e-12] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))
