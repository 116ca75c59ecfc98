"""How predictable the target is along its own greedy replies: the probability of its top token at
each generated position (teacher-forced, one forward over prompt + reply). A drafter can at best
match the target where the target itself is sure; this is the ceiling its first-draft acceptance
is compared against in the README.

    python benchmarks/target_confidence.py --data-dir ../shared/benchmarks --set humaneval \
        --num-prompts 16 --max-tokens 64 --threads 2 [--model M] [--out runs/target_confidence.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="target (default: the default model)")
    p.add_argument("--data-dir", required=True, help="directory of benchmark prompt sets (*.jsonl)")
    p.add_argument("--set", default="humaneval", help="prompt set (default: humaneval)")
    p.add_argument("--num-prompts", type=int, default=16, help="first N prompts of the set (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per reply (default: 64)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dspark import LLM, SamplingParams
    from dspark.bundled import default_model_path
    from dspark.eval.prompts import load_prompt_set

    model = args.model or str(default_model_path())
    llm = LLM(model=model, drafter=None, max_num_seqs=8)
    texts = load_prompt_set(Path(args.data_dir), args.set)[: args.num_prompts]
    prompts = [llm.tokenizer.encode(llm.render_chat([{"role": "user", "content": t}])) for t in texts]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    target = llm.target
    top = []
    for prompt, out in zip(prompts, outs):
        ids = list(prompt) + list(out.token_ids)
        cache = target.new_cache(1, len(ids) + 1)
        slot = cache.allocate()
        logits = target.forward(cache, [slot], [ids], all_logits=True).logits[0].float()
        # Row j predicts token j + 1: the rows that produced the reply.
        start = len(ids) - len(out.token_ids) - 1
        top.append(logits[start:len(ids) - 1].softmax(-1).max(-1).values)
    m = torch.cat(top)
    res = {"model": Path(model).name, "set": args.set, "prompts": len(prompts), "positions": int(m.numel()),
           "mean_top_prob": round(float(m.mean()), 4),
           "share_top_prob_above_0.9": round(float((m > 0.9).float().mean()), 4),
           "share_top_prob_above_0.5": round(float((m > 0.5).float().mean()), 4),
           "threads": args.threads}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
