"""torch.argmax against the C row argmax (`dspark.models.argmax`) on logits the size of SmolLM2's
vocabulary, interleaved in one process, and a check that both give the same indices.

    python benchmarks/argmax_ab.py --threads 2 [--vocab 49152] [--repeats 2000] [--out runs/argmax_ab.json]

Shapes: a plain greedy step at batch 1 and 8 ([B, V]) and a greedy verification of 2 and 8 tokens at
batch 1 ([1, k, V]). Prints the median microseconds of each over --repeats calls (alternating the
two, 5 rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dspark.models import argmax


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--vocab", type=int, default=49152, help="logits per row (default: 49152, SmolLM2's)")
    ap.add_argument("--repeats", type=int, default=2000, help="calls per timing (default: 2000)")
    ap.add_argument("--out", default="runs/argmax_ab.json", help="results JSON (default: runs/argmax_ab.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not argmax.KERNEL.available():
        raise SystemExit(f"the C argmax is unavailable: {argmax.KERNEL.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    rows = {}
    for label, shape in [("step b1", (1, args.vocab)), ("step b8", (8, args.vocab)),
                         ("verify k2", (1, 2, args.vocab)), ("verify k8", (1, 8, args.vocab))]:
        x = torch.randn(*shape, generator=g)
        same = argmax.argmax_rows(x) == x.argmax(-1).reshape(-1).tolist()
        t_torch, t_c = [], []
        for _ in range(5):  # alternate, so drift on a shared machine hits both
            t_torch.append(per_call_us(lambda: x.argmax(-1).reshape(-1).tolist(), args.repeats))
            t_c.append(per_call_us(lambda: argmax.argmax_rows(x), args.repeats))
        rows[label] = {"shape": list(shape), "torch_us": statistics.median(t_torch), "c_us": statistics.median(t_c),
                       "same_indices": same}
        r = rows[label]
        print(f"{label:10s} {str(tuple(shape)):18s} torch {r['torch_us']:7.1f} us  C {r['c_us']:6.1f} us  "
              f"{r['torch_us'] / r['c_us']:5.1f}x  same indices: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "vocab": args.vocab, "repeats": args.repeats,
                               "results": rows}, indent=1) + "\n")
    return 0 if all(r["same_indices"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
