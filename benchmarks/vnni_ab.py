"""The VNNI weight GEMMs against the AVX2 ones they replace, on SmolLM2, alternating in one process.

    python benchmarks/vnni_ab.py --threads 2 [--pairs 9] [--out runs/vnni_ab.json]

Loads the default model (and its bundled DSpark drafter) twice: once with DSPARK_VNNI=0 (the AVX2
8-bit-activation kernels), once with the interleaved VNNI kernels (the same bits: checked here on every
forward's logits). Times, alternating pass by pass: a target forward of k tokens of one sequence
(k = 1, 2, 4, 8: decoding and verification), of one token for each of R sequences (R = 4, 8: batched
decoding), a prompt's prefill (120 tokens), and the drafter's proposal (120 tokens of context) settling at one draft or drafting all 7.
Prints the medians (ms) and the median of the pair-by-pair ratios; on a CPU without VNNI it says so
and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from round_ab import timed  # (benchmarks/ is on the path when this script runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--pairs", type=int, default=9, help="alternating passes (default: 9)")
    ap.add_argument("--out", default="runs/vnni_ab.json", help="results JSON (default: runs/vnni_ab.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dspark.bundled import default_model_path, resolve_drafter
    from dspark.drafters import load_drafter
    from dspark.models import int4_gemm, load_target
    from dspark.sampling import SamplingParams, SamplingTensors
    from dspark.train.checkpoint import atomic_write_text

    if not int4_gemm.vnni_available():
        print("this CPU (or build) has no VNNI kernels: nothing to compare", file=sys.stderr)
        return 1
    ids = None
    sides = {}
    for name, env in (("avx2", "0"), ("vnni", "1")):
        os.environ["DSPARK_VNNI"] = env
        target = load_target(default_model_path())
        d = load_drafter(str(resolve_drafter("dspark", target)), target, max_seqs=8, max_len=1024)
        cache = target.new_cache(8, 1024)
        slots = [cache.allocate() for _ in range(8)]
        ids = target.tokenizer.encode("def parse_header(line):\n    \"\"\"Split an HTTP header line into name and "
                                      "value.\"\"\"\n" * 6)
        for s in slots:
            res = target.forward(cache, [s], [ids], hidden_layer_ids=tuple(d.target_layer_ids), all_logits=False)
        d.add_sequence(slots[0], ids, res.hidden[0])
        sides[name] = (target, d, cache, slots)
    os.environ.pop("DSPARK_VNNI")
    base = len(ids)
    print(f"threads {args.threads}; context {base} tokens; {args.pairs} alternating pairs; medians (ms)")

    def forward(side, k: int, r: int):
        target, d, cache, slots = side

        def run():
            out = target.forward(cache, slots[:r], [[5] * k] * r, hidden_layer_ids=tuple(d.target_layer_ids))
            for s in slots[:r]:
                cache.truncate(s, base)
            return out
        return run

    same = all(torch.equal(forward(sides["avx2"], k, r)().logits, forward(sides["vnni"], k, r)().logits)
               for k, r in ((1, 1), (8, 1), (1, 8)))
    print(f"the same logits bit for bit: {same}")
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)])
    cases = [(f"forward k={k}", lambda s, k=k: forward(s, k, 1)) for k in (1, 2, 4, 8)]
    cases += [(f"forward 1 token x {r} sequences", lambda s, r=r: forward(s, 1, r)) for r in (4, 8)]

    def prefill(side):
        target, d, cache, slots = side

        def run():
            cache.truncate(slots[7], 0)  # (the last case that reads this slot's context is done)
            target.forward(cache, [slots[7]], [ids[:base]], all_logits=False)
        return run
    cases.append((f"prefill {base} tokens", prefill))
    for label, stop in (("settles at 1 draft", lambda c: 1), ("all 7 drafts", None)):
        cases.append((f"propose, {label}", lambda s, stop=stop: (
            lambda: s[1].propose([s[3][0]], [ids[-1]], 7, greedy, [None], stop=stop))))
    rows = []
    for label, make in cases:
        a, b = [], []
        fa, fb = make(sides["avx2"]), make(sides["vnni"])
        for _ in range(args.pairs):
            a.append(timed(fa, 10))
            b.append(timed(fb, 10))
        ratio = statistics.median([x / y for x, y in zip(a, b)])
        rows.append({"case": label, "avx2_ms": round(statistics.median(a), 3), "vnni_ms": round(statistics.median(b), 3),
                     "speedup": round(ratio, 3)})
        print(f"{label:34s} AVX2 {statistics.median(a):6.2f}  VNNI {statistics.median(b):6.2f}  (x{ratio:.2f})")
    out = Path(args.out)
    atomic_write_text(out, json.dumps({"threads": args.threads, "pairs": args.pairs, "context": base,
                                       "same_logits": same, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
