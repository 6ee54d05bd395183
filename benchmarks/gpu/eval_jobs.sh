#!/usr/bin/env bash
# The GPU runs behind docs/results/eval_smollm2_gpu.md, eval_qwen_gpu.md and bench_generate_gpu.md, as jobs to
# start detached, one per GPU. A record: they ran with melayer 0.1's `eval` (its own tasks and --generate-only,
# before the tasks became lm-eval tasks); today's commands are in science_jobs.sh and multigpu_jobs.sh. Each eval job writes its rows to runs/gpu/<job>/samples.jsonl, which makes it
# resumable: start the same job again after a kill or a reboot and it goes on from the rows already there.
# Needs benchmarks/gpu/setup.sh sourced first (PYTHONPATH, MODEL_DIR, MELAYER_GGUF). From the repository root:
#   mkdir -p logs
#   CUDA_VISIBLE_DEVICES=0 setsid nohup bash benchmarks/gpu/eval_jobs.sh smol > logs/smol.log 2>&1 < /dev/null &
#   CUDA_VISIBLE_DEVICES=1 setsid nohup bash benchmarks/gpu/eval_jobs.sh qwen > logs/qwen.log 2>&1 < /dev/null &
# Jobs: smol, qwen, cudatests (the CUDA variants of the generation tests), bench (the bf16 noise-floor benchmark).
# DATA_DIR (default .carry/data) holds the task files; QWEN_GGUF defaults to the reassembled Qwen file.
set -u
job=${1:?usage: eval_jobs.sh smol|qwen|cudatests|bench}
DATA_DIR=${DATA_DIR:-.carry/data}
QWEN_GGUF=${QWEN_GGUF:-${MODEL_DIR:-.carry/model}/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf}
ev() { echo "== $(date +%T) melayer eval $*"; python3 -m melayer.cli eval "$@"; local rc=$?; echo "== $(date +%T) rc=$rc"; }
case $job in
smol)  # SmolLM2, 7 tasks in full: rates 0, 0.005, 0.01, 0.05 and paper mode at 0.01 and 0.05
  C=(--me-layer 11 --data-dir "$DATA_DIR" --batch-size 256 --generate-only --out runs/gpu/smol
     --tasks gsm8k,ifeval,xstest,math500,advbench,harmbench,aime24)
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.01
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.01 --wemask-mode paper
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.05,0.005
  ev "$MELAYER_GGUF" "${C[@]}" --wemask-rates 0,0.05 --wemask-mode paper
  ;;
qwen)  # Qwen2.5-Coder-1.5B: task by task at rates 0 and 0.01 (whatever finishes is paired), then paper mode
  C=(--me-layer 1 --data-dir "$DATA_DIR" --batch-size 256 --generate-only --out runs/gpu/qwen)
  for task in gsm8k xstest ifeval math500 aime24; do
    ev "$QWEN_GGUF" "${C[@]}" --tasks $task --wemask-rates 0,0.01
  done
  ev "$QWEN_GGUF" "${C[@]}" --tasks xstest,gsm8k --wemask-rates 0,0.01 --wemask-mode paper
  ;;
cudatests)  # the CUDA variants of the generation tests (static engine, CUDA graphs, compile)
  python3 -m pytest tests/test_generation.py tests/test_wemask.py -q -m "not real" -p no:cacheprovider
  ;;
bench)  # plain generate against itself under batch changes, and the engines (docs/results/bench_generate_gpu.md)
  python3 benchmarks/bench_generate_gpu.py --model "$MELAYER_GGUF" --data-dir "$DATA_DIR" --batch 32 \
    --max-new-tokens 256 --repeats 2 --hf-repeats 1 --compile --noise-floor --no-cost-split --out runs/gpu/bench
  ;;
*) echo "unknown job: $job" >&2; exit 2 ;;
esac
echo "== $(date +%T) job $job done"
