"""Makes a bare ``lm_eval --model melayer`` work; imported at every interpreter start by ``melayer-lm-eval.pth``.

lm-eval 0.4.13 reads no entry points: its registry knows only what ``lm_eval.models`` registers on import (lazy
"module:attr" placeholders). So this stdlib-only module (top level, because ``import melayer`` loads torch) hooks
that import and, right after it ran, registers ``melayer`` the same lazy way. Nothing happens until something
imports ``lm_eval.models``, and errors are swallowed: a startup hook must never break Python.
"""
import sys

_MODULE, _ALIAS, _TARGET = "lm_eval.models", "melayer", "melayer.evaluate.lm_eval_model:MelayerLM"


def _register() -> None:
    try:
        from lm_eval.api.registry import model_registry

        if _ALIAS not in model_registry:
            model_registry.register(_ALIAS, target=_TARGET)
    except Exception:
        pass


class _Loader:
    """Runs the real loader of ``lm_eval.models``, then registers."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of this wrapper
        self.loader.exec_module(module)
        _register()


class _Finder:
    """A ``sys.meta_path`` finder that only wraps the loader the other finders give ``lm_eval.models``."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is cls or find is None else find(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


if _MODULE in sys.modules:  # imported late, not by the .pth
    _register()
else:
    sys.meta_path.insert(0, _Finder)
