"""Helpers for tests/test_train.py: a tiny random chat model that speaks the default tokenizer."""
from __future__ import annotations

import torch

TINY_ME_LAYER = 1  # tiny models have no real ME layer: name one, so WeMask masks block 2


def tiny_chat_model(tokenizer, seed: int = 0):
    """make_tiny('llama') with its vocabulary grown to the tokenizer's (so TRL can tokenise chats)."""
    from conftest import make_tiny

    model = make_tiny("llama", seed=seed)
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    return model
