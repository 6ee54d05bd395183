"""An independent re-implementation of the paper's WeMask'd Qwen3 decoder layer (the parity ground truth).

The paper's code replaces the decoder-layer forward: after the pre-attention RMSNorm it takes index 0
of whatever chunk the layer sees, averages |h[:, 0, :]| over the batch, and zeroes the top-k dims of
h[:, 0, :] in every sequence before attention. Written from that description (not from the official
code), as a plain forward override: no hooks, no melayer code.
"""
from __future__ import annotations

import contextlib
import math

import torch


def paper_decoder_layer_forward(layer, rate: float):
    """A Qwen3 decoder-layer forward with the paper's mask between input_layernorm and self-attention."""

    def forward(hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        h = layer.input_layernorm(hidden_states)
        k = math.floor(rate * h.shape[-1])
        if k > 0:
            dims = torch.topk(h[:, 0, :].abs().mean(dim=0), k).indices
            h = h.clone()
            h[:, 0, dims] = 0.0
        attn, _ = layer.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                                  position_embeddings=position_embeddings, **kwargs)
        h = residual + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))

    return forward


@contextlib.contextmanager
def paper_wemask(model, layers: list[int], rate: float):
    """Swap in the paper forward for the given 0-based blocks of a Qwen3 model; restore on exit."""
    assert model.config.model_type == "qwen3"
    blocks = [model.model.layers[i] for i in layers]
    for block in blocks:
        block.forward = paper_decoder_layer_forward(block, rate)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
