"""Held-out τ̂ and validation loss against optimiser step for trained drafters (one PNG).

    python benchmarks/plot_training_curves.py --out docs/figures/drafter_training_curves.png \
        DSpark=models/dspark-demo-drafter DFlash=models/dspark-demo-dflash EAGLE-3=models/dspark-demo-eagle3

Each LABEL=DIR names a drafter directory written by `dspark train-drafter` (it holds training_log.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark.eval.plots import plot_training_curves


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafters", nargs="+", metavar="LABEL=DIR")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    logs = {}
    for item in args.drafters:
        label, sep, d = item.partition("=")
        if not sep:
            ap.error(f"{item!r}: expected LABEL=DIR")
        f = Path(d) / "training_log.json"
        try:
            logs[label] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"plot_training_curves: error: cannot read {f}: {e}", file=sys.stderr)
            return 2
    print(f"wrote {plot_training_curves(logs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
