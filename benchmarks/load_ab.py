"""Two verification policies under the same closed-loop load, alternating pass by pass in one process.

    python benchmarks/load_ab.py --concurrency 1,8 --policies plain,confidence --repeats 3 --threads 2

`dspark loadtest` runs every policy of a pass back to back, so a machine that slows down during a pass
favours whichever policy ran first; this runs just two policies, alternating (A, B, A, B, ...) at each
concurrency level, on the same engines (built once, warmed up), and prints each pass's seconds and the
ratio B / A of throughputs pass by pass. Clients and prompts are the load test's (`run_level`: closed
loop, `--requests-per-client` requests each, greedy, `--max-tokens` new tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target (default: the default model)")
    ap.add_argument("--drafter", default="dspark", help="drafter for the speculative policy (default: dspark)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "benchmarks"))
    ap.add_argument("--set", default="humaneval")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--policies", default="plain,confidence", help="exactly two, A,B")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gate-arms-a", default=None,
                    help="caps the confidence policy's drafting gate of A chooses from, e.g. 0,none "
                         "(none: no cap; default: the gate's own, 0,1,2,none)")
    ap.add_argument("--gate-arms-b", default=None, help="the same for B")
    ap.add_argument("--out", default="runs/load_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dspark.bundled import default_model_path, resolve_drafter
    from dspark.config import VerifyPolicy
    from dspark.drafters import load_drafter
    from dspark.engine import Engine
    from dspark.eval.prompts import load_prompt_set, prepare_prompts
    from dspark.models import load_target
    from dspark.sampling import SamplingParams
    from dspark.schedule import DraftGate
    from dspark.server.loadtest import LoadConfig, run_level
    from dspark.train.checkpoint import atomic_write_text

    levels = [int(c) for c in args.concurrency.split(",")]
    pols = [VerifyPolicy.parse(p) for p in args.policies.split(",")]
    if len(pols) != 2:
        raise SystemExit(f"--policies takes exactly two policies, got {args.policies!r}")
    target = load_target(Path(args.model) if args.model else default_model_path())
    n = max(levels) * args.requests_per_client
    texts = load_prompt_set(Path(args.data_dir), args.set, n)
    prompts = prepare_prompts(texts, target.tokenizer, target.context_length, args.max_tokens).token_ids
    max_len = max(len(p) for p in prompts) + args.max_tokens
    spec = resolve_drafter(args.drafter, target)
    engines = []
    for p, arms in zip(pols, (args.gate_arms_a, args.gate_arms_b)):
        drafter = load_drafter(spec, target, max_seqs=max(levels), max_len=max_len) if p.speculative else None
        e = Engine(target, max_num_seqs=max(levels), max_model_len=max_len, drafter=drafter, policy=p)
        if arms is not None:
            if getattr(e.rule, "gate", None) is None:
                raise SystemExit(f"--gate-arms needs the confidence policy, not {p}")
            e.rule.gate = DraftGate(arms=[None if a.strip() == "none" else int(a) for a in arms.split(",")])
        e.run([prompts[0]], [SamplingParams(temperature=0, max_tokens=4)])  # warm-up
        engines.append(e)
    rows = []
    for c in levels:
        cfg = LoadConfig(out=Path(args.out), policies=list(dict.fromkeys(str(p) for p in pols)), concurrency=[c],
                         requests_per_client=args.requests_per_client, max_tokens=args.max_tokens)
        secs: list[list[float]] = [[], []]
        tokens = [0, 0]
        for _ in range(args.repeats):
            for i, e in enumerate(engines):
                t0 = time.perf_counter()
                _, results = run_level(e, prompts, c, cfg, lambda r: None)
                secs[i].append(time.perf_counter() - t0)
                tokens[i] = sum(r.completion_tokens for r in results)
        ratios = [(tokens[1] / b) / (tokens[0] / a) for a, b in zip(secs[0], secs[1])]
        row = {"concurrency": c, "policies": [str(p) for p in pols], "seconds": secs, "tokens": tokens,
               "ratio_b_over_a_by_pass": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3)}
        row["gate_arms"] = [args.gate_arms_a, args.gate_arms_b]
        rows.append(row)
        print(f"{c} clients: {pols[0]} {[round(s, 2) for s in secs[0]]} s, {pols[1]} {[round(s, 2) for s in secs[1]]} s;"
              f" {pols[1]} / {pols[0]} throughput by pass {row['ratio_b_over_a_by_pass']} (median {row['median_ratio']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps({"threads": args.threads, "set": args.set,
                                                  "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
