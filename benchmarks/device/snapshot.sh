#!/usr/bin/env bash
# Copy the detached jobs' rows and logs so far into $OUT, so that every keep-alive call brings them back and a
# lost machine loses nothing that an earlier call returned. Torn last lines are fine: the log reader skips them.
for f in /tmp/ev_*/samples.jsonl; do [ -f "$f" ] && gzip -1 -c "$f" > "$OUT/$(basename "$(dirname "$f")").jsonl.gz"; done
tar czf "$OUT/logs.tgz" -C /tmp logs 2>/dev/null
for f in /tmp/logs/*.log; do echo "--- $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 4; done
wc -l /tmp/ev_*/samples.jsonl 2>/dev/null; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
