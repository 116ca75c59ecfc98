"""Where the time of plain decoding at batch 1 and batch 8 goes, on the calls `plain_vs_transformers.py`
times (its 8 chat prompts, greedy, eos ignored), alternating batch 1 and batch 8 in one process.

    python benchmarks/batch_breakdown.py --threads 2 [--max-tokens 64] [--repeats 3] [--kv-cache-dtype auto]
                                         [--out runs/batch_breakdown.json]

For each call: wall seconds; the target's prefill forwards (prompt tokens) and decode forwards (one new
token per sequence), and within the decode forwards the decoder layers (`int4_gemm.layers`, attention
included) and the LM head (`int4_gemm._run_il` on its rows); everything else (sampling, scheduling,
detokenizing). Prints the medians over --repeats and what bounds the batch-8 / batch-1 ratio: with the
prefill (the same work in both) and the rest as measured, the ratio a batch-8 decode step of zero cost
would give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from plain_vs_transformers import CHAT_PROMPTS  # (benchmarks/ is on the path when this script runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating passes (default: 3)")
    ap.add_argument("--out", default="runs/batch_breakdown.json", help="results JSON (default: runs/batch_breakdown.json)")
    from dspark.config import KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES), help=KV_CACHE_DTYPE_HELP)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dspark import LLM, SamplingParams
    from dspark.bundled import default_model_path
    from dspark.models import int4_gemm
    from dspark.train.checkpoint import atomic_write_text

    llm = LLM(model=str(default_model_path()), max_num_seqs=8, kv_cache_dtype=args.kv_cache_dtype)
    target = llm.target
    prompts = [llm.tokenizer.encode(llm.render_chat([{"role": "user", "content": t}])) for t in CHAT_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    clock: dict[str, float] = {}
    phase = ["decode"]  # which kind of forward the kernels below run in

    def timed(name: str, fn, in_phase: bool = False):
        def run(*a, **k):
            t = time.perf_counter()
            key = f"{phase[0]}_{name}" if in_phase else name
            try:
                return fn(*a, **k)
            finally:
                clock[key] = clock.get(key, 0.0) + time.perf_counter() - t
                clock[key + "_calls"] = clock.get(key + "_calls", 0) + 1
        return run

    forward = target.forward

    def target_forward(cache, slots, ids, *a, **k):
        phase[0] = "decode" if sum(len(x) for x in ids) == len(slots) else "prefill"
        return timed("forwards", forward, in_phase=True)(cache, slots, ids, *a, **k)

    target.forward = target_forward
    layers, run_il = int4_gemm.layers, int4_gemm._run_il
    int4_gemm.layers = timed("layers", layers, in_phase=True)
    int4_gemm._run_il = timed("lm_head", run_il, in_phase=True)  # the target's only _run_il calls in plain decoding

    def call(batch: int) -> dict[str, float]:
        clock.clear()
        t = time.perf_counter()
        for i in range(0, len(prompts), batch):
            llm.generate(prompts[i:i + batch], params)
        wall = time.perf_counter() - t
        out = {k: clock.get(k, 0.0) for k in ("prefill_forwards", "decode_forwards", "decode_layers", "decode_lm_head",
                                               "decode_forwards_calls")}
        out["wall"] = wall
        out["other"] = wall - out["prefill_forwards"] - out["decode_forwards"]
        return out

    try:
        call(8)
        call(1)  # warm-up
        runs: dict[int, list[dict[str, float]]] = {1: [], 8: []}
        for _ in range(args.repeats):
            for b in (1, 8):
                runs[b].append(call(b))
    finally:
        target.forward = forward
        int4_gemm.layers, int4_gemm._run_il = layers, run_il
    med = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for b, rs in runs.items()}
    print(f"threads {args.threads}; KV cache {llm.target.kv_cache_dtype}; {len(prompts)} prompts x {args.max_tokens} "
          f"tokens; medians of {args.repeats} (ms)")
    for b in (1, 8):
        m = med[b]
        print(f"batch {b}: wall {m['wall'] * 1e3:7.0f}  prefill {m['prefill_forwards'] * 1e3:6.0f}  decode "
              f"{m['decode_forwards'] * 1e3:6.0f} (layers {m['decode_layers'] * 1e3:6.0f}, LM head {m['decode_lm_head'] * 1e3:5.0f})  "
              f"other {m['other'] * 1e3:5.0f}")
    ratio = med[1]["wall"] / med[8]["wall"]
    bound = med[1]["wall"] / (med[8]["wall"] - med[8]["decode_forwards"])
    per_step = {b: med[b]["decode_forwards"] / med[b]["decode_forwards_calls"] * 1e3 for b in (1, 8)}
    print(f"batch 8 / batch 1: {ratio:.2f}x; decode step {per_step[1]:.2f} ms at 1 sequence, {per_step[8]:.2f} ms at 8 "
          f"({per_step[8] / per_step[1]:.2f} single steps); prefill {med[8]['prefill_forwards'] / med[8]['wall']:.0%} of "
          f"the batch-8 call; with a free batch-8 decode step the ratio would be {bound:.1f}x")
    out = Path(args.out)
    atomic_write_text(out, json.dumps({"threads": args.threads, "kv_cache_dtype": str(llm.target.kv_cache_dtype),
                                       "max_tokens": args.max_tokens, "repeats": args.repeats,
                                       "median_seconds": {str(b): m for b, m in med.items()},
                                       "runs": {str(b): r for b, r in runs.items()}, "b8_over_b1": round(ratio, 3),
                                       "decode_step_ms": {str(b): round(v, 3) for b, v in per_step.items()},
                                       "bound_with_free_b8_decode": round(bound, 2)}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
