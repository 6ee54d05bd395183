#!/usr/bin/env bash
# Stage what a GPU run of melayer needs on the device machine, into ignored folders that `carry` names:
#   .carry/model.partNN   the default GGUF model split into chunks (each device call carries at most 64 MiB)
#   .carry/data/          the shared data files the GPU runs read (GSM8K test by default; add more with DATA=...)
#   .whl/                 pure-python wheels missing from the device image (gguf, platformdirs)
# See benchmarks/device/README.md for the call sequence. Usage: benchmarks/device/stage_default_model.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CHUNK_MB=${CHUNK_MB:-48}            # 2 chunks of the 94 MiB file; keep CHUNK_MB + tree + wheels < 64 MiB
DATA=${DATA:-"gsm8k/test.jsonl"}     # paths under ../shared/data to copy into .carry/data
SHARED=${SHARED:-../shared/data}

gguf=$($PY -c 'from melayer.load import default_gguf_path; print(default_gguf_path())' 2>/dev/null \
       || PYTHONPATH=src $PY -c 'from melayer.load import default_gguf_path; print(default_gguf_path())')
want=$(PYTHONPATH=src $PY -c 'from melayer.load import DEFAULT_GGUF_SHA256; print(DEFAULT_GGUF_SHA256)')
have=$(sha256sum "$gguf" | cut -d' ' -f1)
[ "$have" = "$want" ] || { echo "checksum mismatch for $gguf: $have != $want" >&2; exit 1; }

rm -rf .carry/model.part* && mkdir -p .carry/data .whl
split -b "${CHUNK_MB}m" -d -a 2 "$gguf" .carry/model.part
echo "$want  $(basename "$gguf")" > .carry/model.sha256
for f in $DATA; do mkdir -p ".carry/data/$(dirname "$f")"; cp "$SHARED/$f" ".carry/data/$f"; done

$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl gguf==0.19.0 platformdirs==4.14.8

ls -l .carry/model.part* .whl/
echo "staged: carry .carry/model.part00 in call 1, .carry/model.part01 (+ .carry/model.sha256 .carry/data .whl) in call 2"
