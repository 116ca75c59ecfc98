"""Verification policies at batch 1, side by side in one process: plain decoding and each policy given,
interleaved repeats, the same engines throughout (the confidence gate's estimates carry over).

    python benchmarks/policy_ab.py --policies fixed:1,confidence --data-dir ../shared/benchmarks \
        --set humaneval --num-prompts 8 --max-tokens 64 --repeats 3 --threads 2 [--out runs/policy_ab.json]

Each repeat decodes every prompt (through the chat template, greedy, eos ignored) one request at a
time with each engine in turn; prints the median seconds per engine, each policy's median of the
repeat-by-repeat speed ratios to plain decoding, whether its tokens equal plain decoding's, and (for
`confidence`) how many rounds the drafting gate ran under each cap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_args import add_prompt_arguments  # (benchmarks/ is on the path when this runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target (default: the default model)")
    ap.add_argument("--drafter", default="dspark", help="drafter (default: dspark, the bundled one)")
    ap.add_argument("--policies", default="fixed:1,confidence", help="policies besides plain (default: fixed:1,confidence)")
    add_prompt_arguments(ap, count_default=8)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: 3)")
    ap.add_argument("--out", default="runs/policy_ab.json", help="results JSON (default: runs/policy_ab.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dspark import LLM, SamplingParams
    from dspark.eval.prompts import load_prompt_set
    from dspark.train.checkpoint import atomic_write_text

    llms = {"plain": LLM(model=args.model)}
    for p in args.policies.split(","):
        llms[p] = LLM(model=args.model, drafter=args.drafter, policy=p)
    plain = llms["plain"]
    texts = load_prompt_set(args.data_dir, args.set, args.num_prompts)
    prompts = [plain.tokenizer.encode(plain.render_chat([{"role": "user", "content": t}])) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for llm in llms.values():  # warm up (kernels, caches)
        llm.generate(prompts[:1], params)
    secs: dict[str, list[float]] = {k: [] for k in llms}
    tokens: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        for name, llm in llms.items():
            t = time.perf_counter()
            tokens[name] = [llm.generate([p], params)[0].token_ids for p in prompts]
            secs[name].append(time.perf_counter() - t)
            print(f"repeat {rep + 1}/{args.repeats} {name}: {secs[name][-1]:.2f} s", file=sys.stderr)
    report = {"set": args.set, "num_prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads,
              "repeats": args.repeats, "seconds": secs, "rows": []}
    for name in llms:
        ratio = statistics.median([a / b for a, b in zip(secs["plain"], secs[name])])
        row = {"policy": name, "median_seconds": round(statistics.median(secs[name]), 3),
               "vs_plain": round(ratio, 3), "same_tokens_as_plain": tokens[name] == tokens["plain"]}
        gate = getattr(getattr(llms[name].engine, "rule", None), "gate", None)
        if gate is not None:
            row["gate_rounds_by_cap"] = {str(k): v for k, v in gate.chosen.items()}
        report["rows"].append(row)
        print(f"{name:12s} {row['median_seconds']:7.2f} s  {ratio:.3f}x plain  same tokens: {row['same_tokens_as_plain']}"
              + (f"  gate rounds by cap: {row['gate_rounds_by_cap']}" if "gate_rounds_by_cap" in row else ""))
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["same_tokens_as_plain"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
