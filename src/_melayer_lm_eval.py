"""Registers lm-eval's ``melayer`` and ``melayer-vllm`` models when lm-eval loads its models (lm-eval 0.4.13 reads no plugin entry
points); imported at interpreter start by ``melayer-lm-eval.pth``. Stdlib only; it never breaks Python."""
import sys

_MODULE = "lm_eval.models"
_TARGETS = {"melayer": "melayer.evaluate.harness:MelayerLM",
            "melayer-vllm": "melayer.vllm_backend.lm_eval_model:MelayerVLLM"}


class _Finder:
    """Wraps the loader of ``lm_eval.models`` so that ``melayer`` is registered (lazily) right after it runs."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            spec = None if finder is cls else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module
                spec.loader.exec_module = lambda module: (run(module), _register())
                return spec
        return None


def _register():
    try:
        from lm_eval.api.registry import model_registry

        for name, target in _TARGETS.items():
            if name not in model_registry:
                model_registry.register(name, target=target)
    except Exception:
        pass


if _MODULE in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _Finder)
