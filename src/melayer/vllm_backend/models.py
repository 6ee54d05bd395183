"""Inside vLLM's processes: WeMask'd subclasses of vLLM's own model classes (imported only by vLLM, on use).

``WeMask<Arch>`` runs the base ``__init__`` and then registers a forward pre-hook (with kwargs) on each target
block's ``self_attn``, whose inputs are ``positions`` (absolute, one per token) and ``hidden_states`` (the
pre-attention norm's output, all requests' tokens flattened to ``(num_tokens, hidden)``). The hooks must exist
when vLLM compiles the model: Dynamo traces them into the graph, whereas hooks added after loading (through
``collective_rpc``) are silently left out of a compiled model. Without a mask config nothing is registered.

- correct mode masks the rows whose absolute position is 0 (each sequence's first token; decoding never masks,
  the cached K/V of position 0 stay masked): pure tensor code, safe under torch.compile and CUDA graphs.
- paper mode masks each request's first row in this step (``query_start_loc``), read from vLLM's forward context
  by an opaque custom op so that a compiled graph asks for it at every step. Exact only without chunked prefill
  and prefix caching and, on a GPU, without CUDA graphs: refused otherwise.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Optional

import torch

from ..errors import MelayerError
from ..masking import WeMaskConfig, _apply, _dim_mask
from .config import ARCHITECTURES, KEY, PAPER_GPU_SETTINGS, PAPER_SETTINGS

logger = logging.getLogger("vllm.melayer")  # a child of vLLM's logger: shown with vLLM's own messages


def mask_config(vllm_config) -> Optional[WeMaskConfig]:
    """The mask of this engine: ``additional_config["melayer_wemask"]`` (``LLM(additional_config=...)``; rate 0:
    none), else the model config's ``melayer_wemask`` (a config.json key or ``hf_overrides``: how an ``LLM(...)``
    built by someone else, TRL say, can carry it). The latter is copied into additional_config, which vLLM's compile-cache key
    covers (hf_config and hf_overrides are not in it)."""
    extra = vllm_config.additional_config
    entry = extra.get(KEY) if isinstance(extra, dict) else None
    if entry is None:
        entry = getattr(vllm_config.model_config.hf_config, KEY, None)
        if entry and isinstance(extra, dict):
            extra[KEY] = entry
    if not entry or not entry.get("rate"):  # absent, or an explicit rate 0 (NO_MASK): vLLM's class as it is
        return None
    fields = {f.name for f in dataclasses.fields(WeMaskConfig)}
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise MelayerError(f"{KEY}: unknown keys {unknown} (expected {sorted(fields)})")
    config = WeMaskConfig(**entry)
    if config.score != "activation":
        raise MelayerError(f"{KEY}: the vLLM backend ranks dims by activation only (score={config.score!r})")
    return config


def _check_paper_settings(vllm_config) -> None:
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    wrong = []
    if vllm_config.scheduler_config.enable_chunked_prefill:
        wrong.append("enable_chunked_prefill")
    if vllm_config.cache_config.enable_prefix_caching:
        wrong.append("enable_prefix_caching")
    if not current_platform.is_cpu() and vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE:
        wrong.append("CUDA graphs")
    if wrong:
        needed = {**PAPER_SETTINGS, **({} if current_platform.is_cpu() else PAPER_GPU_SETTINGS)}
        raise MelayerError(f"WeMask paper mode is exact in vLLM only with "
                           f"{', '.join(f'{k}={v}' for k, v in needed.items())} ({', '.join(wrong)} on)")


def _first_token_rows(positions: torch.Tensor) -> torch.Tensor:
    return positions == 0


def _chunk_start_rows_impl(positions: torch.Tensor) -> torch.Tensor:
    """True at each request's first token of this step's flattened batch (``query_start_loc[:-1]``)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    rows = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if isinstance(metadata, list):  # micro-batched steps (DBO): one dict per micro-batch
        raise MelayerError("WeMask paper mode does not support vLLM's micro-batching (dual batch overlap)")
    if not metadata:  # profiling and warm-up runs carry no requests
        return positions == 0
    starts = next(iter(metadata.values())).query_start_loc[:-1].to(positions.device, torch.long)
    rows[starts[starts < positions.shape[0]]] = True
    return rows


