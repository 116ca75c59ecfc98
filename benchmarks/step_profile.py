"""Where one plain decode step's time goes at batch 1, against the weight-read floor.

    python benchmarks/step_profile.py --threads 2 [--model M] [--steps 40] [--out runs/step_profile.json]

Prints: the median step time; with the fused layer parts (the default on a Q4 file), the time in them
(the four projections of every layer with its norms, RoPE, SiLU and residual adds; by default the
whole layer, KV-cache write and attention included, is one C call; with DSPARK_WHOLE_LAYER=0 one C call
before attention and one after); the time in the weight GEMMs (this project's int4/int8 kernels timed
directly, torch's GEMM ops from torch.profiler: fbgemm's fp16-weight GEMM, aten's int4 kernel, or
aten::linear/addmm/mm) as a share of profiled steps, and in everything else; the bytes of weights one step
reads; this machine's read bandwidth (a sum over a 1 GiB tensor); and the floor
weight bytes / bandwidth, the step time a runtime that only read its weights would need.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark.config import add_runtime_arguments
from dspark.train.checkpoint import atomic_write_text

GEMM_OPS = ("quantized::linear_dynamic_fp16", "aten::addmm", "aten::mm", "aten::linear",
            "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm")


def bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth (bytes per second a sum over a 1 GiB tensor streams), best of `repeats`."""
    src = torch.ones(nbytes // 4)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def weight_bytes(target) -> int:
    """Bytes of projection + LM-head weights one step reads: 2 per weight on the packed fp16 GEMM,
    half a byte plus a bf16 scale and zero per 32 on the int4 GEMM, the dtype's size otherwise."""
    from dspark.models.transformer import Int4Linear, Int8Linear, PackedLinear

    t = target.transformer
    mats = [(t.lm_head_weight, t.packed_lm_head)]
    for layer in t.layers:
        a, m = layer.attn, layer.mlp
        mats += [(a.qkv_weight, a.packed.get("qkv")), (a.o_weight, a.packed.get("o")),
                 (m.gate_up_weight, m.packed.get("gate_up")), (m.down_weight, m.packed.get("down"))]
    total = 0.0
    for w, packed in mats:
        if isinstance(packed, Int4Linear):
            total += w.numel() * (0.5 + 4 / Int4Linear.GROUP)
        elif isinstance(packed, Int8Linear):
            total += w.numel() * (1 + 4 / Int8Linear.GROUP)
        elif isinstance(packed, PackedLinear):
            total += w.numel() * 2
        else:
            total += w.numel() * w.element_size()
    return int(total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps (default: 40)")
    add_runtime_arguments(ap)  # --cpu-gemm, --attention
    ap.add_argument("--out", default="runs/step_profile.json", help="results JSON (default: runs/step_profile.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from dspark.bundled import default_model_path
    from dspark.models import load_target

    target = load_target(args.model or default_model_path(), cpu_gemm=args.cpu_gemm, attention=args.attention)
    cache = target.new_cache(1, 1024)
    slot = cache.allocate()
    target.forward(cache, [slot], [list(range(100, 164))], all_logits=False)
    tok = torch.tensor([[200]])

    def step() -> float:
        t = time.perf_counter()
        target.forward(cache, [slot], tok)
        cache.truncate(slot, 64)  # stay at one position so every step does the same work
        return time.perf_counter() - t

    # This project's C kernels (dspark/models/int4_gemm.c, row_attention.c) are not torch ops: their time
    # is measured directly over the timed (unprofiled) steps; torch's GEMM ops' share comes from the
    # profiler. With the fused layer parts (the default on a Q4 file) the projections run inside
    # int4_gemm.layer_in / layer_out together with the norms, RoPE, SiLU and residual adds: that time is
    # reported as `fused_layer_ms` (GEMMs and those small ops, which it does not separate). With the whole
    # layer in one call (int4_gemm.layer, the default where every row is on the row kernel, as in a decode
    # step) the KV-cache write and the attention are inside it too, and `attention_ms` is then 0; with
    # every layer in one call (int4_gemm.layers, the default since) `fused_layer_ms` is all 30 layers.
    from dspark.models import int4_gemm, row_attention

    spent = {"gemm": 0.0, "fused": 0.0, "attention": 0.0}

    def timed(fn, label):
        def run(*a, **kw):
            t = time.perf_counter()
            y = fn(*a, **kw)
            spent[label] += time.perf_counter() - t
            return y
        return run

    for _ in range(5):
        step()
    patched = [(int4_gemm, "mm", "gemm"), (int4_gemm, "mm8", "gemm"), (int4_gemm, "mm_a8", "gemm"),
               (int4_gemm, "mm8_a8", "gemm"), (int4_gemm, "mm_il", "gemm"), (int4_gemm, "layer_in", "fused"),
               (int4_gemm, "layer_out", "fused"), (int4_gemm, "layer", "fused"), (int4_gemm, "layers", "fused"),
               (row_attention, "attention", "attention")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, label in patched:
        setattr(mod, name, timed(getattr(mod, name), label))
    try:
        times = [step() for _ in range(args.steps)]
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    total_s = sum(times)
    kernel_share = spent["gemm"] / total_s
    fused_share = spent["fused"] / total_s
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    torch_gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS)
    # the rest of a step (what is not in our kernels), split as the profiler sees torch's ops
    share = kernel_share + (1 - kernel_share - fused_share) * (torch_gemm / total if total else 0.0)
    step_ms = statistics.median(times) * 1e3
    wb = weight_bytes(target)
    bw = bandwidth_gbs()
    floor_ms = wb / (bw * 1e9) * 1e3
    fused_layers = target.transformer.num_fused_layers
    report = {
        "model": str(target.source), "threads": args.threads, "cpu_gemm": target.cpu_gemm, "attention": target.attention,
        "step_ms": round(step_ms, 3), "tokens_per_s": round(1e3 / step_ms, 1),
        "fused_layers": fused_layers,
        "fused_layer_ms": round(step_ms * fused_share, 3),
        "gemm_share": round(share, 3), "gemm_ms": round(step_ms * share, 3),
        "attention_ms": round(step_ms * spent["attention"] / total_s, 3),  # a part of other_ms
        "other_ms": round(step_ms * (1 - share - fused_share), 3),
        "weight_bytes_per_step": wb, "read_bandwidth_gb_s": round(bw, 2),
        "weight_read_floor_ms": round(floor_ms, 3),
    }
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
