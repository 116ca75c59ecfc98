"""What RowPlan's padding costs a decode step: the same model, padding on and off, interleaved.

    python benchmarks/row_plan_cost.py --threads 2 [--model M] [--blocks 10] [--steps 20]

Turning padding off here only measures its cost: without it, on CPUs where fbgemm's kernels differ by
row count, verification no longer reproduces decoding bit for bit (see RowPlan in
dspark/models/transformer.py). Prints the good row counts found and the median step time both ways.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--blocks", type=int, default=10, help="interleaved blocks each way (default: 10)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps a block (default: 20)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dspark.bundled import default_model_path
    from dspark.models import load_target
    from dspark.models.transformer import RowPlan

    target = load_target(args.model or default_model_path())
    cache = target.new_cache(1, 1024)
    slot = cache.allocate()
    target.forward(cache, [slot], [list(range(100, 164))], all_logits=False)
    tok = torch.tensor([[200]])
    plans = list(RowPlan._cache.values())
    saved = [(p.all_good, p) for p in plans]

    def block(pad: bool) -> float:
        for all_good, p in saved:
            p.all_good = all_good if pad else True
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            target.forward(cache, [slot], tok)
            cache.truncate(slot, 64)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    block(True), block(False)
    on, off = [], []
    for _ in range(args.blocks):
        on.append(block(True))
        off.append(block(False))
    report = {
        "threads": args.threads, "cpu_gemm": target.cpu_gemm, "attention": target.attention,
        # per kernel/input width: how many of the row counts 1..96 agree, and the first few
        "good_row_counts": {f"{k[0]}/{k[1]}": f"{len(p.good)} of 96: {p.good[:8]}..." for k, p in RowPlan._cache.items()},
        "step_ms_padded": round(statistics.median(on) * 1e3, 3),
        "step_ms_unpadded": round(statistics.median(off) * 1e3, 3),
        "ratio_padded_over_unpadded": round(statistics.median([a / b for a, b in zip(on, off)]), 3),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
