#!/usr/bin/env bash
# The multi-GPU runs behind docs/results/multigpu.md, on one box with N GPUs (needs benchmarks/gpu/setup.sh sourced:
# PYTHONPATH, MELAYER_GGUF). Everything lands in runs/multigpu/; then, on any machine:
#   python benchmarks/multigpu_compare.py runs/multigpu --out docs/results/multigpu
# Usage: benchmarks/gpu/multigpu_jobs.sh [N (default: every GPU)] [eval|model|train|all (default all)]
# MODEL (default $MELAYER_GGUF, SmolLM2 with ME layer 11) and DATA_DIR (default .carry/data) may be overridden;
# LIMIT (documents per task) and STEPS (SFT steps) shrink the runs for a dry run, e.g. on a CPU box.
set -u
N=${1:-$(nvidia-smi -L | wc -l)}
part=${2:-all}
M=${MODEL:-$MELAYER_GGUF}
DATA_DIR=${DATA_DIR:-.carry/data}
OUT=runs/multigpu
LIMIT_ARGS=(); [ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")
STEPS=${STEPS:-16}
mkdir -p "$OUT"
ml() { python3 -m melayer.cli "$@"; }
clock() { date +%s.%N; }
record() { echo "$1 $(python3 -c "print(round($3 - $2, 2))") N=$N" >> "$OUT/times.txt"; }
LAST=$((N - 1))

if [ "$part" = eval ] || [ "$part" = all ]; then
  # 1. the SmolLM2 sweep (GSM8K + XSTest, rates 0 and 0.01) on one GPU, then sharded over N GPUs and merged
  EV=(--tasks melayer_gsm8k,melayer_xstest --wemask-rates 0,0.01 --me-layer 11 --data-dir "$DATA_DIR" --batch-size 64
      "${LIMIT_ARGS[@]}")
  t0=$(clock); CUDA_VISIBLE_DEVICES=0 ml eval "$M" "${EV[@]}" --out "$OUT/eval_1gpu"; record eval_1gpu "$t0" "$(clock)"
  t0=$(clock)
  for i in $(seq 0 "$LAST"); do
    CUDA_VISIBLE_DEVICES=$i ml eval "$M" "${EV[@]}" --shard "$i/$N" --out "$OUT/eval_shard-$i" > "$OUT/eval_shard-$i.log" 2>&1 &
  done
  wait
  record eval_sharded "$t0" "$(clock)"
  ml eval --merge "$OUT"/eval_shard-*/ --out "$OUT/eval_merged" --data-dir "$DATA_DIR"
fi

if [ "$part" = model ] || [ "$part" = all ]; then
  # 2. one model over every GPU (device_map="auto", what melayer does with several GPUs visible) against one GPU
  P="What is the capital of Australia?"
  CUDA_VISIBLE_DEVICES=0 ml scan "$M" --out "$OUT/scan_1gpu"
  ml scan "$M" --out "$OUT/scan_ngpu"
  CUDA_VISIBLE_DEVICES=0 ml generate "$M" --prompt "$P" --wemask-rate 0.05 --me-layer 11 --compare --chat \
      --max-new-tokens 64 > "$OUT/generate_1gpu.txt"
  ml generate "$M" --prompt "$P" --wemask-rate 0.05 --me-layer 11 --compare --chat --max-new-tokens 64 \
      > "$OUT/generate_ngpu.txt"
fi

if [ "$part" = train ] || [ "$part" = all ]; then
  # 3. SFT with WeMask, same global batch: one GPU accumulating N micro-batches, N GPUs under DDP and under FSDP
  TR=(sft "$M" --data-dir "$DATA_DIR" --limit 512 --max-steps "$STEPS" --wemask-rate 0.05 --me-layer 11
      --seed 0 --logging-steps 1 --save-steps "$STEPS" --lr-scheduler constant --warmup 0)
  t0=$(clock); CUDA_VISIBLE_DEVICES=0 ml train "${TR[@]}" --batch-size 4 --grad-accum "$N" --out "$OUT/sft_1gpu"
  record sft_1gpu "$t0" "$(clock)"
  t0=$(clock); torchrun --standalone --nproc_per_node "$N" -m melayer.cli train "${TR[@]}" --batch-size 4 \
      --out "$OUT/sft_ddp"; record sft_ddp "$t0" "$(clock)"
  t0=$(clock); accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes "$N" -m melayer.cli \
      train "${TR[@]}" --batch-size 4 --out "$OUT/sft_fsdp"; record sft_fsdp "$t0" "$(clock)"
fi
exit 0
