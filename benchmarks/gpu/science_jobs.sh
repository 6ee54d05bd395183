#!/usr/bin/env bash
# The GPU runs behind docs/results/explain.md and docs/results/rate_curve.md, as detached, resumable jobs.
# Needs benchmarks/gpu/setup.sh sourced first (PYTHONPATH, MODEL_DIR). From the repository root:
#   mkdir -p logs && setsid nohup bash benchmarks/gpu/science_jobs.sh smollm2 > logs/smollm2.log 2>&1 < /dev/null &
# Jobs: smollm2, qwen25coder (scan, explain with 128 prompts, then the rate curves: each task at 10 rates x
# {after_me, from_after_me} x {clean, paper}; an eval out dir resumes from its logged answers, and
# `melayer eval --score-only --tasks T ...` rescores whatever finished), bench_scan, and the pre-registered
# confirmatory runs, exactly as docs/results/preregistration_{overrefusal,mmlu,overrefusal_rate01}.md fix them:
# confirm_overrefusal, confirm_mmlu, confirm_overrefusal_rate01 (analysed by benchmarks/confirmatory.py);
# smollm2_rest, qwen25coder_rest: the curves the first runs did not reach (docs/results/rate_curve.md; Qwen's
# XSTest and paper GSM8K curves, run first by an earlier qwen25coder_rest, are there with their commands), into
# rates_smollm2_rest2_* and rates_qwen25coder_rest2_*, task by task (`qwen25coder_rest wikitext2` runs one part,
# `qwen25coder_rest "wikitext2 mmlutext"` two: parts can run as parallel jobs), each the coarser GRID first, then
# the other rates of the full grid (a run resumes from its logged answers: the second pass only answers the new
# conditions). qwen25coder_gsm8k_full: the one GSM8K curve that moved (Qwen, paper protocol, 5 % -> 0 from rate 0.01 at
# from_after_me on 100 problems) on all 1,319 problems, at rates 0, 0.01, 0.1 and 1, both layer sets; as N shards
# that can run in parallel (`qwen25coder_gsm8k_full 0/4` ... `3/4`, each into ..._paper_shardI), then
# `qwen25coder_gsm8k_full merge 4` joins them into rates_qwen25coder_gsm8k_full_paper and scores the whole run.
# SMOL_GGUF / QWEN_GGUF: the models (default: the files setup.sh reassembled); DATA_DIR: the task files.
set -u
job=${1:?usage: science_jobs.sh smollm2|qwen25coder|smollm2_rest [PARTS]|qwen25coder_rest [PARTS]|qwen25coder_gsm8k_full [I/N|merge N]|bench_scan|confirm_overrefusal|confirm_mmlu|confirm_overrefusal_rate01}
DATA_DIR=${DATA_DIR:-.carry/data}
SMOL_GGUF=${SMOL_GGUF:-${MODEL_DIR:-.carry/model}/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN_GGUF=${QWEN_GGUF:-${MODEL_DIR:-.carry/model}/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf}
OUT=${JOB_OUT:-runs/gpu}
RATES=0,0.005,0.01,0.02,0.05,0.1,0.25,0.5,0.75,1
GRID=0,0.01,0.1,0.25,0.5,1  # the coarser grid of the *_rest jobs: every layer set within one GPU session
run() { echo "== $(date +%T) melayer $*"; python3 -m melayer.cli "$@"; local rc=$?; echo "== $(date +%T) rc=$rc"; }

rates() {  # rates MODEL NAME TASK LIMIT PROTOCOLS [RATES] [LAYER_SETS] [BATCH] [SHARD I/N]: one task's rate curve
  local model=$1 name=$2 task=$3 limit=$4 protocols=$5 rates=${6:-$RATES} layers=${7:-after_me from_after_me}
  local batch=${8:-128} shard=${9:-} suffix="" extra=()
  [ "$limit" = all ] || extra=(--limit "$limit")
  [ -z "$shard" ] || { extra+=(--shard "$shard"); suffix=_shard${shard%/*}; }
  for protocol in $protocols; do
    run eval "$model" --protocol "$protocol" --tasks "$task" "${extra[@]}" --wemask-rates "$rates" \
      --wemask-layers $layers --data-dir "$DATA_DIR" --batch-size "$batch" \
      --out "$OUT/rates_${name}_${protocol}$suffix"
  done
}

model_job() {  # everything for one model, cheapest first: scan, explain, then the rate curves task by task
  local model=$1 name=$2
  run scan "$model" --out "$OUT/scan_$name"
  run explain "$model" --full --ppl-data-dir "$DATA_DIR" --ppl-tokens 16384 --out "$OUT/explain_$name"
  rates "$model" "$name" melayer_wikitext2 12 clean  # 12 of the 62 articles: rolling perplexity is the slow part
  rates "$model" "$name" melayer_mmlu 500 "clean paper"
  rates "$model" "$name" melayer_xstest all "clean paper"
  rates "$model" "$name" melayer_gsm8k 100 "clean paper"
}

case $job in
smollm2) model_job "$SMOL_GGUF" smollm2 ;;
qwen25coder) model_job "$QWEN_GGUF" qwen25coder ;;
smollm2_rest) for part in ${2:-mmlutext gsm8k}; do for rates in "$GRID" "$RATES"; do case $part in
    mmlutext) rates "$SMOL_GGUF" smollm2_rest2_mmlutext melayer_mmlu_text 500 clean "$rates" from_after_me ;;
    gsm8k) rates "$SMOL_GGUF" smollm2_rest2 melayer_gsm8k 100 clean "$rates" ;;  # the paper protocol's ran on a CPU
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac; done; done ;;
qwen25coder_rest) for part in ${2:-gsm8k wikitext2 mmlutext mmlu_paper}; do for rates in "$GRID" "$RATES"; do
  case $part in
    gsm8k) rates "$QWEN_GGUF" qwen25coder_rest2 melayer_gsm8k 100 clean "$rates" ;;
    # rolling perplexity over whole articles: fp32 attention over up to 32k tokens, one article per batch
    wikitext2) rates "$QWEN_GGUF" qwen25coder_rest2_wikitext2 melayer_wikitext2 12 clean "$rates" "after_me from_after_me" 1 ;;
    mmlutext) rates "$QWEN_GGUF" qwen25coder_rest2_mmlutext melayer_mmlu_text 500 clean "$rates" "after_me from_after_me" 64 ;;
    mmlu_paper) [ "$rates" = "$GRID" ] || continue  # its missing rates: from_after_me above 0.02
      rates "$QWEN_GGUF" qwen25coder_rest2 melayer_mmlu 500 paper 0,0.05,0.1,0.25,0.5,0.75,1 from_after_me 64 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac; done; done ;;
qwen25coder_gsm8k_full) full=$OUT/rates_qwen25coder_gsm8k_full_paper
  if [ "${2:-}" = merge ]; then
    run eval "$QWEN_GGUF" --merge $(for i in $(seq 0 $(( ${3:?merge N} - 1 ))); do echo "${full}_shard$i"; done) --out "$full" \
      --data-dir "$DATA_DIR"
  else
    rates "$QWEN_GGUF" qwen25coder_gsm8k_full melayer_gsm8k all paper 0,0.01,0.1,1 "after_me from_after_me" 128 "${2:-}"
  fi ;;
bench_scan) mkdir -p "$OUT/bench"; python3 benchmarks/bench_scan.py --model "$SMOL_GGUF" --device cuda --tokens 2048 --repeats 5 \
              --out "$OUT/bench/bench_scan_gpu.json" --profile ;;
confirm_overrefusal) run eval "$QWEN_GGUF" --protocol clean --tasks melayer_xstest,melayer_harmless --limit 2000 \
    --seed 1 --wemask-rates 0,0.01 --wemask-mode paper --wemask-layers after_me --me-layer 1 --dtype bf16 \
    --data-dir "$DATA_DIR" --out "$OUT/confirm_overrefusal" ;;
confirm_overrefusal_rate01) run eval "$QWEN_GGUF" --protocol paper --tasks melayer_xstest,melayer_harmless \
    --wemask-rates 0,0.1 --wemask-layers after_me --me-layer 1 --data-dir "$DATA_DIR" --batch-size 128 \
    --out "$OUT/confirm_overrefusal_rate01" ;;
confirm_mmlu) run eval "$QWEN_GGUF" --protocol paper --tasks melayer_mmlu --limit 3500 --seed 1 \
    --wemask-rates 0,0.01 --wemask-layers from_after_me --me-layer 1 --data-dir "$DATA_DIR" \
    --out "$OUT/confirm_mmlu" ;;
*) echo "unknown job $job" >&2; exit 2 ;;
esac
echo "== $(date +%T) job $job done"
