"""The fused C layer paths against the per-op layer, side by side in one process.

    python benchmarks/fused_ab.py --threads 2 [--model M] [--batch 1,8] [--repeats 30]

One target forward of one new token per sequence (a decode step, the LM head included) at a fixed
context (a 64-token prompt, the cache cut back after every step), three paths alternating step by
step, `--repeats` of each per batch size: `whole` (the default: each layer one C call, its parts,
KV write and row attention), `parts` (the C part before attention, the cache write and attention in
Python, the C part after it; `DSPARK_WHOLE_LAYER=0`) and `per_op` (torch ops and one GEMM call per
projection; `DSPARK_FUSED_LAYERS=0`). Prints the medians and their ratios and writes JSON. `whole`
and `parts` give the same bits, `per_op` the same model up to float rounding (`tests/test_int4.py`).
"""

from __future__ import annotations

import argparse
import json
import os
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
    paths = ("whole", "parts", "per_op")

    def use(path: str) -> None:
        os.environ["DSPARK_WHOLE_LAYER"] = "1" if path == "whole" else "0"
        t.update_fused_layers(path != "per_op")

    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        cache = target.new_cache(b, 512)
        slots = [cache.allocate() for _ in range(b)]
        target.forward(cache, slots, [prompt] * b, all_logits=False)
        tok = torch.full((b, 1), 200)
        times: dict[str, list[float]] = {p: [] for p in paths}
        for rep in range(args.repeats + 3):
            for path in paths:
                use(path)
                t0 = time.perf_counter()
                target.forward(cache, slots, tok)
                dt = time.perf_counter() - t0
                for s in slots:
                    cache.truncate(s, len(prompt))
                if rep >= 3:  # warm-up
                    times[path].append(dt)
        ms = {p: statistics.median(times[p]) * 1e3 for p in paths}
        rows.append({"batch": b, "whole_ms": round(ms["whole"], 3), "parts_ms": round(ms["parts"], 3),
                     "per_op_ms": round(ms["per_op"], 3), "parts_over_whole": round(ms["parts"] / ms["whole"], 3),
                     "per_op_over_whole": round(ms["per_op"] / ms["whole"], 3),
                     # the previous layout of this file: fused = the default path
                     "fused_ms": round(ms["whole"], 3), "per_op_over_fused": round(ms["per_op"] / ms["whole"], 3)})
        print(f"batch {b}: whole {ms['whole']:.2f} ms, parts {ms['parts']:.2f} ms ({ms['parts'] / ms['whole']:.2f}x), "
              f"per-op {ms['per_op']:.2f} ms ({ms['per_op'] / ms['whole']:.2f}x) a step", flush=True)
    os.environ.pop("DSPARK_WHOLE_LAYER", None)
    t.update_fused_layers(True)
    report = {"model": str(target.source), "threads": args.threads, "cpu_gemm": target.cpu_gemm,
              "repeats": args.repeats, "results": rows}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
