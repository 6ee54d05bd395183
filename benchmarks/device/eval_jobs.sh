#!/usr/bin/env bash
# GPU evaluation jobs of docs/results/eval_*_gpu.md, started detached (setsid) on the device machine so that
# later calls can carry the Qwen chunks while the GPU works. Each job snapshots src/ and the data into /tmp
# first (the checkout is re-synced on every call), writes its rows to /tmp/ev_<job>/samples.jsonl (resumable:
# it starts from the earlier sessions' rows copied to /tmp/prev by the caller) and logs to /tmp/logs/<job>.log.
# Needs setup.sh sourced (PYTHONPATH, MELAYER_GGUF); qwen needs QWEN_GGUF. Pick the GPU with CUDA_VISIBLE_DEVICES:
#   CUDA_VISIBLE_DEVICES=0 setsid nohup bash benchmarks/device/eval_jobs.sh smol > /tmp/logs/smol.log 2>&1 < /dev/null &
# benchmarks/device/snapshot.sh copies the rows and logs so far into $OUT (call it in every keep-alive call).
set -u
job=$1
mkdir -p /tmp/snap_$job && cp -r src tests /tmp/snap_$job/ && export PYTHONPATH=/tmp/site:/tmp/snap_$job/src
[ -d /tmp/evdata ] || cp -r .carry/evdata /tmp/evdata
ev() { echo "== $(date +%T) melayer eval $*"; python3 -m melayer.cli eval "$@"; local rc=$?; echo "== $(date +%T) rc=$rc"; }
resume() {  # $1 = job: start from the earlier sessions' rows and their config
  local out=/tmp/ev_$1; mkdir -p $out
  [ -f $out/samples.jsonl ] || { gunzip -c /tmp/prev/ev_$1_prev.jsonl.gz > $out/samples.jsonl;
                                 cp /tmp/prev/ev_$1_prev_config.json $out/eval_config.json; }
}
case $job in
smol)  # SmolLM2: session 1 made rates 0, 0.01 and part of 0.05; add paper mode, the rest of 0.05, and 0.005
  resume smol
  C=(--me-layer 11 --data-dir /tmp/evdata --batch-size 256 --generate-only --out /tmp/ev_smol
     --tasks gsm8k,ifeval,xstest,math500,advbench,harmbench,aime24)
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.01 --wemask-mode paper
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.05,0.005
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.05 --wemask-mode paper
  ;;
qwen)  # Qwen: session 2 made GSM8K, XSTest (0, 0.01) and IFEval (0); task by task so whatever finishes is paired
  resume qwen
  for task in ifeval math500 aime24; do
    ev "$QWEN_GGUF" --me-layer 1 --data-dir /tmp/evdata --batch-size 256 --generate-only --out /tmp/ev_qwen \
       --tasks $task --wemask-rates 0,0.01
  done
  ev "$QWEN_GGUF" --me-layer 1 --data-dir /tmp/evdata --batch-size 256 --generate-only --out /tmp/ev_qwen \
     --tasks xstest,gsm8k --wemask-rates 0,0.01 --wemask-mode paper
  ;;
cudatests)  # the CUDA variants of the generation tests (static engine, CUDA graphs, compile)
  cd /tmp/snap_$job && python3 -m pytest tests/test_generation.py tests/test_wemask.py -q -m "not real" -p no:cacheprovider
  ;;
bench)
  python3 benchmarks/bench_generate_gpu.py --model "$MELAYER_GGUF" --data-dir /tmp/evdata --batch 32 \
    --max-new-tokens 256 --repeats 2 --hf-repeats 1 --compile --noise-floor --no-cost-split --out /tmp/bgg
  ;;
esac
echo "== $(date +%T) job $job done"
