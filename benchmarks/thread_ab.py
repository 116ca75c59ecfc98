"""Which thread steps the engine: plain greedy decoding of one request on the thread that loaded SmolLM2
against a second thread (the serving loop before the thirteenth session), alternating in one process.

    python benchmarks/thread_ab.py --threads 2 [--pairs 5] [--max-tokens 64] [--out runs/thread_ab.json]

Pass i runs the request on the main thread (no other thread alive), then on a fresh second thread (as a
server's engine thread), then on the main thread while that second thread, done with its request, is
still alive. Printed: medians (s) and the median of the pair-by-pair ratios to the first. libgomp (torch's
OpenMP runtime, which the C kernels share) keeps a team of workers for every thread that has started
parallel sections; with two such threads there are more of its threads than CPUs, and it then makes
idle workers sleep instead of spin, so every section pays a wake-up, whichever thread starts it (see
`dspark.server.serving.ServingEngine.run_here`).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--pairs", type=int, default=5, help="alternating main / second-thread pairs (default: 5)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated (default: 64)")
    ap.add_argument("--out", default="runs/thread_ab.json", help="results JSON (default: runs/thread_ab.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dspark import SamplingParams
    from dspark.bundled import default_model_path
    from dspark.engine import Engine
    from dspark.models import load_target
    from dspark.train.checkpoint import atomic_write_text

    target = load_target(default_model_path())
    prompt = target.tokenizer.encode("Write a Python function that returns the n-th Fibonacci number.")
    engine = Engine(target, max_num_seqs=1, max_model_len=len(prompt) + args.max_tokens + 1)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    def run() -> float:
        t = time.perf_counter()
        engine.run([prompt], [params])
        return time.perf_counter() - t

    run()  # warm-up on the main thread
    alone, second_s, beside = [], [], []
    for _ in range(args.pairs):
        alone.append(run())
        jobs: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()

        def worker() -> None:
            while (job := jobs.get()) is not None:
                done.put(job())

        second = threading.Thread(target=worker, name="second")
        second.start()
        try:
            jobs.put(run)
            second_s.append(done.get())
            beside.append(run())  # the second thread idle but alive, its OpenMP team kept
        finally:
            jobs.put(None)
            second.join()
    ratio = {k: statistics.median(b / a for a, b in zip(alone, v)) for k, v in (("second", second_s), ("beside", beside))}
    result = {"threads": args.threads, "max_tokens": args.max_tokens, "pairs": args.pairs,
              "main_alone_s": alone, "second_thread_s": second_s, "main_beside_second_s": beside,
              "median_main_alone_s": statistics.median(alone), "median_second_thread_s": statistics.median(second_s),
              "median_main_beside_second_s": statistics.median(beside),
              "median_ratio_second_over_main_alone": ratio["second"],
              "median_ratio_beside_over_main_alone": ratio["beside"]}
    print(f"threads {args.threads}; {args.max_tokens} greedy tokens, {args.pairs} alternating passes (median s)")
    print(f"main thread alone {result['median_main_alone_s']:.3f}; a second thread {result['median_second_thread_s']:.3f} "
          f"({ratio['second']:.2f}x pair by pair); the main thread beside the idle second "
          f"{result['median_main_beside_second_s']:.3f} ({ratio['beside']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
