"""The weight-only GEMMs of `int4_gemm.c`: float32 activations times GGUF Q4_0 / Q4_1 codes (`mm`) or
Q8_0 codes (`mm8`, for the LM head, which Q4 files usually store in Q8_0); and the same weights times
activations quantized to 8 bits per group of 32 (`mm_a8`, `mm8_a8`: llama.cpp's numerics for these types,
integer dot products, faster at the few rows decoding and verification run); on a CPU with VNNI the same
products, bit for bit, on weights interleaved by 8 outputs (`interleave4` / `interleave8`, `mm_il`).

`dspark.models.transformer.Int4Linear` runs on it when it builds (an x86-64 CPU with AVX2 and FMA and a
C compiler), else on torch's `aten._weight_int4pack_mm_for_cpu`. Against torch's kernel it reads the
same bytes, keeps activations in float32 (torch's rounds them, and its scales, to bf16), and is faster
at every row count measured (`benchmarks/int4_gemm_bench.py`). `DSPARK_INT4_GEMM=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dspark.models.ckernel import CKernel

SOURCE = Path(__file__).with_name("int4_gemm.c")
GROUP = 32
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"])


def pack_codes(codes: Tensor) -> Tensor:
    """Codes [N, K] (0..15) -> the kernel's bytes [N, K / 32, 16]: byte j of a group holds element j in
    its low nibble and element j + 16 in its high nibble (GGUF's Q4 block layout)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // GROUP, 2, GROUP // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).contiguous()


def unpack_codes(packed: Tensor) -> Tensor:
    """`pack_codes`'s inverse: [N, K / 32, 16] bytes -> codes [N, K] (0..15, uint8)."""
    n, groups, _ = packed.shape
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(n, groups * GROUP)


def _run(fn, x: Tensor, codes: Tensor, d: Tensor, m: Tensor, threads: int) -> Tensor:
    # dspark_int4_mm and dspark_int8_mm take the same arguments (the int8 one does not read m)
    rows, k = x.shape
    n = d.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    rc = fn(rows, n, k, x.data_ptr(), x.stride(0), codes.data_ptr(), d.data_ptr(), m.data_ptr(),
            y.data_ptr(), n, threads)
    if rc != 0:
        raise RuntimeError(f"weight GEMM kernel returned {rc} (input width {k} is not a multiple of {GROUP})")
    return y


def weights8(codes: Tensor, d: Tensor) -> Tensor:
    """Q8_0's float32 weights [N, K]: d * q per group of 32 (exact in float32)."""
    n, k = codes.shape
    return (codes.view(n, k // GROUP, GROUP).float() * d.unsqueeze(-1)).view(n, k)


def reference(x: Tensor, codes: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """What the kernel computes, in torch ops (summation order aside): x @ W^T, W = fl(d * q + m)."""
    return x.float() @ weights(codes, d, m).t()


def weights(codes: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """The model's float32 weights [N, K]: fl(d * q + m) per group of 32 (d * q is exact in float32)."""
    n, k = codes.shape
    q = codes.view(n, k // GROUP, GROUP).float()
    return (q * d.unsqueeze(-1) + m.unsqueeze(-1)).view(n, k)


def quantize_rows8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The 8-bit activations the `_a8` kernels compute with, per row and group of 32 (as the C code does):
    dx = max|x| / 127, qx = round-half-even(x * (127 / max|x|)) (0 where max|x| = 0), sx = dx * sum(qx).
    x [M, K] float32 -> qx [M, K / 32, 32] (float32 holding integers), dx, sx [M, K / 32]."""
    rows, k = x.shape
    xg = x.float().reshape(rows, k // GROUP, GROUP)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    qx = torch.round(xg * inv.unsqueeze(-1))
    dx = amax / 127.0
    return qx, dx, dx * qx.sum(-1)


def reference_a8(x: Tensor, codes: Tensor, d: Tensor, m: Tensor | None) -> Tensor:
    """What the `_a8` kernels compute, in float64 torch ops (their float32 rounding aside): codes [N, K]
    (0..15 for Q4 with offsets m [N, K / 32]; int8 for Q8_0 with m None), scales d [N, K / 32]."""
    qx, dx, sx = quantize_rows8(x)
    n, k = codes.shape
    q = codes.view(n, k // GROUP, GROUP).double()
    isum = torch.einsum("ngk,mgk->mng", q, qx.double())  # exact integers
    y = (isum * (d.double().unsqueeze(0) * dx.double().unsqueeze(1))).sum(-1)
    if m is not None:
        y = y + sx.double() @ m.double().t()
    return y.float()


def _self_test(run: Callable[[Tensor, int], Tensor], reference: Callable[[Tensor], Tensor], k: int) -> bool:
    """A kernel (`run(x, threads)`) against its reference on x [11, k], and every row count giving every
    row the same bits."""
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(2))
    y = run(x, 2)
    if not torch.allclose(y, reference(x), atol=1e-5, rtol=1e-5):
        return False
    return all(torch.equal(run(x[i:i + r], 1), y[i:i + r]) for i, r in ((0, 1), (3, 2), (5, 6)))


def _setup(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.dspark_int4_mm, lib.dspark_int8_mm):
        fn.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64]
        fn.restype = ctypes.c_int
    for fn in (lib.dspark_int4_mm_a8, lib.dspark_int8_mm_a8):
        fn.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64, i64]
        fn.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.dspark_layer_in.argtypes = [i64, i64, ptr, i64, ptr, f32, ptr, ptr, i64, i64, ptr, i64]
    lib.dspark_layer_in.restype = ctypes.c_int
    lib.dspark_layer_out.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ptr, f32, ptr, i64, ptr, i64]
    lib.dspark_layer_out.restype = ctypes.c_int
    lib.dspark_layer.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, f32, i64, i64]
    lib.dspark_layer.restype = ctypes.c_int
    lib.dspark_layers.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, f32, ptr, ptr,
                                  i64, i64, i64]
    lib.dspark_layers.restype = ctypes.c_int
    lib.dspark_draft_layer.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, f32, i64]
    lib.dspark_draft_layer.restype = ctypes.c_int
    lib.dspark_draft_context.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64]
    lib.dspark_draft_context.restype = ctypes.c_int
    lib.dspark_il_mm_a8.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64, i64]
    lib.dspark_il_mm_a8.restype = ctypes.c_int
    lib.dspark_has_vnni.argtypes = []
    lib.dspark_has_vnni.restype = ctypes.c_int
    g = torch.Generator().manual_seed(0)
    n, k = 13, 96  # a column tail (13 = 3 blocks of 4 + 1) and three groups
    q4 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    q8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    d, m = torch.rand(n, k // GROUP, generator=g) * 0.05, torch.randn(n, k // GROUP, generator=g) * 0.05
    p4, s4, s8 = pack_codes(q4), scales4(d, m), scales4(d, None)
    ok = _self_test(lambda x, t: _run(lib.dspark_int4_mm, x, p4, d, m, t), lambda x: reference(x, q4, d, m), k) and \
        _self_test(lambda x, t: _run(lib.dspark_int8_mm, x, q8, d, d, t), lambda x: x @ weights8(q8, d).t(), k) and \
        _self_test(lambda x, t: _run_a8(lib.dspark_int4_mm_a8, x, p4, s4, n, t),
                   lambda x: reference_a8(x, q4, d, m), k) and \
        _self_test(lambda x, t: _run_a8(lib.dspark_int8_mm_a8, x, q8, s8, n, t),
                   lambda x: reference_a8(x, q8, d, None), k)
    lib.vnni_ok = False
    if ok and lib.dspark_has_vnni():
        # the interleaved kernels (the first 8 outputs) give the bits of the kernels they stand for; if
        # not, they are not used (the others are)
        x = torch.randn(7, k, generator=g)
        i4, i8 = interleave4(p4[:8], d[:8], m[:8]), interleave8(q8[:8], d[:8])
        lib.vnni_ok = all(torch.equal(_run_il(lib.dspark_il_mm_a8, x[:r], *i4, 8, 0, 2),
                             _run_a8(lib.dspark_int4_mm_a8, x[:r], p4, s4, n, 2)[:, :8]) and
                 torch.equal(_run_il(lib.dspark_il_mm_a8, x[:r], *i8, 8, 1, 2),
                             _run_a8(lib.dspark_int8_mm_a8, x[:r], q8, s8, n, 2)[:, :8]) for r in (1, 5, 7))
    return ok


KERNEL = CKernel(SOURCE, FLAG_SETS, _setup, env="DSPARK_INT4_GEMM")


def available() -> bool:
    """Whether the kernel is built (compiling it now if need be) and passed its self-test."""
    return KERNEL.available()


def unavailable_reason() -> str | None:
    return KERNEL.unavailable_reason()


def _kernel(name: str, x: Tensor):
    """The library's function `name` and x as the GEMMs take it ([rows, K] float32, K contiguous)."""
    lib = KERNEL.loaded or KERNEL.library()  # layers built before the kernel was turned off keep it
    if lib is None:
        raise RuntimeError(f"the weight GEMM kernels are unavailable: {unavailable_reason()}")
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        x = x.float().contiguous().view(-1, x.shape[-1])
    return getattr(lib, name), x


def _call(name: str, x: Tensor, codes: Tensor, d: Tensor, m: Tensor) -> Tensor:
    fn, x = _kernel(name, x)
    return _run(fn, x, codes, d, m, torch.get_num_threads())


def mm(x: Tensor, packed: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """x [rows, K] float32 (rows evenly strided, K contiguous) @ W^T -> [rows, N] float32, on torch's
    thread count, for Q4 codes packed by `pack_codes` with scales d and offsets m [N, K / 32]."""
    return _call("dspark_int4_mm", x, packed, d, m)


def mm8(x: Tensor, codes: Tensor, d: Tensor) -> Tensor:
    """x [rows, K] float32 @ W^T for Q8_0 codes [N, K] int8 and scales d [N, K / 32] -> [rows, N]."""
    return _call("dspark_int8_mm", x, codes, d, d)


def scales4(d: Tensor, m: Tensor | None) -> Tensor:
    """The `_a8` kernels' scales: d (and m) [N, K / 32] -> [ceil(N / 4), K / 32, 8] (d of 4 outputs, then
    their m) or [.., 4] (d alone, for Q8_0), float32 contiguous, the last block padded with zeros."""
    n, groups = d.shape
    parts = [d] if m is None else [d, m]
    pad = (-n) % 4
    blocks = [torch.cat([t.float(), t.new_zeros(pad, groups, dtype=torch.float32)]).view(-1, 4, groups).transpose(1, 2)
              for t in parts]
    return torch.cat(blocks, dim=2).contiguous()


def interleave4(packed: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """The VNNI kernels' layout of a Q4 weight (N a multiple of 8; see `int4_gemm.c`, run_il): packed
    codes [N, G, 16] -> [N / 8, G, 4, 8, 4] bytes (block, group, vector t, output o, byte b = byte 4t + b
    of output o's group), and scales [N / 8, G, 16] (d of the 8 outputs, then m)."""
    n, groups, _ = packed.shape
    il = packed.view(n // 8, 8, groups, 4, 4).permute(0, 2, 3, 1, 4).contiguous()
    sc = torch.cat([t.float().view(n // 8, 8, groups).transpose(1, 2) for t in (d, m)], dim=2).contiguous()
    return il, sc


def interleave8(codes: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The VNNI kernels' layout of a Q8_0 weight (N a multiple of 8): codes int8 [N, K] -> uint8 codes +
    128 [N / 8, G, 2, 4, 8, 4] (block, group, half, vector t, output o, byte b = element 16 half + 4t + b),
    and scales [N / 8, G, 8]."""
    n, k = codes.shape
    groups = k // GROUP
    biased = (codes.to(torch.int16) + 128).to(torch.uint8)
    il = biased.view(n // 8, 8, groups, 2, 4, 4).permute(0, 2, 3, 4, 1, 5).contiguous()
    return il, d.float().view(n // 8, 8, groups).transpose(1, 2).contiguous()


def vnni_available() -> bool:
    """Whether the interleaved VNNI kernels run here (built with VNNI, passed their self-test, not turned
    off by DSPARK_VNNI=0)."""
    lib = KERNEL.loaded or (KERNEL.library() if available() else None)
    return lib is not None and bool(getattr(lib, "vnni_ok", False)) and os.environ.get("DSPARK_VNNI", "1") != "0"


def vnni_layout(codes: Tensor, d: Tensor, m: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """A weight's (codes, scales) in the VNNI kernels' layout where they run it (`mm_il`: the same bits,
    faster), else None: Q4 packed codes [N, G, 16] with offsets m (`interleave4`), or Q8_0 codes [N, K]
    with m None (`interleave8`); N must be a multiple of 8."""
    if codes.shape[0] % 8 or not vnni_available():
        return None
    return interleave8(codes, d) if m is None else interleave4(codes, d, m)


def _run_il(fn, x: Tensor, il: Tensor, sc8: Tensor, n: int, q8: int, threads: int) -> Tensor:
    rows, k = x.shape
    y = torch.empty(rows, n, dtype=torch.float32)
    rc = fn(q8, rows, n, k, x.data_ptr(), x.stride(0), il.data_ptr(), sc8.data_ptr(), y.data_ptr(), n, threads)
    if rc != 0:
        raise RuntimeError(f"VNNI weight GEMM kernel returned {rc} (input width {k}, {n} outputs)")
    return y


def mm_il(x: Tensor, il: Tensor, sc8: Tensor, n: int, q8: bool) -> Tensor:
    """`mm_a8` (q8 False) or `mm8_a8` (q8 True) on the interleaved layout (`interleave4` /
    `interleave8`): the same bits, on VNNI."""
    fn, x = _kernel("dspark_il_mm_a8", x)
    return _run_il(fn, x, il, sc8, n, int(q8), torch.get_num_threads())


def _run_a8(fn, x: Tensor, codes: Tensor, sc4: Tensor, n: int, threads: int) -> Tensor:
    rows, k = x.shape
    y = torch.empty(rows, n, dtype=torch.float32)
    rc = fn(rows, n, k, x.data_ptr(), x.stride(0), codes.data_ptr(), sc4.data_ptr(), y.data_ptr(), n, threads)
    if rc != 0:
        raise RuntimeError(f"weight GEMM kernel returned {rc} (input width {k} is not a multiple of {GROUP})")
    return y


def _call_a8(name: str, x: Tensor, codes: Tensor, sc4: Tensor, n: int) -> Tensor:
    fn, x = _kernel(name, x)
    return _run_a8(fn, x, codes, sc4, n, torch.get_num_threads())


def mm_a8(x: Tensor, packed: Tensor, sc4: Tensor, n: int) -> Tensor:
    """`mm` on 8-bit activations (`reference_a8`) for n outputs: sc4 = `scales4(d, m)`."""
    return _call_a8("dspark_int4_mm_a8", x, packed, sc4, n)


def mm8_a8(x: Tensor, codes: Tensor, sc4: Tensor) -> Tensor:
    """`mm8` on 8-bit activations (`reference_a8` with m None): sc4 = `scales4(d, None)`."""
    return _call_a8("dspark_int8_mm_a8", x, codes, sc4, codes.shape[0])


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def layer_in(x: Tensor, norm_w: Tensor, eps: float, qkv, rope: Tensor, rope_heads: int, head_dim: int) -> Tensor:
    """The fused part of a decoder layer before attention (`dspark_layer_in`): RoPE(rmsnorm(x) @ Wqkv^T
    + b) on the first `rope_heads` heads. x: [rows, K] float32 contiguous; qkv: an `Int4Linear` on this
    kernel; rope: [rows, D / 2] complex64 (cos + i sin at each row's position). -> [rows, N] float32."""
    rows, k = x.shape
    y = torch.empty(rows, qkv.out_features, dtype=torch.float32)
    rope_f = torch.view_as_real(rope)
    rc = KERNEL.loaded.dspark_layer_in(
        rows, k, x.data_ptr(), x.stride(0), norm_w.data_ptr(), eps, ctypes.addressof(q4w(qkv)), rope_f.data_ptr(),
        rope_heads, head_dim, y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fused layer kernel (in) returned {rc} (width {k}, head dim {head_dim})")
    return y


def layer_out(x: Tensor, attn: Tensor, o, norm_w: Tensor, eps: float, gate_up, down) -> None:
    """The fused part of a decoder layer after attention (`dspark_layer_out`), in place on x [rows, K]
    float32 contiguous: x += attn @ Wo^T; x += down(silu(g) * u) with [g | u] = gate_up(rmsnorm(x)).
    attn: [rows, A] float32 contiguous; o, gate_up, down: `Int4Linear`s on this kernel."""
    rows, k = x.shape
    rc = KERNEL.loaded.dspark_layer_out(
        rows, k, x.data_ptr(), x.stride(0), attn.data_ptr(), attn.shape[1], ctypes.addressof(q4w(o)),
        norm_w.data_ptr(), eps, ctypes.addressof(q4w(gate_up)), gate_up.out_features // 2,
        ctypes.addressof(q4w(down)), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fused layer kernel (out) returned {rc} (width {k}, attention width {attn.shape[1]})")


class _Q4W(ctypes.Structure):
    # q8: Q8_0 codes (int8, scales only, 8-bit activations: sc4 set); else Q4 codes
    # il, sc8: the same weight in the VNNI kernels' layout (`interleave4` / `interleave8`), used when set
    _fields_ = [("codes", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("sc4", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("q8", ctypes.c_int64), ("il", ctypes.c_void_p),
                ("sc8", ctypes.c_void_p)]


def q4w(lin) -> _Q4W:
    """The C description of a projection (`transformer.Int4Linear` on this kernel, or an `Int8Linear` with
    act8 and an optional float32 `bias` attribute), built once and kept on it; its pointers point into
    the projection's tensors."""
    w = getattr(lin, "_q4w", None)
    if w is None:
        il, sc8 = getattr(lin, "il", None) or (None, None)
        bias = getattr(lin, "bias", None)
        if hasattr(lin, "packed"):  # Q4
            w = _Q4W(lin.packed.data_ptr(), lin.d.data_ptr(), lin.m.data_ptr(), _ptr(lin.sc4), _ptr(bias),
                     lin.out_features, 0, _ptr(il), _ptr(sc8))
        else:  # Q8_0 on 8-bit activations
            w = _Q4W(lin.codes.data_ptr(), lin.d.data_ptr(), None, lin.sc4.data_ptr(), _ptr(bias), lin.out_features, 1,
                     _ptr(il), _ptr(sc8))
        lin._q4w = w
    return w


class LayerWeights(ctypes.Structure):
    """What `dspark_layer` reads of one decoder layer (C's `struct dspark_layer_weights`): pointers into
    the layer's tensors, which the layer keeps alive; built once when the layer is set up."""

    _fields_ = [("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("qkv", _Q4W), ("o", _Q4W), ("gu", _Q4W), ("dn", _Q4W),
                ("K", ctypes.c_int64), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
                ("I", ctypes.c_int64)]

    @classmethod
    def of(cls, norm_in: Tensor, norm_post: Tensor, eps: float, qkv, o, gate_up, down, heads: int, kv_heads: int,
           head_dim: int) -> "LayerWeights":
        """qkv, o, gate_up, down: `Int4Linear`s on this kernel; the norms float32 contiguous."""
        norms = [t.detach() for t in (norm_in, norm_post)]
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in norms):
            raise ValueError("the fused layer needs float32 contiguous norm weights")
        w = cls(norms[0].data_ptr(), norms[1].data_ptr(), eps, q4w(qkv), q4w(o), q4w(gate_up), q4w(down),
                norm_in.shape[0], heads, kv_heads, head_dim, gate_up.out_features // 2)
        w.keep = (norms, qkv, o, gate_up, down)  # the memory the pointers point into stays alive
        return w


def _kv_half(k_cache: Tensor, v_cache: Tensor) -> int:
    """1 for float16 caches, 0 for float32 (the layer kernels write and read no other type)."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"the layer kernels take float32 or float16 KV caches, got {k_cache.dtype} / {v_cache.dtype}")
    return int(k_cache.dtype == torch.float16)


def layer(x: Tensor, w: LayerWeights, rope: Tensor, k_cache: Tensor, v_cache: Tensor, row_slot: Tensor,
          row_len: Tensor, attention: int, scale: float) -> None:
    """A whole decoder layer in one call (`dspark_layer`), in place on x [rows, K] float32 contiguous:
    the part before attention, each row's key and value written at position row_len[r] - 1 of cache
    slot row_slot[r] (k_cache / v_cache: [slots, kv heads, positions, D] float32 or float16, D contiguous),
    attention over positions 0 .. row_len[r] - 1 by the row kernel at address `attention`
    (`row_attention.kernel_address(k_cache.dtype)`), the part after it. rope: [rows, D / 2] complex64."""
    rc = KERNEL.loaded.dspark_layer(
        ctypes.addressof(w), x.shape[0], x.data_ptr(), torch.view_as_real(rope).data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), row_slot.data_ptr(),
        row_len.data_ptr(), attention, scale, _kv_half(k_cache, v_cache), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fused layer kernel returned {rc} (width {w.K}, heads {w.H}/{w.Hkv} x {w.D})")


def layer_table(weights: list[LayerWeights]) -> ctypes.Array:
    """The array of layer descriptions `layers` takes (it keeps the descriptions alive)."""
    table = (ctypes.c_void_p * len(weights))(*(ctypes.addressof(w) for w in weights))
    table.keep = weights  # type: ignore[attr-defined]
    return table


def layers(x: Tensor, table: ctypes.Array, rope: Tensor, k_cache: Tensor, v_cache: Tensor, row_slot: Tensor,
           row_len: Tensor, attention: int, scale: float, taps: Tensor | None, tap_layers: Tensor | None) -> None:
    """Every decoder layer in one call (`dspark_layers`): `layer` for each entry of `table`
    (`layer_table`) in order, in place on x [rows, K]; k_cache / v_cache: the whole caches
    [layers, slots, kv heads, positions, D]; x after layer tap_layers[j] copied to taps[:, j] ([rows,
    n_taps, K] float32 contiguous); the caches float32 or float16, `attention` the row kernel for that type."""
    n_taps = 0 if taps is None else taps.shape[1]
    rc = KERNEL.loaded.dspark_layers(
        table, len(table), x.shape[0], x.data_ptr(), torch.view_as_real(rope).data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        row_slot.data_ptr(), row_len.data_ptr(), attention, scale, _ptr(taps), _ptr(tap_layers), n_taps,
        _kv_half(k_cache, v_cache), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"decoder layers kernel returned {rc}")


class DraftLayerWeights(ctypes.Structure):
    """What `dspark_draft_layer` reads of one DSpark draft layer (C's `struct dspark_draft_layer_weights`):
    the four norms and four Q8_0 projections on 8-bit activations (q|k|v and gate|up fused by rows)."""

    _fields_ = [("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("qkv", _Q4W), ("o", _Q4W), ("gu", _Q4W), ("dn", _Q4W),
                ("K", ctypes.c_int64), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
                ("I", ctypes.c_int64)]

    @classmethod
    def of(cls, norms: tuple[Tensor, Tensor, Tensor, Tensor], eps: float, qkv, o, gate_up, down, heads: int,
           kv_heads: int, head_dim: int) -> "DraftLayerWeights":
        """norms: input, post-attention, query-head and key-head RMSNorm weights; qkv, o, gate_up, down:
        `transformer.Int8Linear`s with act8 and an optional float32 `bias` attribute."""
        ns = [t.detach().float().contiguous() for t in norms]
        w = cls(*(t.data_ptr() for t in ns), eps, q4w(qkv), q4w(o), q4w(gate_up), q4w(down),
                ns[0].shape[0], heads, kv_heads, head_dim, gate_up.out_features // 2)
        w.keep = (ns, qkv, o, gate_up, down)  # the memory the pointers point into stays alive
        return w


def draft_layer(x: Tensor, w: DraftLayerWeights, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                row_slot: Tensor, row_pos: Tensor, row_len: Tensor, attention: int, scale: float) -> None:
    """A DSpark draft layer in one call (`dspark_draft_layer`), in place on x [rows, K] float32 contiguous:
    row r's key and value written at position row_pos[r] of cache slot row_slot[r] (k_cache / v_cache:
    [slots, kv heads, positions, D] float32, D contiguous), attention over positions 0 .. row_len[r] - 1
    by the row kernel at address `attention`. cos, sin: [rows, D] float32 contiguous (sign-folded sin)."""
    rc = KERNEL.loaded.dspark_draft_layer(
        ctypes.addressof(w), x.shape[0], x.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), row_slot.data_ptr(),
        row_pos.data_ptr(), row_len.data_ptr(), attention, scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"draft layer kernel returned {rc} (width {w.K}, heads {w.H}/{w.Hkv} x {w.D})")


class DraftContextWeights(ctypes.Structure):
    """What `dspark_draft_context` reads of a DSpark drafter (C's `struct dspark_draft_context_weights`):
    the fc projection and hidden norm that make context features, and per draft layer its k|v projection
    (fused by rows) and key-head norm."""

    _fields_ = [("fc", _Q4W), ("hidden_norm", ctypes.c_void_p), ("eps", ctypes.c_float), ("K", ctypes.c_int64),
                ("F", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64), ("L", ctypes.c_int64),
                ("kv", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]

    @classmethod
    def of(cls, fc, hidden_norm: Tensor, eps: float, kv: list, k_norms: list[Tensor], kv_heads: int,
           head_dim: int) -> "DraftContextWeights":
        """fc and each of kv: `transformer.Int8Linear`s with act8 (or objects with the same fields), kv[l]
        the k|v rows of draft layer l; k_norms: each layer's key-head RMSNorm weight [D]."""
        hn = hidden_norm.detach().float().contiguous()
        kn = [t.detach().float().contiguous() for t in k_norms]
        kv_arr = (_Q4W * len(kv))(*(q4w(x) for x in kv))
        kn_arr = (ctypes.c_void_p * len(kn))(*(t.data_ptr() for t in kn))
        w = cls(q4w(fc), hn.data_ptr(), eps, fc.out_features, fc.codes.shape[1], kv_heads, head_dim, len(kv),
                ctypes.addressof(kv_arr), ctypes.addressof(kn_arr))
        w.keep = (fc, hn, kv, kn, kv_arr, kn_arr)  # the memory the pointers point into stays alive
        return w


def draft_context(w: DraftContextWeights, feats: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  row_slot: Tensor, row_pos: Tensor) -> None:
    """A DSpark drafter's context keys and values in one call (`dspark_draft_context`): for the M rows of
    feats [M, F] (the target's taps, concatenated; float32 contiguous) the features rmsnorm(fc(feats)),
    then every draft layer's keys and values of them written at position row_pos[r] of cache slot
    row_slot[r]. k_cache / v_cache: the whole caches [layers, slots, kv heads, positions, D] float32, D
    contiguous; cos, sin: [M, D] float32 contiguous (sign-folded sin)."""
    rc = KERNEL.loaded.dspark_draft_context(
        ctypes.addressof(w), feats.shape[0], feats.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        row_slot.data_ptr(), row_pos.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"draft context kernel returned {rc} (width {w.K}, features {w.F}, heads {w.Hkv} x {w.D})")
