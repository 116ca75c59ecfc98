"""The tenth session's runtime changes, each against what it replaced, alternating in one process.

    python benchmarks/round_ab.py --threads 2 [--pairs 15]

1. A SmolLM2 target forward of k = 1, 2, 8 tokens (the drafter's taps read) with every layer in one C
   call (`int4_gemm.layers`) against one whole-layer call per layer (`DSPARK_ONE_CALL=0`).
2. The DSpark drafter's proposal (120 context tokens) that the schedule settles at 1 or 2 drafts, or
   drafts all 7: as before the session (SDPA with a block mask, the LM head over all positions), with
   the block's attention on the row kernel and chunked drafting, and with each draft layer in one C call.
Medians over --pairs alternating passes (ms), and the median of the pair-by-pair ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dspark.bundled import default_model_path, resolve_drafter
    from dspark.drafters import load_drafter
    from dspark.models import load_target
    from dspark.sampling import SamplingParams, SamplingTensors

    target = load_target(default_model_path())
    d = load_drafter(str(resolve_drafter("dspark", target)), target, max_seqs=1, max_len=1024)
    taps = tuple(d.target_layer_ids)
    cache = target.new_cache(1, 1024)
    slot = cache.allocate()
    ids = target.tokenizer.encode("def parse_header(line):\n    \"\"\"Split an HTTP header line into name and value.\"\"\"\n" * 6)
    res = target.forward(cache, [slot], [ids], hidden_layer_ids=taps, all_logits=False)
    d.add_sequence(slot, ids, res.hidden[0])
    base = cache.length(slot)
    print(f"threads {args.threads}; context {base} tokens; {args.pairs} alternating pairs; medians (ms)")

    def one_call(on: bool) -> None:
        os.environ["DSPARK_ONE_CALL"] = "1" if on else "0"
        target.transformer.update_fused_layers(True)

    def step(k: int):
        def run():
            target.forward(cache, [slot], [[5] * k], hidden_layer_ids=taps)
            cache.truncate(slot, base)
        return run

    for k in (1, 2, 8):
        a, b = [], []
        for _ in range(args.pairs):
            one_call(False)
            a.append(timed(step(k), 10))
            one_call(True)
            b.append(timed(step(k), 10))
        print(f"target forward k={k}: layer by layer {statistics.median(a):6.2f}, one call {statistics.median(b):6.2f} "
              f"(x{statistics.median([x / y for x, y in zip(a, b)]):.3f})")

    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)])
    configs = [("before (SDPA, whole LM head)", False, 99, False), ("row attention + chunks", True, 2, False),
               ("C draft layer + chunks", True, 2, True)]
    stops = [("settles at 1 draft", lambda c: 1), ("settles at 2 drafts", lambda c: 2 if c.shape[1] >= 2 else None),
             ("all 7 drafts, no stop", None)]
    for label, stop in stops:
        times: dict[str, list[float]] = {c[0]: [] for c in configs}
        for _ in range(args.pairs):
            for name, row, chunk, c_layers in configs:
                d.use_row_attention, d.FIRST_CHUNK, d.use_c_layers = row, chunk, c_layers
                times[name].append(timed(lambda: d.propose([slot], [ids[-1]], 7, greedy, [None], stop=stop), 10))
        first = times[configs[0][0]]
        cells = [f"{n} {statistics.median(t):5.2f} (x{statistics.median([x / y for x, y in zip(first, t)]):.2f})"
                 for n, t in times.items()]
        print(f"propose, {label}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
