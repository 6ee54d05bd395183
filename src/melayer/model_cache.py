"""The dequantised-GGUF cache: ``<cache>/gguf/<sha256 of the .gguf>/``, built once, verified on every load.

Every entry holds a manifest (``melayer_cache.json``) with the size, mtime and sha256 of each file written. A load
checks sizes always and re-hashes a file whose size or mtime changed, so a truncated or overwritten cache is
rebuilt (with a one-line notice) instead of breaking the model or silently changing it; ``verify(deep=True)``
(``melayer cache verify``) re-hashes everything. Concurrent first loads take a file lock, so one builds and the
others wait; a build killed half-way leaves a temporary folder that the next load of that model removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import MelayerError
from .io import atomic_write_json
from .report import say

MANIFEST = "melayer_cache.json"
GGUF_MAGIC = b"GGUF"
GGUF_HEADER = 24  # magic, version, tensor count, metadata count


def cache_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("melayer"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf_file(path: Path) -> None:
    """One-line errors for what is not a GGUF file at all (empty, a text file, a truncated header)."""
    size = path.stat().st_size
    if size == 0:
        raise MelayerError(f"{path} is empty, not a GGUF model")
    with open(path, "rb") as f:
        head = f.read(GGUF_HEADER)
    if head[:4] != GGUF_MAGIC:
        raise MelayerError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    if len(head) < GGUF_HEADER:
        raise MelayerError(f"{path} is truncated ({size} bytes): re-download or re-assemble it")


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
# GGUF's general.architecture -> transformers' model_type (GGUF calls Mistral "llama")
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma",
                      "gemma2": "gemma2", "gemma3": "gemma3_text", "olmo2": "olmo2", "mistral": "mistral"}


def gguf_architecture(path: Path, max_keys: int = 64) -> Optional[str]:
    """``general.architecture`` from a GGUF header, read without touching the tensors (None if not found)."""
    import struct

    def read(fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) < size:
            raise EOFError
        return struct.unpack("<" + fmt, data)[0]

    def string() -> bytes:
        return f.read(read("Q"))

    def skip(kind: int) -> None:
        if kind == 8:
            f.seek(read("Q"), 1)
        elif kind == 9:
            item, count = read("I"), read("Q")
            for _ in range(count):
                skip(item)
        else:
            f.seek(_SCALAR_SIZES[kind], 1)

    with open(path, "rb") as f:
        try:
            f.seek(GGUF_HEADER)
            for _ in range(max_keys):
                key, kind = string(), read("I")
                if key == b"general.architecture" and kind == 8:
                    return string().decode("utf-8", "replace")
                skip(kind)
        except (EOFError, KeyError, struct.error, OSError):
            return None
    return None


def _describe(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, source: dict) -> None:
    atomic_write_json(folder / MANIFEST, {"version": 1, "source": source,
                                          "files": {str(p.relative_to(folder)): _describe(p) for p in _files(folder)}})


def verify(folder: Path, deep: bool = False) -> Optional[str]:
    """Why the cached folder cannot be trusted, or None. Sizes always; sha256 where size or mtime changed (all
    files with ``deep``)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size} bytes, {want['size']} were written"
        if (deep or st.st_mtime_ns != want["mtime_ns"]) and sha256_file(path) != want["sha256"]:
            return f"{name} changed since it was written (sha256 mismatch)"
    return None


def _stale_builds(parent: Path, digest: str) -> list[Path]:
    return [p for p in parent.glob(f".{digest[:12]}.*") if p.is_dir()]


def gguf_to_cache(gguf: Path, expected_sha256: Optional[str] = None) -> Path:
    """Dequantise a GGUF file once into ``<cache>/gguf/<sha256>/`` (safetensors + tokenizer); verify it after."""
    from filelock import FileLock

    gguf = Path(gguf)
    check_gguf_file(gguf)
    arch = gguf_architecture(gguf)
    if arch not in GGUF_ARCHITECTURES:  # before the (slow) dequantisation
        known = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise MelayerError(f"{gguf}: unsupported GGUF architecture {arch!r}; supported: {known}" if arch else
                           f"{gguf}: no general.architecture in its header (truncated or not a model)")
    digest = sha256_file(gguf)
    if expected_sha256 is not None and digest != expected_sha256:
        raise MelayerError(f"GGUF checksum mismatch for {gguf}: sha256 {digest}, expected {expected_sha256}")
    parent = cache_root() / "gguf"
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / digest
    with FileLock(str(parent / f"{digest}.lock")):  # one build at a time; the others wait and then reuse it
        for stale in _stale_builds(parent, digest):  # a build killed half-way (we hold the lock: nobody builds)
            shutil.rmtree(stale, ignore_errors=True)
        if target.is_dir():
            problem = verify(target)
            if problem is None:
                return target
            say(f"the cached model {target} is damaged ({problem}): rebuilding it from {gguf}")
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=parent))
        try:
            _dequantise(gguf, tmp)
            write_manifest(tmp, {"gguf": str(gguf), "sha256": digest})
            os.replace(tmp, target)  # atomic: a killed build never leaves a half-written cache entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, EOFError, RuntimeError) as e:
        raise MelayerError(f"cannot read GGUF {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    model.hf_quantizer = None  # transformers marks GGUF-loaded models as quantized although they are dense now
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@dataclass
class EntryCheck:
    folder: Path
    source: str
    problem: Optional[str]  # None: intact


def verify_all(deep: bool = True) -> list[EntryCheck]:
    """Every cached model with what is wrong with it (sha256 of every file with ``deep``)."""
    parent = cache_root() / "gguf"
    out = []
    for folder in sorted(p for p in parent.glob("*") if p.is_dir() and not p.name.startswith(".")) \
            if parent.is_dir() else []:
        try:
            source = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["source"]["gguf"]
        except (OSError, ValueError, KeyError, TypeError):
            source = "?"
        out.append(EntryCheck(folder, source, verify(folder, deep=deep)))
    return out


def stale_builds() -> list[Path]:
    parent = cache_root() / "gguf"
    return [p for p in parent.glob(".*") if p.is_dir()] if parent.is_dir() else []
