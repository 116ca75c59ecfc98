"""`dspark profile-steps`: the target's step-cost table, target steps per second at B verified
tokens, SPS(B), which the `confidence` policy (Algorithm 1) reads.

Usage:

    dspark profile-steps --model models/dspark-demo-target --threads 2        # print the table
    dspark profile-steps --reprofile --json                                   # measure again, as JSON

The table is measured once when an engine with the `confidence` policy starts and cached under the
DSpark cache directory (`$DSPARK_CACHE_DIR/step-cost/`), keyed by the model's files, dtype and CPU
GEMM, the torch thread count, the hidden-state taps the drafter reads and the machine; later engines
read it from there. `--reprofile` (here, and in generate, serve, bench and loadtest) measures it
again. This command builds the engine `dspark generate` would (same model, drafter, --max-num-seqs
and threads), so the table it prints is the one that engine uses.
"""

from __future__ import annotations

import argparse
import json
import sys

from dspark.entry import module_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dspark.bundled import DRAFTER_HELP, MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--drafter", default=None, help=DRAFTER_HELP + "; its taps are part of the key")
    p.add_argument("--max-num-seqs", type=int, default=8,
                   help="requests decoded together; the table covers all of them verifying γ drafts (default: 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="profile up to this many verified tokens (default: max-num-seqs x (1 + γ))")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default: float32 compute on CPU)")
    from dspark.config import add_runtime_arguments

    add_runtime_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reprofile", action="store_true", help="measure again even when a cached table exists")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    """`dspark profile-steps`: exit status 0."""
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    from dspark.engine import LLM

    llm = LLM(model=args.model, drafter="auto" if args.drafter is None else args.drafter, dtype=args.dtype,
              cpu_gemm=args.cpu_gemm, attention=args.attention, kv_cache_dtype=args.kv_cache_dtype,
              num_threads=args.threads,
              max_num_seqs=args.max_num_seqs)
    with llm._threads():
        import torch

        threads = torch.get_num_threads()
        table = llm.engine.load_step_cost(args.reprofile, args.max_tokens)
    eng = llm.engine
    source = "read from the cache" if eng.step_cost_cached else "measured now"
    if args.json:
        print(json.dumps({"model": llm.model_label, "drafter": llm.drafter.name if llm.drafter else None,
                          "threads": threads, "cache": str(eng.step_cost_path), "cached": eng.step_cost_cached,
                          "table": table.to_json(), "rows": table.rows()}))
        return 0
    taps = f"{llm.drafter.name} drafter's taps {llm.drafter.target_layer_ids}" if llm.drafter else "no taps"
    print(f"{llm.model_label}, {threads} threads, {taps}; {source}: {eng.step_cost_path}")
    print(f"{'B':>5} {'ms/step':>9} {'steps/s':>9} {'tokens/s':>10}")
    for r in table.rows():
        print(f"{r['tokens']:>5} {r['ms_per_step']:>9.2f} {r['steps_per_s']:>9.1f} {r['tokens_per_s']:>10.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m dspark.eval.step_cost", description=__doc__, add_arguments=add_arguments,
                       run=run, label="dspark profile-steps: error")


if __name__ == "__main__":
    sys.exit(main())
