"""Does `torch.compile` pay on this CPU? Eager against compiled, side by side in one process.

    python benchmarks/compile_probe.py --threads 2 [--model M] [--drafter dspark] [--repeats 30]

Two hot paths that still run as many small torch ops (the target's default path on a Q4 file is the
fused C layer parts, which torch.compile cannot see into):
  - the drafter's `propose` of γ tokens, with `torch.compile(dynamic=True)` on its draft layers
    (`run_layers`: norms, projections on the packed fp16 GEMM, RoPE, attention, MLP);
  - the target's per-op decode step (`DSPARK_FUSED_LAYERS=0`: the path of models the fused parts do
    not take), with every decoder layer's `forward` compiled.
Prints median milliseconds of eager, compiled and eager again (the first and last bracket drift of a
shared machine), the compiled/eager ratio and the compile-and-warm-up time, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark.train.checkpoint import atomic_write_text


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def probe(label: str, fn, install, remove, repeats: int) -> dict:
    eager = median_ms(fn, repeats)
    t0 = time.perf_counter()
    install()
    try:
        fn()  # compiles
        warm = time.perf_counter() - t0
        compiled = median_ms(fn, repeats)
        error = None
    except Exception as e:  # noqa: BLE001  (a failed compile is a result here, reported)
        warm, compiled, error = time.perf_counter() - t0, float("nan"), f"{type(e).__name__}: {e}"[:300]
    finally:
        remove()
    again = median_ms(fn, repeats)
    row = {"path": label, "eager_ms": round(eager, 3), "compiled_ms": round(compiled, 3),
           "eager_again_ms": round(again, 3), "compiled_over_eager": round(compiled / ((eager + again) / 2), 3),
           "compile_and_warm_s": round(warm, 1), "error": error}
    print(f"{label}: eager {eager:.2f} ms, compiled {compiled:.2f} ms, eager again {again:.2f} ms "
          f"(compiled/eager {row['compiled_over_eager']:.2f}x; compile + warm-up {warm:.1f} s)"
          + (f" — {error}" if error else ""), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the default model)")
    ap.add_argument("--drafter", default="dspark", help="drafter name or directory (default: dspark)")
    ap.add_argument("--gamma", type=int, default=7, help="draft tokens a propose (default: 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (default: 30)")
    ap.add_argument("--out", default="runs/compile_probe.json", help="results JSON (default: runs/compile_probe.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dspark.bundled import default_model_path, resolve_drafter
    from dspark.drafters import load_drafter
    from dspark.models import load_target
    from dspark.sampling import SamplingParams, SamplingTensors

    target = load_target(args.model or default_model_path())
    ids = list(range(100, 140))
    rows = []

    drafter = load_drafter(str(resolve_drafter(args.drafter, target)), target, max_seqs=1, max_len=1024)
    cache = target.new_cache(1, 1024)
    slot = cache.allocate()
    res = target.forward(cache, [slot], [ids], hidden_layer_ids=drafter.target_layer_ids)
    drafter.add_sequence(slot, ids, res.hidden[0] if res.hidden is not None else None)
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)])
    model = drafter.model
    eager_layers = model.run_layers

    def set_layers(fn):
        model.run_layers = fn

    rows.append(probe(f"{drafter.name} propose (γ={args.gamma})",
                      lambda: drafter.propose([slot], [ids[-1]], args.gamma, greedy, [None]),
                      lambda: set_layers(torch.compile(eager_layers, dynamic=True)),
                      lambda: set_layers(eager_layers), args.repeats))

    t = target.transformer
    t.update_fused_layers(False)
    cache2 = target.new_cache(1, 512)
    s2 = cache2.allocate()
    target.forward(cache2, [s2], [ids], all_logits=False)
    tok = torch.tensor([[200]])

    def step():
        target.forward(cache2, [s2], tok)
        cache2.truncate(s2, len(ids))

    eager_fwd = [layer.forward for layer in t.layers]

    def compile_layers():
        for layer, fwd in zip(t.layers, eager_fwd):
            layer.forward = torch.compile(fwd, dynamic=True)

    def restore_layers():
        for layer in t.layers:
            layer.__dict__.pop("forward", None)

    rows.append(probe("target per-op decode step", step, compile_layers, restore_layers, args.repeats))
    report = {"model": str(target.source), "threads": args.threads, "torch": torch.__version__, "results": rows}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
