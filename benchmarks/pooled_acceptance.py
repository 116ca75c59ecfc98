"""Conditional acceptance by draft position, pooled over every cell of `dspark eval` result files.

    python benchmarks/pooled_acceptance.py runs/smollm2/v4/eval_t0.json [more.json ...] [--drafter dspark]

P(draft k accepted | drafts < k accepted) = Σ accepted_by_position[k] / Σ tried_by_position[k] over the
cells (prompt sets) of each file, one line per file: the figure the README quotes as "pooled over the
8 sets" (the paper's Figure 2, all domains together).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def pooled(cells: list[dict]) -> list[float]:
    width = max((len(c["tried_by_position"]) for c in cells), default=0)
    acc, tried = [0] * width, [0] * width
    for c in cells:
        for i, (a, t) in enumerate(zip(c["accepted_by_position"], c["tried_by_position"])):
            acc[i] += a
            tried[i] += t
    return [a / t for a, t in zip(acc, tried) if t]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON files written by dspark eval --out")
    ap.add_argument("--drafter", default=None, help="only this drafter's cells (default: all)")
    args = ap.parse_args(argv)
    for path in args.results:
        try:
            cells = list(json.loads(Path(path).read_text())["cells"].values())
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: not a dspark eval result ({e})", file=sys.stderr)
            return 1
        cells = [c for c in cells if args.drafter in (None, c["drafter"])]
        values = ", ".join(f"{v:.2f}" for v in pooled(cells))
        print(f"{path}: {len(cells)} cells, conditional acceptance by position: {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
