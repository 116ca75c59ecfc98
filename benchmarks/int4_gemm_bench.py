"""This project's weight-only GEMM (`dspark/models/int4_gemm.c`) against torch's int4 kernel, side by side.

    python benchmarks/int4_gemm_bench.py --threads 2 [--rows 1,2,4,8,16] [--calls 300] [--out runs/int4_gemm_bench.json]

SmolLM2-135M's projection shapes (qkv 960x576, gate/up 3072x576, down 576x1536) and its Q8_0 LM head
(49152x576, against the fp16-weight GEMM that ran it before), on random codes; for each shape and row
count the two kernels are called in alternation and the 10th percentile of each one's call time is kept
(this machine is shared: the low percentile is the steady figure). Also checks, for every row count,
that ours gives each row the bits it gives that row alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = [("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
HEAD = ("lm_head", 49152, 576)


def p10_us(fns, calls: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, acc in zip(fns, times):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return [sorted(acc)[len(acc) // 10] * 1e6 for acc in times]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--rows", default="1,2,4,8,16", help="row counts (default: 1,2,4,8,16)")
    ap.add_argument("--calls", type=int, default=300, help="calls of each kernel per cell (default: 300)")
    ap.add_argument("--out", default="runs/int4_gemm_bench.json", help="results JSON (default: runs/int4_gemm_bench.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dspark.models import int4_gemm
    from dspark.models.transformer import Int4Linear, Int8Linear, PackedLinear, _torch_int4_available

    if not int4_gemm.available():
        print(f"the kernel does not build here: {int4_gemm.unavailable_reason()}", file=sys.stderr)
        return 1
    if not _torch_int4_available():
        print("this torch build has no CPU int4 GEMM to compare with", file=sys.stderr)
        return 1
    rows_list = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"threads {args.threads}; 10th percentile of {args.calls} alternating calls (us)")
    print(f"{'matrix':>8} {'N x K':>11} {'rows':>4} {'ours':>9} {'torch':>9} {'torch/ours':>10}  rows alone = in the call")
    for name, n, k in SHAPES + [HEAD]:
        if name == "lm_head":
            codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            ours = Int8Linear(codes, torch.rand(n, k // 32, generator=g) * 0.01)
            theirs = PackedLinear(ours.dequantized().half().float(), None)  # the fp16-weight GEMM
            other = "fp16-weights"
        else:
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            scale, zero = torch.rand(n, k // 32, generator=g) * 0.01, torch.randn(n, k // 32, generator=g) * 0.01
            ours, theirs = Int4Linear(codes, scale, zero, None, kernel="dspark"), Int4Linear(codes, scale, zero, None, kernel="torch")
            other = "torch-int4"
        for rows in rows_list:
            x = torch.randn(rows, k, generator=g)
            with torch.inference_mode():
                y = ours(x)
                invariant = all(torch.equal(ours(x[i:i + 1])[0], y[i]) for i in range(rows))
                t_ours, t_theirs = p10_us([lambda: ours(x), lambda: theirs(x)], args.calls)
            results.append({"matrix": name, "n": n, "k": k, "rows": rows, "ours_us": round(t_ours, 1),
                            "other": other, "other_us": round(t_theirs, 1), "rows_invariant": invariant})
            print(f"{name:>8} {f'{n}x{k}':>11} {rows:>4} {t_ours:9.1f} {t_theirs:9.1f} {t_theirs / t_ours:10.2f}  {invariant}"
                  + ("  (vs fp16-weight GEMM)" if name == "lm_head" and rows == rows_list[0] else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "calls": args.calls, "results": results}, indent=2) + "\n")
    return 0 if all(r["rows_invariant"] for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
