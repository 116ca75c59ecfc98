"""Where batch 1 and batch 8 spend their time: prompt prefill against decoding, and what a policy costs.

    python benchmarks/prefill_share.py --threads 2 [--model M] [--max-tokens 64] [--repeats 2]
    python benchmarks/prefill_share.py --threads 2 --policy confidence [--drafter dspark]
    python benchmarks/prefill_share.py --threads 2 --slack-ab 8

The 8 chat requests of `plain_vs_transformers.py` (through the chat template), greedy, `--max-tokens`
new tokens each (eos ignored), decoded by `LLM.generate` one at a time and then as one batch of 8,
`--repeats` times alternating. The prefill is read from each request's time to first token (the sum
over the one-at-a-time requests; the largest in the batch, whose prompts are prefilled together);
the rest is decoding. Prints tokens/s with and without the prefill and writes JSON. With `--policy`
the batch of 8 is also decoded with that drafter and policy, alternating with plain decoding, to time
what the policy costs (its rounds are counted: a gate that drafts nothing shows as one round a token).
With `--slack-ab N` it only times the 8 prompts admitted together (one new token each) N times with the
CPU prefill padding slack of `dspark/engine.py` at 0.25 and at 0 alternately, and checks the tokens agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_vs_transformers import CHAT_PROMPTS  # noqa: E402

from dspark.train.checkpoint import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats (default: 2)")
    ap.add_argument("--policy", default=None, help="also time batch 8 with this policy (default: none)")
    ap.add_argument("--drafter", default="dspark", help="the drafter for --policy (default: dspark)")
    ap.add_argument("--slack-ab", type=int, default=0, metavar="N",
                    help="time the batch-8 prefill at CPU padding slack 0.25 and 0, N times each (default: off)")
    ap.add_argument("--out", default="runs/prefill_share.json", help="results JSON (default: runs/prefill_share.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dspark import LLM, SamplingParams
    from dspark.bundled import default_model_path

    model = args.model or default_model_path()
    plain = LLM(model=model, max_num_seqs=8)
    spec = LLM(model=model, drafter=args.drafter, policy=args.policy, max_num_seqs=8) if args.policy else None
    ids = [plain.tokenizer.encode(plain.render_chat([{"role": "user", "content": p}])) for p in CHAT_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    n_tokens = len(ids) * args.max_tokens
    if args.slack_ab:
        return slack_ab(plain, ids, args)
    runs: list[dict] = []
    for rep in range(args.repeats):
        for batch in (1, 8):
            t0 = time.perf_counter()
            outs = []
            for i in range(0, len(ids), batch):
                outs += plain.generate(ids[i:i + batch], params)
            total = time.perf_counter() - t0
            ttft = [o.metrics.time_to_first_token for o in outs]
            prefill = sum(ttft) if batch == 1 else max(ttft)
            row = {"repeat": rep, "batch": batch, "seconds": round(total, 3), "prefill_seconds": round(prefill, 3),
                   "tokens_per_s": round(n_tokens / total, 1),
                   "tokens_per_s_without_prefill": round(n_tokens / (total - prefill), 1)}
            runs.append(row)
            print(f"repeat {rep + 1}: batch {batch}: {total:.2f} s, prefill {prefill:.2f} s "
                  f"({100 * prefill / total:.0f}%), {row['tokens_per_s']} tokens/s, "
                  f"{row['tokens_per_s_without_prefill']} without the prefill", flush=True)
        if spec is not None:
            for name, llm in (("plain", plain), (args.policy, spec)):
                t0 = time.perf_counter()
                outs = llm.generate(ids, params)
                total = time.perf_counter() - t0
                rounds = sum(o.metrics.rounds for o in outs)
                runs.append({"repeat": rep, "batch": 8, "policy": name, "seconds": round(total, 3), "rounds": rounds})
                print(f"repeat {rep + 1}: batch 8, {name}: {total:.2f} s, {rounds} rounds", flush=True)
    b1 = [r for r in runs if r["batch"] == 1 and "policy" not in r]
    b8 = [r for r in runs if r["batch"] == 8 and "policy" not in r]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    summary = {"b8_over_b1": round(med(b8, "tokens_per_s") / med(b1, "tokens_per_s"), 3),
               "b8_over_b1_without_prefill": round(med(b8, "tokens_per_s_without_prefill")
                                                   / med(b1, "tokens_per_s_without_prefill"), 3)}
    print(f"batch 8 / batch 1: {summary['b8_over_b1']}x, {summary['b8_over_b1_without_prefill']}x without the prefill")
    report = {"model": str(model), "threads": args.threads, "max_tokens": args.max_tokens,
              "prompt_tokens": [len(i) for i in ids], "runs": runs, "summary": summary}
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def slack_ab(llm, ids, args) -> int:
    import dspark.engine as engine
    from dspark import SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times: dict[float, list[float]] = {0.25: [], 0.0: []}
    tokens: dict[float, list] = {}
    saved = engine.PREFILL_PAD_SLACK_CPU
    try:
        for _ in range(args.slack_ab + 1):  # the first round warms up
            for slack in times:
                engine.PREFILL_PAD_SLACK_CPU = slack
                t0 = time.perf_counter()
                outs = llm.generate(ids, one)
                times[slack].append(time.perf_counter() - t0)
                tokens[slack] = [o.token_ids for o in outs]
    finally:
        engine.PREFILL_PAD_SLACK_CPU = saved
    med = {s: statistics.median(v[1:]) for s, v in times.items()}
    same = tokens[0.25] == tokens[0.0]
    print(f"8 prompts admitted together, prefill + 1 token: slack 0.25 {med[0.25]:.3f} s, slack 0 {med[0.0]:.3f} s "
          f"({med[0.25] / med[0.0]:.2f}x); same tokens: {same}")
    report = {"threads": args.threads, "prompt_tokens": [len(i) for i in ids], "repeats": args.slack_ab,
              "seconds": {str(s): [round(x, 4) for x in v[1:]] for s, v in times.items()},
              "median_seconds": {str(s): round(v, 4) for s, v in med.items()}, "same_tokens": same}
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
