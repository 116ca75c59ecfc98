"""Decoder-only transformer math shared by the Qwen3, Qwen2 and Llama families.

Math only: no file I/O, no tokenizer, no slot bookkeeping. The `KVCache` is a small object each
attention layer hands its new keys/values to and gets the full keys/values back from.

Symbols used in shape comments:
    batch  sequences in the call        k      new tokens per sequence (padded to the longest)
    H      query heads                  Hkv    key/value heads          D   head_dim
    hidden model width                  L      keys attended to (cached + new)
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dspark.kv_cache import CacheBatch, KVCache
from dspark.models import int4_gemm, row_attention
from dspark.models.config import ModelConfig


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in float32 and scaled in the input dtype (as transformers does).

    `weight` broadcasts against x's trailing dims (it is [heads, D] for the stacked q/k norms).
    """
    if x.dtype == torch.float32:
        # Same math in fewer kernels: decode steps are dominated by per-op overhead, and
        # vecdot(x, x) / n is the mean of squares.
        inv = torch.linalg.vecdot(x, x).unsqueeze(-1).mul_(1.0 / x.shape[-1]).add_(eps).rsqrt_()
        return x * inv * weight
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def interleave_rope_rows(w: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """Reorder the rows of a q or k projection (or a per-dim norm weight) from the half-split RoPE
    layout of Hugging Face checkpoints (pairs (i, i + D/2)) to the interleaved layout (pairs (2i, 2i+1))
    this module rotates with one complex multiply. Attention scores are unchanged because q and k are
    permuted alike. w: [num_heads * head_dim, ...] -> same shape.
    """
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # [D]
    return w.reshape(num_heads, head_dim, *w.shape[1:])[:, perm].reshape(w.shape)


# ---- CPU GEMM with fp16-packed weights --------------------------------------------------------------
#
# On CPUs, fp32 GEMMs with few rows (decoding, verifying a handful of draft tokens) are bound by
# reading the weights. fbgemm's fp16-weight GEMM (torch's `quantized::linear_dynamic_fp16`, the
# kernel behind dynamic fp16 quantization) reads half the bytes and accumulates in fp32. It is
# used only for weights that are *exactly* fp16 values (a bf16 checkpoint's weights are, except a few
# below fp16's normal range), so the math is the same fp32 math on the same weight values; the
# results differ from F.linear only by summation order (~1e-6). Inference only: the packed op has no
# autograd, so with grad enabled (a drafter training through the frozen LM head) F.linear runs.

FP16_MIN_NORMAL = 2.0 ** -14
FP16_MAX = 65504.0


def fp16_exact(w: Tensor, stored: torch.dtype | None = None) -> bool:
    """True when every entry of a float32 `w` is an fp16 value, except entries below fp16's normal
    range (whose rounding error is then at most 2^-25).

    `stored`: the dtype the checkpoint held `w` in, when known. float16 weights are exact by
    construction and bfloat16 ones whenever they are in fp16's range (one pass over `w` instead of
    four: loading a model is then seconds faster)."""
    if w.dtype != torch.float32:
        return False
    if stored == torch.float16:
        return True
    lo, hi = torch.aminmax(w)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))) or max(-float(lo), float(hi)) > FP16_MAX:
        return False
    if stored == torch.bfloat16:
        return True
    return bool(((w.half().float() == w) | (w.abs() < FP16_MIN_NORMAL)).all())


def fp16_gemm_available() -> bool:
    """Whether this torch build has the fp16-weight GEMM (x86 builds with fbgemm do)."""
    try:
        w = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 2), None)
        return bool(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 2), w).eq(2).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


PROBE_ROWS = 96  # row counts 1..PROBE_ROWS are checked by `RowPlan.probe`


