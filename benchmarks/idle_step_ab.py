"""What an attached but idle drafter costs a decoding step: the median wall time of decode steps with
exactly B requests (no prefill in the step) in an engine without a drafter and in one with the bundled
DSpark drafter under the `plain` policy (the speculative engine, drafting nothing: the rounds the
confidence policy runs when it does not draft), the two engines alternating over the same prompts; and
the median wall time of the steps that only run prompts (which with a drafter also hand each prompt's
features to it).

    python benchmarks/idle_step_ab.py --data-dir ../shared/benchmarks [--set humaneval] [--batch 8]
        [--max-tokens 64] [--passes 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_args import add_prompt_arguments  # (benchmarks/ is on the path when this runs)

from dspark import LLM, SamplingParams
from dspark import engine as engine_mod
from dspark.eval.prompts import load_prompt_set


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(ap, count="--batch", count_default=8, count_help="concurrent requests")
    ap.add_argument("--passes", type=int, default=5, help="alternating passes (default: 5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    msgs = [[{"role": "user", "content": p}] for p in load_prompt_set(args.data_dir, args.set, args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    steps: dict[str, list[float]] = {}
    run = engine_mod.Engine._run

    prefills: dict[str, list[float]] = {}

    def timed_run(self, sched):
        t0 = time.perf_counter()
        out = run(self, sched)
        tag = getattr(self, "_bench_tag", "?")
        if not sched.prefill and len(sched.decode) == args.batch:
            steps.setdefault(tag, []).append(time.perf_counter() - t0)
        elif sched.prefill and not sched.decode:  # the prompts' step (no request decoding yet)
            prefills.setdefault(tag, []).append(time.perf_counter() - t0)
        return out
    engine_mod.Engine._run = timed_run
    engines = {"no drafter": LLM(), "idle drafter (plain policy)": LLM(drafter="dspark", policy="plain")}
    for tag, llm in engines.items():
        llm.engine._bench_tag = tag
        llm.chat(msgs, params)  # warm-up
    steps.clear()
    prefills.clear()
    for _ in range(args.passes):
        for llm in engines.values():
            llm.chat(msgs, params)
    med = {tag: statistics.median(v) * 1e3 for tag, v in steps.items()}
    for tag, v in med.items():
        print(f"{tag:30s} median step {v:7.3f} ms over {len(steps[tag])} steps of {args.batch} requests")
    a, b = med["idle drafter (plain policy)"], med["no drafter"]
    print(f"idle drafter / no drafter: {a / b:.3f}")
    pre = {tag: statistics.median(v) * 1e3 for tag, v in prefills.items()}
    for tag, v in pre.items():
        print(f"{tag:30s} median prompt step {v:7.3f} ms over {len(prefills[tag])} steps")
    if len(pre) == 2:
        print(f"prompt steps, idle drafter / no drafter: {pre['idle drafter (plain policy)'] / pre['no drafter']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
