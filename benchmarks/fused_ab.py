"""The fused C layer parts against the per-op layer, A/B in one process.

    python benchmarks/fused_ab.py --threads 2 [--model M] [--batch 1,8] [--repeats 30]

One target forward of one new token per sequence (a decode step, the LM head included) at a fixed
context (a 64-token prompt, the cache cut back after every step), fused and per-op steps alternating,
`--repeats` of each per batch size; prints the medians and their ratio and writes JSON. The two paths
compute the same model up to float rounding (`tests/test_int4.py` checks it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark.train.checkpoint import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (default: 1,8)")
    ap.add_argument("--repeats", type=int, default=30, help="steps of each path per batch size (default: 30)")
    ap.add_argument("--out", default="runs/fused_ab.json", help="results JSON (default: runs/fused_ab.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dspark.bundled import default_model_path
    from dspark.models import load_target

    target = load_target(args.model or default_model_path())
    t = target.transformer
    if not t.update_fused_layers(True):
        print(f"no fused layers on {target.source} (GEMM {target.cpu_gemm}): nothing to compare", file=sys.stderr)
        return 1
    prompt = list(range(100, 164))
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        cache = target.new_cache(b, 512)
        slots = [cache.allocate() for _ in range(b)]
        target.forward(cache, slots, [prompt] * b, all_logits=False)
        tok = torch.full((b, 1), 200)
        times: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.repeats + 3):
            for fused in (True, False):
                t.update_fused_layers(fused)
                t0 = time.perf_counter()
                target.forward(cache, slots, tok)
                dt = time.perf_counter() - t0
                for s in slots:
                    cache.truncate(s, len(prompt))
                if rep >= 3:  # warm-up
                    times[fused].append(dt)
        f_ms, p_ms = (statistics.median(times[x]) * 1e3 for x in (True, False))
        rows.append({"batch": b, "fused_ms": round(f_ms, 3), "per_op_ms": round(p_ms, 3),
                     "per_op_over_fused": round(p_ms / f_ms, 3)})
        print(f"batch {b}: fused {f_ms:.2f} ms, per-op {p_ms:.2f} ms a step ({p_ms / f_ms:.2f}x)", flush=True)
    t.update_fused_layers(True)
    report = {"model": str(target.source), "threads": args.threads, "cpu_gemm": target.cpu_gemm,
              "repeats": args.repeats, "results": rows}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
