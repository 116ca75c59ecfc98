"""This project's Q4 x 8-bit-activation GEMM against an earlier build of `int4_gemm.c`, in one process:
every output bit-identical, and the time of qkv-, down- and gate/up-shaped SmolLM2 projections at 1, 2,
4 and 8 rows, alternating (medians of --pairs; random weights).

    git show 02aab4c:dspark/models/int4_gemm.c > /tmp/int4_gemm_old.c
    python benchmarks/gemm_build_ab.py --old-source /tmp/int4_gemm_old.c --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-source", required=True, help="an earlier int4_gemm.c to compare with")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dspark.models import int4_gemm as ig
    from dspark.models.ckernel import CKernel

    old_src = Path(args.old_source)
    if not old_src.is_file():
        raise SystemExit(f"--old-source {old_src}: no such file")
    new = ig.KERNEL.library()
    old = CKernel(old_src, ig.FLAG_SETS, ig._setup, env="DSPARK_OLD_GEMM_BUILD").library()
    if new is None or old is None:
        raise SystemExit("a build failed: " + str(ig.KERNEL.unavailable_reason()))
    g = torch.Generator().manual_seed(0)
    weights = []
    for n, k in ((1728, 576), (576, 1536), (3072, 576)):
        q4 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        d, m = torch.rand(n, k // 32, generator=g) * 0.05, torch.randn(n, k // 32, generator=g) * 0.05
        weights.append((ig.pack_codes(q4), ig.scales4(d, m), n, k))
    for rows in (1, 2, 4, 8):
        xs = [torch.randn(rows, k, generator=g) for *_, k in weights]
        for (p, s4, n, _), x in zip(weights, xs):
            if not torch.equal(ig._run_a8(new.dspark_int4_mm_a8, x, p, s4, n, args.threads),
                               ig._run_a8(old.dspark_int4_mm_a8, x, p, s4, n, args.threads)):
                raise SystemExit(f"{rows} rows: the two builds differ")
        t = {"old": [], "new": []}
        for _ in range(args.pairs):
            for name, lib in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                for _ in range(20):
                    for (p, s4, n, _), x in zip(weights, xs):
                        ig._run_a8(lib.dspark_int4_mm_a8, x, p, s4, n, args.threads)
                t[name].append((time.perf_counter() - t0) / 20 * 1e6)
        ratio = statistics.median([a / b for a, b in zip(t["old"], t["new"])])
        print(f"{rows} rows: bit-identical; old {statistics.median(t['old']):.0f} us, new {statistics.median(t['new']):.0f} us "
              f"(old / new x{ratio:.3f})")


if __name__ == "__main__":
    main()
