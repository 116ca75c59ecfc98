"""Where a speculative round's time goes inside the engine, at batch 1 (greedy): the median wall time
of the round, the drafter's proposal (`Engine._propose`), its commit (`commit_batch`) and the target
forward, over every round of a few chat prompts. Unlike `profile_round.py` (each piece timed alone,
its weights hot in the caches), these are the pieces as decoding runs them, each after the others.

    python benchmarks/engine_round_parts.py --data-dir ../shared/benchmarks [--set humaneval]
        [--num-prompts 4] [--max-tokens 64] [--policy fixed:1] [--passes 3] [--threads 2] [--out FILE]

To compare two versions of the code, run it from each checkout in turn (PYTHONPATH=<checkout>).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_args import add_prompt_arguments  # (benchmarks/ is on the path when this runs)

import dspark
from dspark import LLM, SamplingParams
from dspark import engine as engine_mod
from dspark.eval.prompts import load_prompt_set


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(ap, count_default=4)
    ap.add_argument("--policy", default="fixed:1", help="verification policy (default: fixed:1)")
    ap.add_argument("--drafter", default="dspark", help="drafter (default: dspark, the bundled one)")
    ap.add_argument("--passes", type=int, default=3, help="passes over the prompts (default: 3)")
    ap.add_argument("--out", default=None, help="results JSON (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    llm = LLM(drafter=args.drafter, policy=args.policy)
    eng = llm.engine
    times: dict[str, list[float]] = {"round": [], "propose": [], "commit": [], "target forward": []}

    def timed(obj, name: str, key: str) -> None:
        f = getattr(obj, name)

        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                times[key].append(time.perf_counter() - t0)
        setattr(obj, name, g)

    timed(eng, "_speculative_round", "round")
    timed(eng, "_propose", "propose")
    timed(eng.drafter, "commit_batch", "commit")
    timed(eng.target, "forward", "target forward")
    prompts = load_prompt_set(args.data_dir, args.set, args.num_prompts)
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat(msgs[0], params)  # warm-up
    for v in times.values():
        v.clear()
    for _ in range(args.passes):
        for m in msgs:
            llm.chat(m, params)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
    counts = {k: len(v) for k, v in times.items()}
    print(f"dspark from {Path(dspark.__file__).parent}; policy {args.policy}; threads {args.threads}; "
          f"{counts['round']} rounds; medians (ms):")
    for k, v in med.items():
        print(f"  {k:15s} {v:7.3f}  ({counts[k]} calls)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"source": str(Path(dspark.__file__).parent), "policy": args.policy,
                                              "threads": args.threads, "median_ms": med, "calls": counts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
