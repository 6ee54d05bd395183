"""The ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls :func:`register` in each of its processes
(front end, engine core, workers, the model-inspection subprocess) before it resolves a model class.

It points each architecture in :data:`~melayer.vllm_backend.config.ARCHITECTURES` at its WeMask'd subclass, as a
lazy "module:class" string: nothing of the models is imported here, and a model without a mask config runs
exactly as vLLM's own class (the subclass registers no hooks). Idempotent; an architecture that another plugin
has already replaced is left alone.
"""
from __future__ import annotations

from .config import ARCHITECTURES

MODELS_MODULE = "melayer.vllm_backend.models"


def owner(registry, arch: str):
    """The module of the class ``arch`` is registered to (lazy "module:class" or a class), or None."""
    entry = registry.models.get(arch)
    return getattr(entry, "module_name", None) or getattr(getattr(entry, "model_cls", None), "__module__", None)


def register() -> None:
    from vllm import ModelRegistry

    for arch, module in ARCHITECTURES.items():
        if owner(ModelRegistry, arch) in (f"vllm.model_executor.models.{module}", MODELS_MODULE):
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:WeMask{arch}")
