"""WeMask inside vLLM: vLLM's own model classes, kernels, batching and parallelism, with melayer's mask.

How the pieces fit (nothing is forked, nothing is patched):

- :mod:`.plugin` is a ``vllm.general_plugins`` entry point: every vLLM process re-registers the supported
  architectures (:data:`ARCHITECTURES`) to WeMask'd subclasses of vLLM's own classes (:mod:`.models`).
- the mask travels as ``LLM(..., additional_config={"melayer_wemask": wemask_entry(config)})``; vLLM hands it to
  every worker (tensor/pipeline/data parallel alike) and hashes it into its compile-cache key. A subclass reads it
  in ``__init__`` and hooks the target blocks' attention; without it the model is vLLM's, untouched.
- melayer decides everything first, in this process (:mod:`.config`): the ME layer (melayer's scan of the HF
  model), the target blocks, k, the architecture check, paper mode's engine settings.
- :mod:`.lm_eval_model` is lm-eval's own ``VLLM`` model with one engine per WeMask condition: ``melayer eval
  --engine vllm`` and ``lm_eval --model melayer-vllm``.

Importing this package imports no vLLM module.
"""
from __future__ import annotations

from .config import ARCHITECTURES, KEY, check_architecture, engine_kwargs, resolve_wemask, wemask_entry

__all__ = ["ARCHITECTURES", "KEY", "check_architecture", "engine_kwargs", "resolve_wemask", "wemask_entry",
           "vllm_available"]


def vllm_available() -> bool:
    """Whether vLLM can be imported here (found, not imported)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
