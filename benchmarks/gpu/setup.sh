# Source this from the repository root on the GPU box, after copying the checkout with its staged .whl/ and
# .carry/ folders there (see benchmarks/gpu/README.md):
#   source benchmarks/gpu/setup.sh || exit 1
# It installs the carried packages that are not installed yet (from .whl/, without an index), puts melayer's
# src/ on PYTHONPATH, reassembles every staged model in .carry/model/ from its parts and checks its sha256.
# It exports MODEL_DIR (the folder of the reassembled .gguf files) and MELAYER_GGUF (the default SmolLM2 file,
# when it was staged), and returns non-zero on any failure.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --find-links .whl $(ls .whl/*.whl | sed -E 's|.*/||; s|-.*||') || return 1
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MODEL_DIR=$PWD/.carry/model
for sums in "$MODEL_DIR"/*.sha256; do
  [ -f "$sums" ] || continue
  name=$(awk '{print $2}' "$sums")
  [ -f "$MODEL_DIR/$name" ] || cat "$MODEL_DIR/$name".part* > "$MODEL_DIR/$name" || return 1
  (cd "$MODEL_DIR" && sha256sum -c "$sums") || { rm -f "$MODEL_DIR/$name"; return 1; }
done
[ -f "$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ] && export MELAYER_GGUF=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
return 0