class RowPlan:
    """How to call a GEMM kernel so that each row's result never depends on the call's row count.

    Greedy speculative decoding needs that: a token decoded alone and the same token verified with 7
    others must get the same logits, bit for bit. fbgemm's fp16-weight GEMM picks its kernel by the
    number of rows, and on some CPUs (seen on an AVX2 AMD EPYC) some counts accumulate in another
    order: there, 1, 2, 7, 14, 31, 32, 37, 38, ... rows give rows other last bits than a call of 96.
    `probe` finds, once per kernel and input width, which counts 1..PROBE_ROWS agree with a call of
    PROBE_ROWS rows; `__call__` then pads a call with zero rows up to the next agreeing count (and
    splits calls longer than the largest one), so every row gets the bits it gets in that reference.
    On CPUs where every count agrees nothing is padded (nor where none does: a kernel that disagrees
    with itself at the same row count is not deterministic, and padding cannot help)."""

    _cache: dict[tuple[str, int], "RowPlan"] = {}

    def __init__(self, good: list[int]) -> None:
        self.good = sorted(good)
        self.all_good = self.good == list(range(1, PROBE_ROWS + 1))
        self._good_set = set(self.good)

    @classmethod
    def probe(cls, kind: str, k: int, make: Callable[[Tensor], Callable[[Tensor], Tensor]]) -> "RowPlan":
        """`make(weight [64, k])` -> the kernel as a function of x; cached per (kind, k)."""
        key = (kind, k)
        if key not in cls._cache:
            g = torch.Generator().manual_seed(0)
            fn = make(torch.randn(64, k, generator=g) * 0.05)
            x = torch.randn(PROBE_ROWS, k, generator=g)
            with torch.no_grad():
                ref = fn(x)
                good = [m for m in range(1, PROBE_ROWS + 1) if torch.equal(fn(x[:m]), ref[:m])]
            cls._cache[key] = cls(good)
        return cls._cache[key]

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        # No agreeing count at all: the kernel disagrees with itself at PROBE_ROWS rows, which no
        # padding can fix.
        if self.all_good or not self.good or rows == 0 or rows in self._good_set:
            return fn(x)
        x2 = x.reshape(rows, x.shape[-1])
        parts, i, big = [], 0, self.good[-1]
        while i < rows:
            n = min(big, rows - i)
            m = self.good[bisect.bisect_left(self.good, n)]
            chunk = x2[i:i + n]
            if m > n:
                chunk = torch.cat([chunk, chunk.new_zeros(m - n, chunk.shape[1])])
            parts.append(fn(chunk)[:n])
            i += n
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinear:
    """A weight [out, in] (and bias) packed for the fp16-weight GEMM; calls follow `RowPlan`, so a
    row's result does not depend on how many rows share the call."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.packed = self._pack(weight, bias)
        self._fn = self._bound(self.packed)
        self.plan = RowPlan.probe("fp16", int(weight.shape[1]), lambda w: self._bound(self._pack(w, None)))

    @staticmethod
    def _pack(weight: Tensor, bias: Tensor | None):
        return torch.ops.quantized.linear_prepack_fp16(
            weight.detach().contiguous(), None if bias is None else bias.detach().float().contiguous())

    @staticmethod
    def _bound(packed) -> Callable[[Tensor], Tensor]:
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)

    def __call__(self, x: Tensor) -> Tensor:
        return self.plan(self._fn, x)


# ---- CPU GEMM with 4-bit weights -------------------------------------------------------------------
#
# A GGUF Q4_0 / Q4_1 matrix is 4-bit codes q with a scale and a zero per group of 32 weights:
# w = (q - 8) * scale + zero. Two kernels read those codes directly (a quarter of fp16's bytes: decoding
# is bound by reading weights):
#
# - "dspark" (`dspark.models.int4_gemm`, built at first use; x86-64 with AVX2 and FMA): the model is the
#   file's weights exactly, w = fl(d * q + m) in float32 (d = scale, m = zero - 8 * scale), with float32
#   activations and sums, so it is the model `--cpu-gemm fp16` runs, up to summation order.
#   With `act8` (`--cpu-gemm int4-a8`, the default on a Q4 file): the same weights times activations
#   quantized to 8 bits per group of 32 at every projection's input (dx = max|x| / 127, round half to
#   even), integer dot products per group, y = sum_g fl(d dx) * sum(q qx) + sum_g m * (dx sum qx):
#   llama.cpp's numerics for Q4_0/Q4_1/Q8_0 weights (`int4_gemm.reference_a8`).
# - "torch" (`aten._weight_int4pack_mm_for_cpu`, where the first does not build): bfloat16
#   activations, scales, zeros and outputs. The model: y = bf16(bf16(x) @ W^T) with
#   W = (q - 8) * bf16(scale) + bf16(zero).
#
# `Int4Linear.reference` computes either in plain torch ops. Both are row-independent: a row's bits do not
# depend on the other rows in the call (RowPlan checks it).
#
# Why the int4 GEMM needs the row attention kernel to be the default (cpu_gemm="auto"): with torch's
# kernel, rounding activations to bf16 turns the last-bit differences SDPA makes between attention over
# a whole prompt, over chunks, or one token at a time into whole bf16 steps, which grow over 30 layers.
# Measured on SmolLM2 with SDPA: logits of 8 tokens verified in one call and decoded one at a time differ
# by up to 0.18 (float32 / fp16-weight GEMM: 5e-5), and 3 of 8 greedy replies change between batch 1 and
# batch 8. `dspark.models.row_attention` computes every token's attention alone in a fixed order, so
# those differences are exactly 0 and the int4 model is lossless under speculation like any other.


def int4_available() -> bool:
    """Whether a CPU int4 weight GEMM is here (this project's kernel, or torch's)."""
    return int4_gemm.available() or _torch_int4_available()


def _torch_int4_available() -> bool:
    try:
        q = torch.zeros(16, 32, dtype=torch.int32)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.zeros(1, 16, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), w, 32, sz)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Int4Linear:
    """A 4-bit weight [out, in] (codes 0..15, per-group scale and zero) and an optional float32 bias."""

    GROUP = 32

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
                 kernel: str | None = None, act8: bool = False) -> None:
        self.kernel = kernel or ("dspark" if int4_gemm.available() else "torch")
        if act8 and self.kernel != "dspark":
            raise ValueError("8-bit activations (act8) need this project's int4 kernel (kernel='dspark')")
        self.act8 = act8
        self._pack(codes, scale, zero, bias)
        name = f"int4-{self.kernel}" + ("-a8" if act8 else "")
        self.plan = RowPlan.probe(name, codes.shape[1], lambda w: Int4Linear._probe_kernel(w, self.kernel, act8))

    def _pack(self, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None) -> None:
        # codes: [N, K] uint8; scale, zero: [N, K / GROUP] float32
        n, k = codes.shape
        if k % self.GROUP or scale.shape != (n, k // self.GROUP) or zero.shape != scale.shape:
            raise ValueError(f"int4 weight of shape {tuple(codes.shape)} needs scale/zero [N, K/{self.GROUP}]")
        self.sc4 = None  # the 8-bit-activation kernel's scales (act8 only)
        self.il = None  # (codes, scales) in the VNNI kernels' layout (act8 on a VNNI CPU only)
        if self.kernel == "dspark":
            self.packed = int4_gemm.pack_codes(codes)
            self.d = scale.float().contiguous()
            self.m = (zero.float() - 8 * self.d).contiguous()  # d * q + m == d * (q - 8) + zero
            if self.act8:  # the 8-bit-activation kernel reads scales and offsets by block of 4 outputs
                self.sc4 = int4_gemm.scales4(self.d, self.m)
                self.il = int4_gemm.vnni_layout(self.packed, self.d, self.m)
        elif self.kernel == "torch":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        else:
            raise ValueError(f"int4 kernel must be 'dspark' or 'torch', got {self.kernel!r}")
        self.bias = None if bias is None else bias.detach().float()
        self.out_features = n

    @staticmethod
    def _probe_kernel(w: Tensor, kernel: str, act8: bool = False) -> Callable[[Tensor], Tensor]:
        # For RowPlan: the kernel on random codes, scales and zeros of w's shape, called directly
        # (an Int4Linear built without a plan: building one with a plan would probe again).
        g = torch.Generator().manual_seed(1)
        n, k = w.shape
        lin = Int4Linear.__new__(Int4Linear)
        lin.kernel = kernel
        lin.act8 = act8
        lin._pack(torch.randint(0, 16, (n, k), generator=g), torch.rand(n, k // Int4Linear.GROUP, generator=g) * 0.01,
                  torch.randn(n, k // Int4Linear.GROUP, generator=g) * 0.01, None)
        return lin._call

    def dequantized(self, codes: Tensor) -> Tensor:
        """W as this kernel sees it (float32 [N, K]): the model's weight values."""
        if self.kernel == "dspark":
            return int4_gemm.weights(codes, self.d, self.m)
        s, z = self.scales_zeros[..., 0].float().t(), self.scales_zeros[..., 1].float().t()  # [N, K/G]
        n, k = codes.shape
        groups = codes.view(n, k // self.GROUP, self.GROUP).float().sub_(8)
        return groups.mul_(s.unsqueeze(-1)).add_(z.unsqueeze(-1)).view(n, k)

    def reference(self, x: Tensor, weight: Tensor) -> Tensor:
        """What this layer computes, in plain ops, given its dequantized float32 `weight` (with `act8`:
        the same weights, read from its codes, times the 8-bit activations)."""
        if self.kernel == "dspark" and self.act8:
            # the same weights (its codes, scales and offsets) times 8-bit activations
            y = int4_gemm.reference_a8(x.reshape(-1, x.shape[-1]), int4_gemm.unpack_codes(self.packed), self.d, self.m)
            y = y.view(*x.shape[:-1], -1)
        elif self.kernel == "dspark":
            y = x.float() @ weight.t()
        else:
            y = (x.to(torch.bfloat16).float() @ weight.t()).to(torch.bfloat16).float()
        return y if self.bias is None else y + self.bias

    def __call__(self, x: Tensor) -> Tensor:
        return self.plan(self._call, x)

    def _call(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.il is not None:
            y = int4_gemm.mm_il(x2, *self.il, self.out_features, q8=False)
        elif self.kernel == "dspark" and self.act8:
            y = int4_gemm.mm_a8(x2, self.packed, self.sc4, self.out_features)
        elif self.kernel == "dspark":
            y = int4_gemm.mm(x2, self.packed, self.d, self.m)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16), self.packed, self.GROUP, self.scales_zeros).float()
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear:
    """A GGUF Q8_0 weight [out, in] (int8 codes, a float32 scale per group of 32) on `int4_gemm.mm8`: the
    file's weights exactly (d * q), float32 activations and sums; with `act8` on `int4_gemm.mm8_a8`
    (8-bit activations, as `Int4Linear`'s). Used for the LM head of Q4 files."""

    GROUP = 32

    def __init__(self, codes: Tensor, scale: Tensor, act8: bool = False) -> None:
        n, k = codes.shape
        if k % self.GROUP or scale.shape != (n, k // self.GROUP):
            raise ValueError(f"int8 weight of shape {tuple(codes.shape)} needs scale [N, K/{self.GROUP}]")
        self._pack(codes, scale, act8)
        self.plan = RowPlan.probe("int8-dspark" + ("-a8" if act8 else ""), k,
                                  lambda w: Int8Linear._probe_kernel(w, act8))

    def _pack(self, codes: Tensor, scale: Tensor, act8: bool) -> None:
        self.codes = codes.to(torch.int8).contiguous()
        self.d = scale.float().contiguous()
        self.out_features = codes.shape[0]
        self.act8 = act8
        self.sc4 = int4_gemm.scales4(self.d, None) if act8 else None
        # (codes, scales) in the VNNI kernels' layout: the same bits, faster (act8 on a VNNI CPU only)
        self.il = int4_gemm.vnni_layout(self.codes, self.d) if act8 else None

    @staticmethod
    def _probe_kernel(w: Tensor, act8: bool = False) -> Callable[[Tensor], Tensor]:
        # For RowPlan: the kernel on random codes and scales of w's shape, called directly (an
        # Int8Linear built without a plan: building one with a plan would probe again).
        g = torch.Generator().manual_seed(1)
        n, k = w.shape
        lin = Int8Linear.__new__(Int8Linear)
        lin._pack(torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8),
                  torch.rand(n, k // Int8Linear.GROUP, generator=g) * 0.01, act8)
        return lin._call

    def dequantized(self) -> Tensor:
        """The model's float32 weights [N, K]."""
        return int4_gemm.weights8(self.codes, self.d)

    def rows(self, ids: Tensor) -> "Int8Linear":
        """The same weights restricted to output rows `ids` (a drafter's reduced vocabulary)."""
        return Int8Linear(self.codes[ids], self.d[ids], act8=self.act8)

    def __call__(self, x: Tensor) -> Tensor:
        return self.plan(self._call, x)

    def _call(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.il is not None:
            y = int4_gemm.mm_il(x2, *self.il, self.out_features, q8=True)
        else:
            y = int4_gemm.mm8_a8(x2, self.codes, self.sc4) if self.act8 else int4_gemm.mm8(x2, self.codes, self.d)
        return y.view(*x.shape[:-1], self.out_features)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedLinear | None) -> Tensor:
    """F.linear, or the packed fp16-weight GEMM when there is one and no gradient is wanted."""
    if packed is not None and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
        return packed(x)
    return F.linear(x, weight, bias)


def _linear_params(in_f: int, out_f: int, bias: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
    # Uninitialised on purpose: every parameter is overwritten by the checkpoint loader.
    w = nn.Parameter(torch.empty(out_f, in_f), requires_grad=False)
    b = nn.Parameter(torch.empty(out_f), requires_grad=False) if bias else None
    return w, b


class Attention(nn.Module):
    """Grouped-query attention with q/k/v fused into one projection (`qkv_weight` rows: q, k, v).

    The q and k rows are stored in interleaved RoPE order (see `interleave_rope_rows`), so RoPE is a
    single complex multiply on q and k together.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.H, self.Hkv, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        qkv_out = (self.H + 2 * self.Hkv) * self.D
        self.qkv_weight, self.qkv_bias = _linear_params(cfg.hidden_size, qkv_out, cfg.qkv_bias)
        self.o_weight, self.o_bias = _linear_params(self.H * self.D, cfg.hidden_size, cfg.o_bias)
        # Qwen3 q_norm / k_norm weights stacked per head ([H + Hkv, D]) so q and k are normed in one op.
        self.qk_norm = (
            nn.Parameter(torch.empty(self.H + self.Hkv, self.D), requires_grad=False) if cfg.qk_norm else None
        )
        self.packed: dict[str, PackedLinear] = {}  # "qkv", "o" when packed (see pack_fp16_weights)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache, batch: CacheBatch) -> Tensor:
        # x: [batch, k, hidden]; rope: [batch, k, 1, D/2] complex64 (cos + i sin at each position)
        b, k, _ = x.shape
        dtype = x.dtype
        qkv = linear(x, self.qkv_weight, self.qkv_bias, self.packed.get("qkv")).view(b, k, self.H + 2 * self.Hkv, self.D)
        qk, v = qkv.split([self.H + self.Hkv, self.Hkv], dim=2)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, self.eps)
        # RoPE in float32, as transformers computes cos/sin (a no-op cast for float32 models).
        qk_c = torch.view_as_complex(qk.float().reshape(b, k, self.H + self.Hkv, self.D // 2, 2))
        qk = torch.view_as_real(qk_c * rope).reshape(b, k, self.H + self.Hkv, self.D).to(dtype)
        q, k_new = qk.split([self.H, self.Hkv], dim=2)
        return linear(self.attend(q, k_new, v, cache, batch), self.o_weight, self.o_bias, self.packed.get("o"))

    def attend(self, q: Tensor, k_new: Tensor, v: Tensor, cache: KVCache, batch: CacheBatch) -> Tensor:
        """Write the new keys/values and attend: q [batch, k, H, D] (after RoPE), k_new / v
        [batch, k, Hkv, D] -> [batch, k, H * D] (before the output projection)."""
        b, k = q.shape[:2]
        if batch.attention_plan is not None:  # batch-invariant: each row alone (see row_attention)
            k_layer, v_layer = cache.write(self.layer, batch, k_new, v)
            return row_attention.attention(q, k_layer, v_layer, batch.attention_plan, self.D ** -0.5)
        keys, values = cache.update(self.layer, batch, k_new, v)  # [batch, Hkv, L, D]
        if keys.dtype != q.dtype:  # a KV cache kept in another dtype (float16 of a float32 model)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).contiguous(),  # [batch, H, k, D]; the CPU kernel is ~2x slower on a strided q
            keys,
            values,
            attn_mask=batch.attn_mask,
            is_causal=batch.is_causal and k > 1,
            enable_gqa=self.H != self.Hkv,
        )  # [batch, H, k, D]
        return out.transpose(1, 2).reshape(b, k, self.H * self.D)


class MLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one projection (`gate_up_weight` rows: gate, up)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_weight, self.gate_up_bias = _linear_params(cfg.hidden_size, 2 * self.inter, cfg.mlp_bias)
        self.down_weight, self.down_bias = _linear_params(self.inter, cfg.hidden_size, cfg.mlp_bias)
        self.packed: dict[str, PackedLinear] = {}  # "gate_up", "down" when packed

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(x, self.gate_up_weight, self.gate_up_bias, self.packed.get("gate_up")).split(self.inter, dim=-1)
        return linear(F.silu(gate) * up, self.down_weight, self.down_bias, self.packed.get("down"))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.post_attn_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        # Run on the fused C layer parts (int4_gemm.layer_in / layer_out) when every projection is on
        # this project's Q4 kernel (set by Transformer.update_fused_layers).
        self.fused = False
        # The same parts and the attention between them in one C call (int4_gemm.layer) where the call's
        # attention is all on the row kernel: its weights described once (set with `fused`).
        self.whole: int4_gemm.LayerWeights | None = None
        # the addresses of the row attention kernels the one call uses, by the KV cache's dtype
        self.row_kernel: dict[torch.dtype, int] = {}

    def fusable(self) -> bool:
        """Whether the fused layer parts can run this layer: all four projections on this project's Q4
        kernel, no q/k norm, widths the kernel takes."""
        a, m = self.attn, self.mlp
        packs = [a.packed.get("qkv"), a.packed.get("o"), m.packed.get("gate_up"), m.packed.get("down")]
        return a.qk_norm is None and a.D % 8 == 0 and \
            all(isinstance(p, Int4Linear) and p.kernel == "dspark" for p in packs) and int4_gemm.KERNEL.loaded is not None

    def whole_layer_weights(self) -> "int4_gemm.LayerWeights":
        a, m = self.attn, self.mlp
        return int4_gemm.LayerWeights.of(self.input_norm, self.post_attn_norm, self.eps,
                                         a.packed["qkv"], a.packed["o"], m.packed["gate_up"], m.packed["down"],
                                         a.H, a.Hkv, a.D)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache, batch: CacheBatch) -> Tensor:
        if self.fused and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return self.forward_fused(x, rope, cache, batch)
        x = x + self.attn(rms_norm(x, self.input_norm, self.eps), rope, cache, batch)
        return x + self.mlp(rms_norm(x, self.post_attn_norm, self.eps))

    def forward_fused(self, x: Tensor, rope: Tensor, cache: KVCache, batch: CacheBatch) -> Tensor:
        """The same layer in three calls: the C part before attention (norm, QKV, RoPE), attention, the C
        part after it (output projection, residual, norm, gate/up, SiLU, down, residual)."""
        a, m = self.attn, self.mlp
        b, k, hid = x.shape
        rows = b * k
        # A contiguous copy: the input of the part before attention, then the output the part after it
        # writes in place (x itself may be a kept hidden-state tap).
        y = x.reshape(rows, hid).clone(memory_format=torch.contiguous_format)
        plan = batch.attention_plan
        if self.whole is not None and plan is not None and plan.rows is not None and plan.rows.n == rows \
                and not plan.long and not plan.padded:
            # Every row on the row kernel, in order (no padding): the whole layer in one call.
            k_layer, v_layer = cache.layer_tensors(a.layer)
            int4_gemm.layer(y, self.whole, rope.reshape(rows, a.D // 2), k_layer, v_layer, plan.rows.row_slot,
                            plan.rows.row_len, self.row_kernel[k_layer.dtype], a.D ** -0.5)
            return y.view(b, k, hid)
        qkv = int4_gemm.layer_in(y, self.input_norm, self.eps, a.packed["qkv"],
                                 rope.reshape(rows, a.D // 2), a.H + a.Hkv, a.D).view(b, k, a.H + 2 * a.Hkv, a.D)
        q, k_new, v = qkv.split([a.H, a.Hkv, a.Hkv], dim=2)
        out = a.attend(q, k_new, v, cache, batch).reshape(rows, a.H * a.D).contiguous()
        int4_gemm.layer_out(y, out, a.packed["o"], self.post_attn_norm, self.eps, m.packed["gate_up"],
                            m.packed["down"])
        return y.view(b, k, hid)


class Transformer(nn.Module):
    """Embedding -> decoder layers -> (final norm and LM head applied separately by the caller).

    Hidden-state tap ids: -1 is the embedding output; i in [0, num_layers) is the output of decoder
    layer i *before* the final norm. This matches transformers' `output_hidden_states[i + 1]` for every
    layer but the last, whose transformers entry has the final norm applied (transformers 5.x replaces
    it with `last_hidden_state`); apply `final_norm` to tap num_layers-1 to get that one.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm_weight = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        # Tied checkpoints share the embedding tensor (set by the loader), so no copy is made.
        self.lm_head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.register_buffer("rope_table", torch.empty(0, dtype=torch.complex64), persistent=False)
        self.packed_lm_head: PackedLinear | None = None
        self.layer_table = None  # every layer in one C call (set by update_fused_layers where it can)
        # Attention row by row with the batch-invariant kernel (set by the loader, see use_row_attention).
        self.row_attention = False

    def use_row_attention(self, mode: str = "auto") -> bool:
        """"auto": compute attention with `row_attention` (batch-invariant) when this is a float32 CPU
        model whose heads the kernel takes and the kernel builds; "sdpa": torch's SDPA. Returns whether
        it is on."""
        if mode not in ("auto", "sdpa"):
            raise ValueError(f"attention must be 'auto' or 'sdpa', got {mode!r}")
        c = self.cfg
        self.row_attention = mode == "auto" and self.embed_weight.device.type == "cpu" and \
            self.embed_weight.dtype == torch.float32 and \
            row_attention.supports(c.num_heads, c.num_kv_heads, c.head_dim) and row_attention.available()
        return self.row_attention

    def pack_int4_weights(self, quant: dict[str, Tensor], act8: bool = False) -> int:
        """Run every fused projection whose parts all have 4-bit codes in `quant` (HF names + ".q4",
        ".q4_scale", ".q4_zero", as `dspark.models.gguf` writes them) on the int4 GEMM, and set its
        float32 weight to the values that kernel uses (so the F.linear path is the same model).
        Call before pack_fp16_weights (which then packs only the rest). Returns the number packed."""
        if self.embed_weight.device.type != "cpu" or self.embed_weight.dtype != torch.float32 or \
                not quant or not int4_available():
            return 0
        c = self.cfg
        n = 0
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a, m = layer.attn, layer.mlp
            parts = {
                ("attn", "qkv"): [(p + "self_attn.q_proj.weight", c.num_heads),
                                  (p + "self_attn.k_proj.weight", c.num_kv_heads), (p + "self_attn.v_proj.weight", 0)],
                ("attn", "o"): [(p + "self_attn.o_proj.weight", 0)],
                ("mlp", "gate_up"): [(p + "mlp.gate_proj.weight", 0), (p + "mlp.up_proj.weight", 0)],
                ("mlp", "down"): [(p + "mlp.down_proj.weight", 0)],
            }
            for (mod_name, key), names in parts.items():
                if not all(name + ".q4" in quant for name, _ in names):
                    continue
                mod = a if mod_name == "attn" else m

                def rows(t: Tensor, heads: int) -> Tensor:
                    # q and k rows go to the interleaved RoPE order, as the loader does for the weights.
                    return interleave_rope_rows(t, heads, c.head_dim) if heads else t

                codes = torch.cat([rows(quant[nm + ".q4"], h) for nm, h in names])
                scale = torch.cat([rows(quant[nm + ".q4_scale"], h) for nm, h in names])
                zero = torch.cat([rows(quant[nm + ".q4_zero"], h) for nm, h in names])
                weight, bias = {"qkv": (a.qkv_weight, a.qkv_bias), "o": (a.o_weight, a.o_bias),
                                "gate_up": (m.gate_up_weight, m.gate_up_bias),
                                "down": (m.down_weight, m.down_bias)}[key]
                if tuple(codes.shape) != tuple(weight.shape):
                    raise ValueError(f"int4 codes for layer {i} {key} have shape {tuple(codes.shape)}, "
                                     f"the weight {tuple(weight.shape)}")
                packed = Int4Linear(codes, scale, zero, bias, act8=act8 and int4_gemm.available())
                weight.data = packed.dequantized(codes)
                mod.packed[key] = packed
                n += 1
        self.int4_packed = n
        self.update_fused_layers()
        return n

    def update_fused_layers(self, enable: bool | None = None) -> int:
        """Run each layer that can (`DecoderLayer.fusable`) on the fused C layer parts; `enable=False`
        turns them off (the per-op path: the same model up to float rounding), None keeps the current
        choice (on unless turned off, or `DSPARK_FUSED_LAYERS=0`). Returns the number of fused layers."""
        if enable is not None:
            self.fused_layers_enabled = enable
        on = getattr(self, "fused_layers_enabled", os.environ.get("DSPARK_FUSED_LAYERS", "1") != "0")
        whole = bool(on) and os.environ.get("DSPARK_WHOLE_LAYER", "1") != "0" and row_attention.available()
        row_kernel = {dt: row_attention.kernel_address(dt) for dt in row_attention.KV_DTYPES} if whole else {}
        for layer in self.layers:
            layer.fused = bool(on) and layer.fusable()
            layer.whole = layer.whole_layer_weights() if layer.fused and whole else None
            layer.row_kernel = row_kernel if layer.whole is not None else {}
        # Every layer whole: a step's layers in one C call (int4_gemm.layers) where its attention is all rows.
        one = all(layer.whole is not None for layer in self.layers) and os.environ.get("DSPARK_ONE_CALL", "1") != "0"
        self.layer_table = int4_gemm.layer_table([layer.whole for layer in self.layers]) if one else None
        return self.num_fused_layers

    @property
    def num_fused_layers(self) -> int:
        """How many layers run on the fused C layer parts."""
        return sum(layer.fused for layer in self.layers)

    @property
    def num_whole_layers(self) -> int:
        """How many of them run as one C call where a forward's attention is all on the row kernel."""
        return sum(layer.whole is not None for layer in self.layers)

    def pack_int8_lm_head(self, quant: dict[str, Tensor], act8: bool = False) -> bool:
        """Run the LM head on the int8 GEMM when the checkpoint stores it (or the tied embedding) in
        Q8_0 (`quant` keys + ".q8", ".q8_scale"), and set its float32 weight (and the tied embedding's)
        to the file's values. Returns whether it did."""
        if self.embed_weight.device.type != "cpu" or self.embed_weight.dtype != torch.float32 or \
                not int4_gemm.available():
            return False
        name = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        if name + ".q8" not in quant:
            return False
        head = Int8Linear(quant[name + ".q8"], quant[name + ".q8_scale"], act8=act8)
        if tuple(head.codes.shape) != tuple(self.lm_head_weight.shape):
            raise ValueError(f"int8 codes for the LM head have shape {tuple(head.codes.shape)}, "
                             f"the weight {tuple(self.lm_head_weight.shape)}")
        self.lm_head_weight.data = head.dequantized()  # the tied embedding shares this Parameter
        self.packed_lm_head = head
        return True

    def pack_fp16_weights(self, mode: str = "auto", stored: torch.dtype | None = None) -> bool:
        """Use the fp16-weight GEMM for every projection not already on the int4 GEMM, and the LM head
        ("auto": when this is a float32 CPU model, fbgemm is available and every such weight is
        fp16-exact; "off": never, and int4 projections go back to F.linear too).
        Returns whether the weights are now packed."""
        if mode not in ("auto", "off"):
            raise ValueError(f"cpu_gemm must be 'auto' or 'off', got {mode!r}")
        for layer in self.layers:
            for packed in (layer.attn.packed, layer.mlp.packed):
                for key in [k for k, v in packed.items() if mode == "off" or not isinstance(v, Int4Linear)]:
                    del packed[key]
        if mode == "off":
            self.int4_packed = 0
        quantized_head = isinstance(self.packed_lm_head, Int8Linear)
        if mode == "off" or not quantized_head:
            self.packed_lm_head = None
        self.update_fused_layers()
        if mode == "off" or self.embed_weight.device.type != "cpu" or not fp16_gemm_available():
            return False
        todo = []  # (packed dict, key, weight, bias) of every projection without an int4 packing
        for layer in self.layers:
            a, m = layer.attn, layer.mlp
            for packed, key, w, b in ((a.packed, "qkv", a.qkv_weight, a.qkv_bias), (a.packed, "o", a.o_weight, a.o_bias),
                                      (m.packed, "gate_up", m.gate_up_weight, m.gate_up_bias),
                                      (m.packed, "down", m.down_weight, m.down_bias)):
                if key not in packed:
                    todo.append((packed, key, w, b))
        if not (quantized_head or fp16_exact(self.lm_head_weight.data, stored)) or \
                not all(fp16_exact(w.data, stored) for _, _, w, _ in todo):
            return False
        for packed, key, w, b in todo:
            packed[key] = PackedLinear(w, b)
        if not quantized_head:
            self.packed_lm_head = PackedLinear(self.lm_head_weight, None)
        return bool(todo) or not quantized_head

    def build_rope(self, num_positions: int) -> None:
        """Precompute RoPE rotations `[num_positions, D/2]` complex64 (float32, as transformers computes them)."""
        inv_freq = self.cfg.rope_inv_freq().to(self.embed_weight.device)  # [D/2]
        pos = torch.arange(num_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = pos[:, None] * inv_freq[None, :]  # [num_positions, D/2]
        self.rope_table = torch.polar(torch.ones_like(freqs), freqs)

    @property
    def rope_len(self) -> int:
        return self.rope_table.shape[0]

    def embed(self, ids: Tensor) -> Tensor:
        # ids: [...] long -> [..., hidden]
        return F.embedding(ids, self.embed_weight)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return rms_norm(hidden, self.norm_weight, self.cfg.rms_norm_eps)

    def _forward_one_call(self, x: Tensor, rope: Tensor, cache: KVCache, rows: "row_attention.RowPlan",
                          hidden_layer_ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """`forward` with every layer in one C call (`int4_gemm.layers`): the same layer calls in the
        same order (so the same bits), none of the Python between them."""
        b, k, hid = x.shape
        n = b * k
        y = x.reshape(n, hid)  # the embedding's fresh output, updated in place
        a = self.layers[0].attn
        taps = tap_layers = None
        if hidden_layer_ids:
            taps = torch.empty(n, len(hidden_layer_ids), hid, dtype=torch.float32)
            tap_layers = torch.tensor(list(hidden_layer_ids), dtype=torch.int64)
        int4_gemm.layers(y, self.layer_table, rope.reshape(n, a.D // 2), cache.k, cache.v, rows.row_slot,
                         rows.row_len, self.layers[0].row_kernel[cache.k.dtype], a.D ** -0.5, taps, tap_layers)
        return y.view(b, k, hid), None if taps is None else taps.view(b, k, len(hidden_layer_ids), hid)

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Logits in the model dtype; no final norm (see `final_norm`)."""
        return linear(hidden, self.lm_head_weight, None, self.packed_lm_head)

    def forward(
        self,
        ids: Tensor,
        cache: KVCache,
        batch: CacheBatch,
        hidden_layer_ids: Sequence[int] = (),
    ) -> tuple[Tensor, Tensor | None]:
        """Run the decoder over new tokens, appending their keys/values to the cache.

        ids: [batch, k] long. Returns (last hidden state before the final norm [batch, k, hidden],
        taps [batch, k, len(hidden_layer_ids), hidden] or None).
        """
        if self.row_attention and cache.dtype in row_attention.KV_DTYPES and cache.device.type == "cpu":
            batch.attention_plan = row_attention.plan(batch.slots, batch.start, batch.num_new, batch.k_max)
        rope = self.rope_table[batch.positions].unsqueeze(2)  # [batch, k, 1, D/2]
        x = self.embed(ids)  # [batch, k, hidden]
        plan = batch.attention_plan
        if self.layer_table is not None and x.dtype == torch.float32 and not torch.is_grad_enabled() and \
                plan is not None and plan.rows is not None and plan.rows.n == x.shape[0] * x.shape[1] and \
                not plan.long and not plan.padded and -1 not in hidden_layer_ids:
            return self._forward_one_call(x, rope, cache, plan.rows, hidden_layer_ids)
        want = set(hidden_layer_ids)
        got: dict[int, Tensor] = {}
        if -1 in want:
            got[-1] = x
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, batch)
            if i in want:
                got[i] = x
        stacked = torch.stack([got[i] for i in hidden_layer_ids], dim=2) if hidden_layer_ids else None
        return x, stacked
