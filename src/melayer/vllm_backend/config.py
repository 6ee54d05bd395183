"""The melayer side of the vLLM backend: everything decided before vLLM starts (no vLLM import here).

melayer resolves the mask (ME layer, target blocks) with its own code, then hands vLLM one JSON-able entry,
``additional_config["melayer_wemask"]``: vLLM copies it to every process and hashes it into its compile-cache
key, so a graph compiled with a mask is never reused without it (and the reverse).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import MelayerError
from ..masking import WeMaskConfig

KEY = "melayer_wemask"
NO_MASK = {"rate": 0.0}  # an engine melayer builds unmasked says so: a mask in the model's config.json is then ignored

# vLLM architectures (config.json "architectures") whose vLLM implementation calls
# ``self_attn(positions=..., hidden_states=...)`` with the pre-attention norm's output, mapped to the module under
# vllm.model_executor.models that defines them (checked in vLLM 0.26 and 0.32: the same modules, classes and call).
# OLMo-2 is missing on purpose: vLLM runs it through its Transformers backend, whose attention call has another shape.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}

# What makes paper mode exact in vLLM: its chunk starts are the requests' first tokens only when a prompt is never
# split (chunked prefill) nor partly served from cache (prefix caching); on a GPU, CUDA graphs would freeze the
# chunk starts of the captured batch, so the engine must run eagerly.
PAPER_SETTINGS = {"enable_chunked_prefill": False, "enable_prefix_caching": False}
PAPER_GPU_SETTINGS = {"enforce_eager": True}


def wemask_entry(config: Optional[WeMaskConfig]) -> Optional[dict]:
    """The ``additional_config["melayer_wemask"]`` entry of a resolved config (None: no mask, rate 0).

    Layers must be explicit block indices (``config.resolved(model)`` or :func:`resolve_wemask`): the ME layer is
    found by melayer's scan of the HF model, never inside vLLM.
    """
    if config is None or config.rate == 0:
        return None
    if not config.is_resolved:
        raise MelayerError(f"WeMask layers={config.layers!r} must be resolved to block indices before vLLM starts "
                           "(resolve_wemask)")
    if config.score != "activation":
        raise MelayerError("the vLLM backend ranks dims by activation only: use score='activation' or --engine hf")
    return dataclasses.asdict(config)


def architecture(location) -> str:
    """The architecture vLLM will build from a model folder or hub id (its config's first ``architectures``)."""
    from transformers import AutoConfig

    try:
        archs = AutoConfig.from_pretrained(location).architectures or []
    except (OSError, ValueError) as e:
        raise MelayerError(f"cannot read the config of {location}: {str(e).splitlines()[0]}") from None
    return str(archs[0]) if archs else "?"


def check_architecture(location) -> str:
    """One-line error, before vLLM starts, for a model whose vLLM implementation the plugin does not hook."""
    arch = architecture(location)
    if arch not in ARCHITECTURES:
        raise MelayerError(f"WeMask under vLLM supports {', '.join(ARCHITECTURES)}; this model is {arch}: use "
                           "--engine hf")
    return arch


def engine_kwargs(entry: Optional[dict], kwargs: dict, on_gpu: bool) -> dict:
    """``LLM(**...)`` arguments for one WeMask condition: the caller's own (tensor/data parallelism, memory,
    dtype, ...) untouched, the entry put in ``additional_config`` (other keys kept; :data:`NO_MASK` for no mask, so
    that the rate-0 condition of a checkpoint trained with WeMask, whose config.json names its mask, runs
    unmasked), and in paper mode the settings that make it exact, refused in one line when the caller asked for
    others."""
    out = dict(kwargs)
    extra = {k: v for k, v in dict(out.get("additional_config") or {}).items() if k != KEY}
    extra[KEY] = entry if entry is not None else dict(NO_MASK)
    if entry is not None and out.get("model_impl", "auto") not in ("auto", "vllm"):
        raise MelayerError(f"WeMask under vLLM hooks vLLM's own model classes: drop model_impl={out['model_impl']!r}")
    out["additional_config"] = extra
    if entry is not None and entry["mode"] == "paper":
        needed = {**PAPER_SETTINGS, **(PAPER_GPU_SETTINGS if on_gpu else {})}
        wrong = {k: out[k] for k, v in needed.items() if k in out and out[k] != v}
        if wrong:
            asked = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise MelayerError(f"WeMask paper mode is exact in vLLM only with "
                               f"{', '.join(f'{k}={v}' for k, v in needed.items())}: drop {asked}")
        out.update(needed)
    return out


def model_shape(location) -> tuple[int, int]:
    """(blocks, hidden size) from a model folder's config.json (the text part of a multimodal one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location)
    text = getattr(config, "get_text_config", lambda: config)()
    return int(text.num_hidden_layers), int(text.hidden_size)


def resolve_wemask(config: Optional[WeMaskConfig], spec, device: Optional[str] = None,
                   dtype=None) -> Optional[WeMaskConfig]:
    """``config`` with explicit blocks (None for rate 0). A layer set named after the ME layer, with no ME layer
    given, loads the model with transformers for melayer's scan and frees it before vLLM takes the device."""
    if config is None or config.rate == 0 or config.is_resolved:
        return config
    if config.me_layer is None:
        config = dataclasses.replace(config, me_layer=find_me_layer_hf(spec, device, dtype))
    from ..load import local_location

    blocks, _ = model_shape(local_location(spec)[1])
    return dataclasses.replace(config, layers=config.resolve_layers(blocks))


def find_me_layer_hf(spec, device: Optional[str] = None, dtype=None) -> int:
    """The ME layer by melayer's scan of the transformers model (loaded, scanned, freed)."""
    import gc

    import torch

    from ..load import load_model
    from ..scanning import find_me_layer

    model, tokenizer = load_model(spec, device=device, dtype=dtype)
    try:
        return int(find_me_layer(model, tokenizer))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
