"""Where the time of one speculative round goes, at batch 1 (greedy), piece by piece.

    python benchmarks/profile_round.py --threads 1 [--drafters dspark,dflash,eagle3] [--repeats 50] [--cpu-gemm off]

Times (median ms over --repeats): one plain decode step; target forwards of k = 1..8 tokens as
verification runs them (all logits, the drafter's hidden-state taps); each drafter's `propose` of γ
tokens and `commit` of an accepted prefix. The ratio "round / plain step" printed at the end is the
number of plain steps one round costs; a drafter speeds decoding up only when its τ exceeds it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dspark.bundled import resolve_drafter
from dspark.config import add_runtime_arguments
from dspark.drafters import load_drafter
from dspark.models import load_target
from dspark.sampling import SamplingTensors, SamplingParams

REPO = Path(__file__).resolve().parent.parent
PROMPT = "def parse_header(line):\n    \"\"\"Split an HTTP header line into name and value.\"\"\"\n"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "dspark-demo-target"))
    ap.add_argument("--drafters", default="dspark,dflash,eagle3")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    add_runtime_arguments(ap)  # --cpu-gemm, --attention
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    target = load_target(args.model, cpu_gemm=args.cpu_gemm, attention=args.attention)
    cache = target.new_cache(1, 1024)
    slot = cache.allocate()
    ids = target.tokenizer.encode(PROMPT)
    target.forward(cache, [slot], [ids], all_logits=False)
    base_len = cache.length(slot)

    def step(k: int, taps=()):
        def run():
            target.forward(cache, [slot], [[5] * k], hidden_layer_ids=taps, all_logits=True)
            cache.truncate(slot, base_len)
        return run

    print(f"threads {args.threads}; GEMM {target.cpu_gemm}; attention {target.attention}; prompt {len(ids)} tokens; median of {args.repeats} (ms)")
    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end:  # a second of work first: clocks and caches settle
        step(8)()
    plain = median_ms(step(1), args.repeats)
    print(f"plain decode step (k=1, no taps)     {plain:7.2f}")
    for k in (2, 4, 8):
        print(f"target forward k={k} (no taps)        {median_ms(step(k), args.repeats):7.2f}")

    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)])
    for name in [d for d in args.drafters.split(",") if d]:
        # a bare name is the bundled drafter of that kind trained for the loaded model (as in generate)
        drafter = load_drafter(str(resolve_drafter(name, target)), target, max_seqs=1, max_len=1024)
        g = min(args.gamma, drafter.block_size)
        taps = drafter.target_layer_ids
        res = target.forward(cache, [slot], [ids[-1:]], hidden_layer_ids=taps)  # features for a prefix
        cache.truncate(slot, base_len)
        drafter.add_sequence(slot, ids, torch.cat([res.hidden[0]] * len(ids)) if res.hidden is not None
                             else None)
        verify = median_ms(step(g + 1, taps), args.repeats)
        propose = median_ms(lambda: drafter.propose([slot], [ids[-1]], g, greedy, [None]), args.repeats)
        ctx = drafter.context_length(slot) if hasattr(drafter, "context_length") else None
        hid3 = torch.cat([res.hidden[0]] * 3) if res.hidden is not None else None

        def commit():
            drafter.commit(slot, [5, 6, 7], hid3)
            # roll the drafter back to where it was so repeats are alike
            drafter.free(slot)
            drafter.add_sequence(slot, ids, torch.cat([res.hidden[0]] * len(ids)) if res.hidden is not None
                                 else None)
        readd = median_ms(lambda: (drafter.free(slot), drafter.add_sequence(
            slot, ids, torch.cat([res.hidden[0]] * len(ids)) if res.hidden is not None else None)), args.repeats)
        commit_ms = max(0.0, median_ms(commit, args.repeats) - readd)
        rnd = verify + propose + commit_ms
        print(f"[{name}] γ={g}: verify k={g + 1} with taps {verify:6.2f} | propose {propose:6.2f} | "
              f"commit 3 {commit_ms:5.2f} | round {rnd:6.2f} = {rnd / plain:.2f} plain steps"
              + (f" (context {ctx})" if ctx is not None else ""))
        drafter.free(slot)


if __name__ == "__main__":
    main()
