"""Write the prompts `dspark train-drafter` held out for validation as a prompt set, so a drafter can
be calibrated (`dspark calibrate --data-dir OUT --sets heldout`) on prompts it never trained on
without touching the evaluation sets.

    python benchmarks/heldout_prompts.py runs/smollm2/data.jsonl runs/smollm2/calib
    dspark calibrate --model $SMOLLM2 --drafter dspark --data-dir runs/smollm2/calib --sets heldout ...

The split is train-drafter's own (`load_data`, the same --val-percent and seed); rows are matched by
their `id` (offline data: the stored-feature key `seq_<id>`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark.train.train_drafter import load_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="the data.jsonl train-drafter read (written by dspark datagen)")
    p.add_argument("out_dir", type=Path, help="directory to write heldout.jsonl into")
    p.add_argument("--val-percent", type=float, default=5.0, help="train-drafter's --val-percent (default: 5)")
    p.add_argument("--max-seq-len", type=int, default=768, help="train-drafter's --max-seq-len (default: 768)")
    args = p.parse_args(argv)
    rows = {}
    with args.data.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[f"seq_{r.get('id')}"] = r
    data = load_data(args.data, 1 << 30, args.max_seq_len, args.val_percent)
    if not data.offline:
        print(f"heldout_prompts: {args.data} has no stored hidden states (datagen --store-hidden): the rows "
              "cannot be matched to the split", file=sys.stderr)
        return 2
    picked = [rows[s.hidden[1]]["prompt"] for s in data.val]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "heldout.jsonl"
    out.write_text("".join(json.dumps({"turns": [q]}) + "\n" for q in picked), encoding="utf-8")
    print(f"wrote {out} ({len(picked)} held-out prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
