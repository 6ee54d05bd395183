#!/usr/bin/env bash
# GPU evaluation jobs of docs/results/eval_*_gpu.md, started detached (setsid) on the device machine so that
# later calls can carry the Qwen chunks while the GPU works. Each job snapshots src/ and the data into /tmp
# first (the checkout is re-synced on every call), writes its rows to /tmp/ev_<job>/samples.jsonl (resumable)
# and logs to /tmp/logs/<job>.log. Needs setup.sh sourced (PYTHONPATH, MELAYER_GGUF); qwen needs QWEN_GGUF.
#   setsid nohup bash benchmarks/device/eval_jobs.sh smol > /tmp/logs/smol.log 2>&1 < /dev/null &
set -u
job=$1
mkdir -p /tmp/snap_$job && cp -r src /tmp/snap_$job/ && export PYTHONPATH=/tmp/site:/tmp/snap_$job/src
[ -d /tmp/evdata ] || cp -r .carry/evdata /tmp/evdata
ev() { echo "== $(date +%T) melayer eval $*"; python3 -m melayer.cli eval "$@"; local rc=$?; echo "== $(date +%T) rc=$rc"; }
case $job in
smol)  # resumes the first session's rows (rates 0, 0.01, part of 0.05), same model path, batch and engine
  out=/tmp/ev_smol; mkdir -p $out
  [ -f $out/samples.jsonl ] || { gunzip -c .carry/ev_smol_prev.jsonl.gz > $out/samples.jsonl;
                                 cp .carry/ev_smol_prev_config.json $out/eval_config.json; }
  C=(--me-layer 11 --data-dir /tmp/evdata --batch-size 256 --generate-only --out $out
     --tasks gsm8k,ifeval,xstest,math500,advbench,harmbench,aime24)
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.01 --wemask-mode paper
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.05,0.005
  ;;
qwen)  # task by task, both rates each, so that whatever finishes is paired
  while pgrep -f bench_generate_gpu > /dev/null; do sleep 2; done  # the GPU benchmark runs alone
  for task in gsm8k xstest ifeval math500; do
    ev "$QWEN_GGUF" --me-layer 1 --data-dir /tmp/evdata --batch-size 256 --generate-only --out /tmp/ev_qwen \
       --tasks $task --wemask-rates 0,0.01
  done
  ;;
bench)
  python3 benchmarks/bench_generate_gpu.py --model "$MELAYER_GGUF" --data-dir /tmp/evdata --batch 32 \
    --max-new-tokens 256 --repeats 2 --hf-repeats 1 --compile --noise-floor --no-cost-split --out /tmp/bgg
  ;;
esac
echo "== $(date +%T) job $job done"
