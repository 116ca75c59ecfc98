"""Plain-decoding speed of DSpark's runtime against Hugging Face transformers `generate()`.

Same checkpoint, same prompts, greedy, measured side by side in one run (interleaved repeats, best
of N per method), at batch 1 and batch 8; checks that both produce the same tokens and prints the
ratios. Writes JSON (and a PNG bar chart when matplotlib is installed).

    python benchmarks/plain_vs_transformers.py --threads 2 --max-tokens 128 --out runs/bench_plain.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

# Generic Python openings written for this benchmark (not taken from any evaluation set).
PROMPTS = [
    "def binary_search(items, target):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "def parse_header(line):\n    \"\"\"Split a header line into name and value.\"\"\"\n",
    "def read_config(path):\n",
    "class Stack:\n    \"\"\"A simple stack.\"\"\"\n\n    def __init__(self):\n",
    "def flatten(nested):\n",
    "def _format_time(seconds):\n",
]


def bench_ours(llm, prompts, max_tokens, batch):
    from dspark import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], params)
    dt = time.perf_counter() - t
    return dt, [o.token_ids for o in outs]


def bench_hf(model, tok, prompts, max_tokens, batch):
    t = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        outs += out[:, enc["input_ids"].shape[1]:].tolist()
    dt = time.perf_counter() - t
    return dt, outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo target)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time of each is kept")
    p.add_argument("--out", default="runs/bench_plain.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark import LLM
    from dspark.engine import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    llm = LLM(model=path, max_num_seqs=8)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    prompts = PROMPTS
    n_tokens = len(prompts) * args.max_tokens

    # Warm up both (first calls allocate caches and pick kernels).
    bench_ours(llm, prompts[:1], 8, 1)
    bench_hf(hf, tok, prompts[:1], 8, 1)
    results = {}
    tokens = {}
    for rep in range(args.repeats):
        for name, fn in [("dspark_b1", lambda: bench_ours(llm, prompts, args.max_tokens, 1)),
                         ("transformers_b1", lambda: bench_hf(hf, tok, prompts, args.max_tokens, 1)),
                         ("dspark_b8", lambda: bench_ours(llm, prompts, args.max_tokens, 8)),
                         ("transformers_b8", lambda: bench_hf(hf, tok, prompts, args.max_tokens, 8))]:
            dt, toks = fn()
            results[name] = min(results.get(name, float("inf")), dt)
            tokens[name] = toks
            print(f"repeat {rep + 1}/{args.repeats} {name}: {n_tokens / dt:.1f} tokens/s", file=sys.stderr)

    same_b1 = tokens["dspark_b1"] == tokens["transformers_b1"]
    same_b8 = sum(a == b for a, b in zip(tokens["dspark_b8"], tokens["transformers_b8"]))
    tps = {k: n_tokens / v for k, v in results.items()}
    report = {
        "model": str(path), "threads": args.threads, "max_tokens": args.max_tokens, "num_prompts": len(prompts),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "speedup_b1_vs_transformers": round(tps["dspark_b1"] / tps["transformers_b1"], 3),
        "speedup_b8_vs_transformers": round(tps["dspark_b8"] / tps["transformers_b8"], 3),
        "dspark_b8_over_b1": round(tps["dspark_b8"] / tps["dspark_b1"], 3),
        "same_tokens_b1": same_b1,
        "same_tokens_b8_prompts": f"{same_b8}/{len(prompts)}",
        "same_tokens_dspark_b8_vs_b1": tokens["dspark_b8"] == tokens["dspark_b1"],
    }
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| method | batch 1 tokens/s | batch 8 tokens/s |\n| --- | --- | --- |")
    print(f"| transformers generate() | {tps['transformers_b1']:.1f} | {tps['transformers_b8']:.1f} |")
    print(f"| dspark plain | {tps['dspark_b1']:.1f} | {tps['dspark_b8']:.1f} |")
    print(f"| ratio | {report['speedup_b1_vs_transformers']:.2f}x | {report['speedup_b8_vs_transformers']:.2f}x |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ["transformers_b1", "dspark_b1", "transformers_b8", "dspark_b8"]
        ax.bar(names, [tps[n] for n in names], color=["#999", "#d62", "#999", "#d62"])
        ax.set_ylabel("tokens/s (greedy)")
        ax.set_title(f"Plain decoding, {args.threads} threads, {args.max_tokens} tokens/prompt")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    if not same_b1:
        print("error: batch-1 greedy tokens differ from transformers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
