"""The small hook library every feature uses: grouped handles and per-forward token positions.

Positions are *absolute*: the first real token of a sequence is found from the attention mask of the
whole (cached + current) sequence, and the current chunk's positions come from the cache length, so a
hook never confuses "index 0 of this chunk" with "the first token" during cached decoding.
All position arithmetic is tensor-only (no host syncs), so hooks stay usable under torch.compile.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .adapters import adapter_for


class HookGroup:
    """A set of hook handles removed together; usable as a context manager."""

    def __init__(self) -> None:
        self._handles: list = []

    def add(self, handle) -> None:
        self._handles.append(handle)

    def forward(self, module: nn.Module, fn: Callable, **kw) -> None:
        self.add(module.register_forward_hook(fn, **kw))

    def pre(self, module: nn.Module, fn: Callable, **kw) -> None:
        self.add(module.register_forward_pre_hook(fn, **kw))

    def remove(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def block_output(output) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


def _key_validity(mask: torch.Tensor) -> torch.Tensor:
    """Per-key 'is a real token' (B, K) from a 2-D padding mask or a 4-D attention mask."""
    if isinstance(mask, dict):  # per-attention-type masks prepared by generate
        mask = next(iter(mask.values()))
    if mask.ndim == 2:
        return mask != 0
    last_query = mask[:, 0, -1, :]  # the last query sees every cached real key
    if last_query.dtype == torch.bool:
        return last_query
    return last_query > torch.finfo(last_query.dtype).min / 2


class TokenContext:
    """Records, at the start of each decoder forward, where the current chunk sits in its sequence.

    After the pre-hook has run:
      * ``chunk_pos``  (L,)   absolute index in the cached sequence of each position of the chunk;
      * ``first``      (B,)   absolute index of each sequence's first real token (left padding aware);
      * ``valid``      (B, L) whether each chunk position is a real (non-pad) token.
    """

    def __init__(self, model: nn.Module, hooks: HookGroup):
        self.chunk_pos: Optional[torch.Tensor] = None
        self.first: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        hooks.pre(adapter_for(model).decoder(model), self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            x = args[0]
        batch, length = x.shape[:2]
        device = x.device
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            chunk_pos = cache_position.to(device)
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            chunk_pos = torch.arange(length, device=device) + past
        mask = kwargs.get("attention_mask")
        if mask is None:
            first = torch.zeros(batch, dtype=torch.long, device=device)
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            keys = _key_validity(mask).to(device)
            if keys.shape[0] != batch:
                keys = keys.expand(batch, -1)
            first = keys.int().argmax(dim=1)
            index = chunk_pos.clamp(max=keys.shape[1] - 1).expand(batch, -1)
            valid = keys.gather(1, index)
        self.chunk_pos, self.first, self.valid = chunk_pos, first, valid

    def first_token(self) -> torch.Tensor:
        """(B, L) bool: the chunk position holding each sequence's first real token (all False if absent)."""
        return self.chunk_pos[None, :] == self.first[:, None]
