#!/usr/bin/env bash
# Copy what detached jobs have written so far, so that partial results can leave the GPU box at any time:
# every <run dir>/responses.jsonl (the answer log of `melayer eval`) under RUNS (gzipped, named after its folder) and the logs in LOGS (a tarball)
# go to DEST; then the last lines of each log, the row counts and the GPUs' load are printed. A torn last row
# is fine: `melayer eval` skips it when it reads the file.
# Usage: benchmarks/gpu/snapshot.sh DEST [RUNS (default runs/gpu)] [LOGS (default logs)]
set -u
dest=${1:?usage: snapshot.sh DEST [RUNS] [LOGS]}; runs=${2:-runs/gpu}; logs=${3:-logs}
mkdir -p "$dest"
for f in "$runs"/*/responses.jsonl; do
  [ -f "$f" ] && gzip -1 -c "$f" > "$dest/$(basename "$(dirname "$f")").jsonl.gz"
done
[ -d "$logs" ] && tar czf "$dest/logs.tgz" "$logs"
for f in "$logs"/*.log; do [ -f "$f" ] && { echo "--- $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 4; }; done
wc -l "$runs"/*/responses.jsonl 2>/dev/null
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
exit 0
