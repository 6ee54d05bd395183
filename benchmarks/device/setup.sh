# Source this at the start of a device call (after the chunk calls of README.md):
#   wheels -> /tmp/site, melayer from src/, default model assembled and checked at /tmp/model/.
# Sets MELAYER_GGUF to the model file; returns non-zero (and the call should stop) on any failure.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
mkdir -p /tmp/model
for part in .carry/model.part*; do [ -f "$part" ] && cp -n "$part" /tmp/model/; done
MELAYER_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MELAYER_GGUF" ] || cat /tmp/model/model.part* > "$MELAYER_GGUF"
sums=$PWD/.carry/model.sha256
(cd /tmp/model && sha256sum -c "$sums") || { rm -f "$MELAYER_GGUF"; return 1; }
export MELAYER_GGUF
