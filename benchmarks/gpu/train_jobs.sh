#!/usr/bin/env bash
# The fine-tuning comparisons of benchmarks/train_compare.py on a GPU (docs/results/train_sft_gpu.md), as detached,
# resumable jobs that can share one GPU. Needs benchmarks/gpu/setup.sh sourced first. From the repository root:
#   mkdir -p logs && setsid nohup bash benchmarks/gpu/train_jobs.sh sft 0 > logs/sft0.log 2>&1 < /dev/null &
# Jobs:
#   sft SEED [ARGS] SmolLM2 SFT on GSM8K train (one epoch), baseline vs WeMask 0.01 at after_me and from_after_me;
#                GSM8K test (all 1,319). Run one per seed (0, 1, 2), or one per
#                seed and arm (ARGS: --train-arms baseline|after_me|from_after_me), then `report sft`.
#   grpo ARM [ARGS] SmolLM2 GRPO on GSM8K (4 rollouts per prompt, KL 0.001), ARM baseline or from_after_me
#                (ARGS: --rollouts vllm generates in TRL's colocated vLLM engine, after setup_vllm.sh);
#                GSM8K test and MATH-500. Run both arms, then `report grpo`.
#   dpo_prefs    the preference pairs for DPO: sampled from the unmasked Qwen2.5-Coder-1.5B on the refusal
#                val prompts, judged by melayer's refusal classifier (shared by both DPO arms).
#   dpo ARM [ARGS] Qwen2.5-Coder-1.5B DPO (LoRA) on those pairs, ARM baseline or from_after_me; XSTest safe and
#                unsafe, held-out harmless prompts, AdvBench, HarmBench. Then `report dpo`.
#   report STUDY rewrite OUT/STUDY/train_compare.{md,json,png} from whatever has finished.
# ARGS go to benchmarks/train_compare.py, e.g. --eval-engine vllm --eval-vllm-args gpu_memory_utilization=0.3
# (after setup_vllm.sh) to evaluate in vLLM.
# SMOL_GGUF / QWEN_GGUF: the models (default: the files setup.sh reassembled); DATA_DIR: the task files.
set -u
job=${1:?usage: train_jobs.sh sft SEED | grpo ARM | dpo_prefs | dpo ARM | report sft|grpo|dpo}
DATA_DIR=${DATA_DIR:-.carry/data}
SMOL_GGUF=${SMOL_GGUF:-${MODEL_DIR:-.carry/model}/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN_GGUF=${QWEN_GGUF:-${MODEL_DIR:-.carry/model}/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf}
OUT=${JOB_OUT:-runs/gpu}
PREFS=$OUT/dpo/preferences/preferences.jsonl

compare() {
  echo "== $(date +%T) train_compare $*"; python3 benchmarks/train_compare.py "$@"; local rc=$?
  echo "== $(date +%T) rc=$rc"; return $rc
}
sft() { compare --algo sft --model "$SMOL_GGUF" --data-dir "$DATA_DIR" --out "$OUT/sft" --me-layer 11 \
          --arms after_me,from_after_me --batch-size 16 --save-steps 0 --no-gradient-checkpointing \
          --eval-batch-size 256 --max-new-tokens 320 "$@"; }
grpo() { compare --algo grpo --model "$SMOL_GGUF" --data-dir "$DATA_DIR" --out "$OUT/grpo" --me-layer 11 \
           --arms from_after_me --seeds 0 --batch-size 32 --num-generations 4 --beta 0.001 --lr 3e-6 \
           --max-steps 80 --max-completion-length 200 --save-steps 20 --eval-batch-size 256 \
           --max-new-tokens 512 "$@"; }
dpo() { compare --algo dpo --model "$QWEN_GGUF" --data "$PREFS" --data-dir "$DATA_DIR" --out "$OUT/dpo" \
          --me-layer 1 --arms from_after_me --seeds 0 --lora --lr 2e-5 --batch-size 8 \
          --save-steps 0 --eval-limit 520 --eval-batch-size 128 --eval-dtype bf16 "$@"; }

case $job in
sft) sft --seeds "${2:?seed}" "${@:3}" ;;
grpo) grpo --train-arms "${2:?arm}" "${@:3}" ;;
dpo_prefs) echo "== $(date +%T) preferences"
  if [ -s "$PREFS" ] && [ -s "${PREFS%.jsonl}_config.json" ]; then echo "reusing $PREFS"; exit 0; fi
  python3 -m melayer.cli data preferences "$QWEN_GGUF" --source refusal --data-dir "$DATA_DIR" --n 4 \
    --limit 512 --prompt-batch 32 --fill reference --seed 0 --out "$PREFS" ;;
dpo) dpo --train-arms "${2:?arm}" "${@:3}" ;;
report) case ${2:?study} in
  sft) sft --seeds 0,1,2 --report-only ;;
  grpo) grpo --report-only ;;
  dpo) dpo --report-only ;;
  esac ;;
*) echo "unknown job $job" >&2; exit 2 ;;
esac
rc=$?  # the job's own status, so that a wrapper can retry a failed job
echo "== $(date +%T) job $job done (rc=$rc)"
exit $rc
