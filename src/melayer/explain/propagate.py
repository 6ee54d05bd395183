"""Propagation: after the ME layer, does any block still write into token 0's massive dims?

Each block adds two writes to the residual stream: h_out = h_in + attn_write + ffn_write. The writes are
read where they enter the residual (the post-sandwich norm's output for Gemma-2/3 and OLMo-2, else the
attention / MLP output), so they sum to the block's residual difference for every family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..adapters import adapter_for
from ..hooks import HookGroup, block_output
from .common import InputsLike, as_inputs, check_layer, hidden_arg, run_decoder, token0


@dataclass
class BlockWrite:
    block: int
    carried: list[float]  # token 0's residual entering the block, per massive dim (mean over inputs)
    attn: list[float]  # what attention writes into those dims
    ffn: list[float]  # what the FFN writes
    out: list[float]  # the residual leaving the block
    relative_change: float  # ||attn + ffn|| / ||carried|| over the dims


@dataclass
class Propagation:
    me_layer: int
    dims: list[int]
    blocks: list[BlockWrite]  # every block, 0 … L-1
    max_residual_error: float  # max |carried + attn + ffn − out| (a self-check of the decomposition)

    def after_me(self) -> list[BlockWrite]:
        return [b for b in self.blocks if b.block > self.me_layer]


@torch.no_grad()
def propagation(model, tokenizer, me_layer: int, inputs: InputsLike, dims: Sequence[int]) -> Propagation:
    """Per block: token 0's carried value on the massive dims and the attention / FFN writes into them."""
    check_layer(model, me_layer)
    inputs = as_inputs(tokenizer, inputs)
    ad = adapter_for(model)
    dims = list(dims)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str, i: int, h: torch.Tensor) -> None:
        seen[kind, i] = token0(h.detach().float().cpu(), inputs)[:, dims]

    with HookGroup() as hooks:
        for i, block in enumerate(ad.layers(model)):
            hooks.pre(block, lambda m, a, k, i=i: keep("in", i, hidden_arg(a, k)), with_kwargs=True)
            hooks.forward(block, lambda m, a, o, i=i: keep("out", i, block_output(o)))
            attn_site = ad.attn_module(block) if ad.post_attn_norm is None else ad.get(block, ad.post_attn_norm)
            ffn_site = ad.mlp_module(block) if ad.post_ffn_norm is None else ad.get(block, ad.post_ffn_norm)
            hooks.forward(attn_site, lambda m, a, o, i=i: keep("attn", i, block_output(o)))
            hooks.forward(ffn_site, lambda m, a, o, i=i: keep("ffn", i, block_output(o)))
        run_decoder(model, inputs)
    rows, err = [], 0.0
    for i in range(len(ad.layers(model))):
        h_in, attn, ffn, out = (seen[k, i] for k in ("in", "attn", "ffn", "out"))
        err = max(err, float((h_in + attn + ffn - out).abs().max()))
        write = (attn + ffn).mean(0)
        carried = h_in.mean(0)
        rows.append(BlockWrite(i, carried.tolist(), attn.mean(0).tolist(), ffn.mean(0).tolist(),
                               out.mean(0).tolist(), float(write.norm() / carried.norm().clamp(min=1e-30))))
    return Propagation(me_layer, dims, rows, err)
