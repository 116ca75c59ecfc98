#!/usr/bin/env bash
# Every figure in the README's "Results on the demo target" sections, measured on the bundled demo pair
# (the SmolLM2 figures: benchmarks/smollm2_measurements.sh).
# Usage: bash benchmarks/demo_measurements.sh [DATA_DIR]   (DATA_DIR: the benchmark prompt sets,
# default ../shared/benchmarks). Writes runs/*.json, *.md and *.png. Takes ~60 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/benchmarks}
M=models/dspark-demo-target
mkdir -p runs

# Issue 2: plain decoding vs transformers generate(), batch 1 and 8, 1 and 2 threads.
python benchmarks/plain_vs_transformers.py --model "$M" --threads 1 --max-tokens 128 --repeats 2 --out runs/bench_plain_t1.json
python benchmarks/plain_vs_transformers.py --model "$M" --threads 2 --max-tokens 128 --repeats 2 --out runs/bench_plain_t2.json

# Issue 4: τ of the demo drafter on the first 40 HumanEval prompts, γ = 7, at temperature 0 and 1.
for T in 0 1; do
  dspark eval --model "$M" --drafters dspark --data-dir "$DATA" --sets humaneval --num-prompts 40 \
    --temperature "$T" --gamma 7 --max-tokens 128 --batch-size 8 --threads 1 --out "runs/eval_demo_t$T.json"
done

# Issue 5: Table 1 on the demo target: every trained drafter (same data, target layers, γ and steps),
# temperature 1, γ = 7, 40 prompts of each code, math and chat set.
dspark eval --model "$M" --drafters dspark,dflash,eagle3,draft-model,DSpark-5L=models/dspark-demo-drafter-5l,DFlash-5L=models/dspark-demo-dflash-5l \
  --data-dir "$DATA" --sets humaneval,mbpp,livecodebench,gsm8k,math500,aime25,mt-bench,arena-hard-v2 \
  --num-prompts 40 --temperature 1 --gamma 7 --max-tokens 128 --batch-size 8 --threads 1 --out runs/table1_t1.json

# Issue 5: τ against γ for the γ = 7 drafters (the paper's Figure 4 needs drafters trained on larger blocks).
dspark eval --model "$M" --drafters dspark,dflash,eagle3 --data-dir "$DATA" --sets humaneval --num-prompts 40 --temperature 1 \
  --gamma 7 --gammas 1,2,3,4,5,6,7 --max-tokens 128 --batch-size 8 --threads 1 --out runs/gamma_sweep_t1.json
python benchmarks/plot_training_curves.py --out runs/drafter_training_curves.png DSpark=models/dspark-demo-drafter \
  DSpark-5L=models/dspark-demo-drafter-5l DFlash=models/dspark-demo-dflash DFlash-5L=models/dspark-demo-dflash-5l EAGLE-3=models/dspark-demo-eagle3

# Issue 5: wall-clock tokens/s at batch 1, greedy, side by side, identical output checked; our drafters,
# the confidence scheduler, prompt lookup, and transformers plain / prompt lookup / assisted generation.
dspark bench --model "$M" --drafters dspark,dflash,eagle3,draft-model,ngram,DSpark-5L=models/dspark-demo-drafter-5l --policies static,confidence \
  --data-dir "$DATA" --set humaneval --num-prompts 20 --max-tokens 128 --gamma 7 --threads 2 --repeats 2 \
  --out runs/bench_demo.json

# Where a round's time goes (batch 1), with the packed GEMM and without.
python benchmarks/profile_round.py --threads 1 --repeats 50
python benchmarks/profile_round.py --threads 1 --repeats 50 --cpu-gemm off
