#!/usr/bin/env bash
# Copy what detached jobs have written so far, so that partial results can leave the GPU box at any time:
# each folder under RUNS becomes DEST/<folder>.tgz (answer logs, configs, reports, training curves; model
# weights and checkpoints left out), the logs in LOGS DEST/logs.tgz; then the last lines of each log, the
# answer-log row counts and the GPUs' load are printed. A torn last row is fine: `melayer eval` skips it.
# Usage: benchmarks/gpu/snapshot.sh DEST [RUNS (default runs/gpu)] [LOGS (default logs)]
set -u
dest=${1:?usage: snapshot.sh DEST [RUNS] [LOGS]}; runs=${2:-runs/gpu}; logs=${3:-logs}
mkdir -p "$dest"
for d in "$runs"/*/; do
  [ -d "$d" ] && tar czf "$dest/$(basename "$d").tgz" -C "$runs" --exclude='*.safetensors' --exclude='*.bin' \
    --exclude='*.pt' --exclude='*.pth' --exclude='checkpoint-*' --exclude='lm_eval' "$(basename "$d")"
done
[ -d "$logs" ] && tar czf "$dest/logs.tgz" "$logs"
for f in "$logs"/*.log; do [ -f "$f" ] && { echo "--- $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 3; }; done
find "$runs" -name responses.jsonl -exec wc -l {} + 2>/dev/null | tail -n 20
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
ls -l "$dest"
exit 0