def _chunk_start_rows_fake(positions: torch.Tensor) -> torch.Tensor:
    return torch.empty(positions.shape[0], dtype=torch.bool, device=positions.device)


_OPS: dict = {}


def _chunk_start_rows():
    """The custom op ``torch.ops.melayer.chunk_start_rows`` (registered once per process)."""
    if "op" not in _OPS:
        from torch.library import Library
        from vllm.utils.torch_utils import direct_register_custom_op

        _OPS["lib"] = Library("melayer", "FRAGMENT")  # noqa: TOR901 (kept alive with the op)
        direct_register_custom_op("chunk_start_rows", _chunk_start_rows_impl, fake_impl=_chunk_start_rows_fake,
                                  target_lib=_OPS["lib"])
        _OPS["op"] = torch.ops.melayer.chunk_start_rows
    return _OPS["op"]


def _hook(k: int, gamma: float, paper: bool):
    """The pre-hook: the selected rows' top-k dims of |x| multiplied by gamma, out of place (melayer's own ranking:
    fp32 in correct mode, the model's dtype in paper mode, as the official code does)."""
    rows_of = _chunk_start_rows() if paper else _first_token_rows

    def hook(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[0]
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
        score = x.abs() if paper else x.float().abs()
        y = _apply(x, rows_of(positions).unsqueeze(-1) & _dim_mask(score, k), gamma)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": y}
        return (args[0], y, *args[2:]), kwargs

    return hook


def install_wemask(model: torch.nn.Module, vllm_config, config: Optional[WeMaskConfig]) -> None:
    """Register the mask's hooks on this process's blocks (a pipeline stage holds only some); the result is kept
    as ``model._melayer_wemask`` for :class:`WorkerExtension`."""
    if config is None:
        return
    from vllm.model_executor.models.utils import PPMissingLayer

    hidden = vllm_config.model_config.hf_config.get_text_config().hidden_size
    k = config.k(hidden)
    blocks = model.model.layers
    layers = config.resolve_layers(len(blocks))
    if config.mode == "paper" and k > 0:
        _check_paper_settings(vllm_config)
    here = []
    for i in layers if k > 0 else []:
        if not isinstance(blocks[i], PPMissingLayer):
            blocks[i].self_attn.register_forward_pre_hook(_hook(k, config.gamma, config.mode == "paper"),
                                                          with_kwargs=True)
            here.append(i)
    model._melayer_wemask = {"rate": config.rate, "k": k, "layers": here, "mode": config.mode,
                             "gamma": config.gamma}
    logger.info("melayer WeMask: rate %g (k=%d of %d dims), %s mode, blocks %s", config.rate, k, hidden,
                config.mode, here)


def _wemask_class(arch: str) -> type:
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{ARCHITECTURES[arch]}"), arch)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        config = mask_config(vllm_config)  # first: it may add the mask to additional_config (the cache key)
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        install_wemask(self, vllm_config, config)

    return type(f"WeMask{arch}", (base,), {"__init__": __init__, "__module__": __name__,
                                          "__qualname__": f"WeMask{arch}"})


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    """``WeMask<Arch>`` for every architecture in ARCHITECTURES, built on first use (the plugin registers them as
    lazy "module:class" strings, so only the model being loaded imports its vLLM module)."""
    arch = name[len("WeMask"):]
    if name.startswith("WeMask") and arch in ARCHITECTURES:
        if arch not in _CLASSES:
            _CLASSES[arch] = _wemask_class(arch)
        return _CLASSES[arch]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class WorkerExtension:
    """Mixed into vLLM's workers (``worker_extension_cls``) so that the caller can check, with
    ``llm.collective_rpc("melayer_wemask")``, which model class each worker runs and what it masks."""

    def melayer_wemask(self) -> dict:
        model = self.model_runner.get_model()
        return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "mask": getattr(model, "_melayer_wemask", None)}
