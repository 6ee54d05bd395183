#!/usr/bin/env bash
# Stage Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, 1.07 GiB) for the device machine: a call carries at most
# 64 MiB, so the file travels as ~19 chunks of 58 MiB, one per back-to-back call (see README.md, "Qwen").
#   .carry/qwen/partNN      the chunks          .carry/qwen.sha256   the whole file's checksum
# Usage: benchmarks/device/stage_qwen.sh [GGUF]   (default: the file benchmarks/get_qwen25_coder.py assembles)
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=${1:-$HOME/.cache/melayer/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf}
WANT=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
CHUNK_MB=${CHUNK_MB:-58}
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$WANT" ] || { echo "checksum mismatch: $GGUF" >&2; exit 1; }
rm -rf .carry/qwen && mkdir -p .carry/qwen
split -b "${CHUNK_MB}m" -d -a 2 "$GGUF" .carry/qwen/part
echo "$WANT  $(basename "$GGUF")" > .carry/qwen.sha256
ls .carry/qwen | wc -l
