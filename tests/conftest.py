"""Shared fixtures: tiny random-weight models for every supported family, the real default model, data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY)
    if family == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY)
    if family == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    if family == "phi3":
        return tf.Phi3Config(**TINY)
    if family == "gemma":
        return tf.GemmaConfig(**TINY, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**TINY, head_dim=16, sliding_window=64)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=64)
    if family == "olmo2":
        return tf.Olmo2Config(**TINY)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2"]


def make_tiny(family: str = "llama", seed: int = 0, dtype=torch.float32, **attn):
    """A deterministic random-weight CausalLM of the given family (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype, **attn)
    with torch.no_grad():  # random norms so that γ is informative (HF initialises them to 1 or 0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, fp32 on CPU) and its tokenizer."""
    from melayer import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared data folder missing: {DATA_DIR}")
    return DATA_DIR
