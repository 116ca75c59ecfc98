#!/usr/bin/env bash
# Every figure in the README's "Results" section, measured on the bundled demo pair.
# Usage: bash benchmarks/demo_measurements.sh [DATA_DIR]   (DATA_DIR: the benchmark prompt sets,
# default ../shared/benchmarks). Writes runs/*.json, *.md and *.png. Takes ~20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/benchmarks}
mkdir -p runs

# Issue 2: plain decoding vs transformers generate(), batch 1 and 8, 1 and 2 threads.
python benchmarks/plain_vs_transformers.py --threads 1 --max-tokens 128 --repeats 2 --out runs/bench_plain_t1.json
python benchmarks/plain_vs_transformers.py --threads 2 --max-tokens 128 --repeats 2 --out runs/bench_plain_t2.json

# Issue 4: τ of the demo drafter on the first 40 HumanEval prompts, γ = 7, at temperature 0 and 1.
for T in 0 1; do
  dspark eval --drafters dspark --data-dir "$DATA" --sets humaneval --num-prompts 40 \
    --temperature "$T" --gamma 7 --max-tokens 128 --batch-size 8 --threads 1 --out "runs/eval_demo_t$T.json"
done

# Issue 5: DSpark vs the DFlash baseline on the code sets, temperature 1, γ = 7.
dspark eval --drafters dspark,dflash --data-dir "$DATA" --sets humaneval,mbpp,livecodebench --num-prompts 40 \
  --temperature 1 --gamma 7 --max-tokens 128 --batch-size 8 --threads 1 --out runs/eval_demo_t1.json

# Issue 4/5: wall-clock tokens/s at batch 1, greedy, side by side, identical output checked.
dspark bench --drafters dspark,ngram --data-dir "$DATA" --set humaneval --num-prompts 20 \
  --max-tokens 128 --gamma 7 --threads 2 --repeats 1 --out runs/bench_demo.json
