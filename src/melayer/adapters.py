"""One small table per model family: where the decoder blocks, norms, attention and FFN live.

Everything that intercepts a model (capture, WeMask, explain) goes through :func:`adapter_for`, so a
new family is one entry here, never a forked modeling file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import MelayerError


class UnsupportedArchitecture(MelayerError, ValueError):
    pass


@dataclass(frozen=True)
class FamilyAdapter:
    """Attribute names inside one decoder block (``None`` where the family has no such module)."""

    family: str
    attn_norm: Optional[str]  # norm whose output is the attention input (None: attention reads the residual)
    ffn_norm: Optional[str]  # norm whose output is the FFN input (None: FFN reads the residual)
    attn: str = "self_attn"
    key: Optional[str] = "k_proj"  # the key projection inside the attention module (None: fused with q and v)
    mlp: str = "mlp"
    gate: Optional[str] = "gate_proj"
    up: Optional[str] = "up_proj"
    gate_up: Optional[str] = None  # fused [gate; up] projection (phi3)
    down: str = "down_proj"
    act: str = "act_fn"
    norm_gain_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    post_attn_norm: Optional[str] = None  # sandwich norms applied to a sub-block's output
    post_ffn_norm: Optional[str] = None

    # -- model-level navigation -------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The bare decoder (embeddings + blocks + final norm), through PEFT and CausalLM wrappers."""
        return base_model(model).get_decoder()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    # -- block-level navigation -------------------------------------------------------------
    def block(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i]

    def get(self, block: nn.Module, name: Optional[str]) -> Optional[nn.Module]:
        return None if name is None else getattr(block, name)

    def attn_module(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.attn)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.mlp)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The effective γ of an RMSNorm (what multiplies x / rms(x))."""
        return norm.weight.detach().float() + self.norm_gain_offset

    def ffn_weights(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_gate, W_up, W_down) as ``[inter, hidden]``, ``[inter, hidden]``, ``[hidden, inter]``."""
        mlp = self.mlp_module(block)
        if self.gate_up is not None:
            w = getattr(mlp, self.gate_up).weight
            gate, up = w.chunk(2, dim=0)
        else:
            gate, up = getattr(mlp, self.gate).weight, getattr(mlp, self.up).weight
        return gate, up, getattr(mlp, self.down).weight

    def ffn_activation(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x): the vector that ``down`` maps back to the residual stream."""
        mlp = self.mlp_module(block)
        if self.gate_up is not None:
            gate, up = getattr(mlp, self.gate_up)(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(mlp, self.gate)(x), getattr(mlp, self.up)(x)
        act = getattr(mlp, self.act, None) or getattr(mlp, "activation_fn")
        return act(gate) * up


_LLAMA_LIKE = dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm")
_GEMMA = dict(
    attn_norm="input_layernorm",
    ffn_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_ffn_norm="post_feedforward_layernorm",
    norm_gain_offset=1.0,
)

ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", **_LLAMA_LIKE),
    "mistral": FamilyAdapter("mistral", **_LLAMA_LIKE),
    "qwen2": FamilyAdapter("qwen2", **_LLAMA_LIKE),
    "qwen3": FamilyAdapter("qwen3", **_LLAMA_LIKE),
    "phi3": FamilyAdapter("phi3", **_LLAMA_LIKE, key=None, gate=None, up=None, gate_up="gate_up_proj",
                          act="activation_fn"),
    "gemma": FamilyAdapter("gemma", **_LLAMA_LIKE, norm_gain_offset=1.0),
    "gemma2": FamilyAdapter("gemma2", **_GEMMA),
    "gemma3_text": FamilyAdapter("gemma3_text", **_GEMMA),
    # OLMo-2 normalises sub-block *outputs*: attention and FFN read the raw residual stream.
    "olmo2": FamilyAdapter(
        "olmo2", attn_norm=None, ffn_norm=None, post_attn_norm="post_attention_layernorm",
        post_ffn_norm="post_feedforward_layernorm",
    ),
}


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap PEFT (``PeftModel.get_base_model``) to the transformers model."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_type(model: nn.Module) -> str:
    config = base_model(model).config
    return getattr(config, "model_type", type(base_model(model)).__name__)


def register_adapter(model_type: str, adapter: FamilyAdapter) -> None:
    """Teach melayer a new family: ``model_type`` is the value of ``config.model_type`` in its config.json.

    >>> register_adapter("my_llama", FamilyAdapter("my_llama", attn_norm="input_layernorm",
    ...                                             ffn_norm="post_attention_layernorm"))
    """
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"register_adapter needs a FamilyAdapter, got {type(adapter).__name__}")
    ADAPTERS[model_type] = adapter


def check_supported(kind: str) -> FamilyAdapter:
    """The adapter of a ``model_type``, or a one-line error naming the supported ones (before any weights load)."""
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {kind!r}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def adapter_for(model: nn.Module) -> FamilyAdapter:
    return check_supported(model_type(model))
