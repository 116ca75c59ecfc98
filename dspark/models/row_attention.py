"""Batch-invariant attention on CPU: a small C kernel (`row_attention.c`) that scores every query row
on its own, in a fixed order, against exactly its own keys.

Why: torch's `scaled_dot_product_attention` gives a token's output bits that depend on the call it is in
(how many query rows, the padded key length, the other sequences): last-bit differences, ~1e-7. With
float32 activations they stay ~1e-5 at the logits. With the int4 GEMM, activations are rounded to bf16
before every projection, and a last-bit difference that flips one rounding grows over 30 layers to
logit differences of 0.2-0.6: greedy speculative decoding (k tokens scored in one call) then no longer
reproduces plain decoding (one token a call), and replies depend on what else is batched. This kernel
computes each (row, head) from q, K[:L], V[:L] alone, so a token gets the same bits in a decode step, a
verification call of any length, any batch and any padding.

Used by `Transformer` for every sequence with at most `ROW_LIMIT` new tokens in a call (decoding,
verification, and prompt chunks up to the engine's default step budget of 512 tokens): a prompt then
gets the same bits however the engine chunks it, so a reply never depends on what else the server was
doing when the prompt arrived (with SDPA for chunks over 64 tokens, as before, a chunk split by a busy
step changed SmolLM2's logits by up to 0.6 and greedy replies with them). Longer chunks (a larger
`max_num_batched_tokens`) go through SDPA one sequence at a time on that sequence's exact keys:
independent of what they are batched with, not of how they are chunked. The kernel's cost grows with the
context like SDPA's, ~10-15% more for a 1,000-2,000-token prompt here, less for a short one (which then
runs in the one-call C layers).

The library is compiled at first use with the system C compiler (`$CC`, else `cc`) into the DSpark cache
directory, keyed by the source and the flags; without a compiler `available()` is False and SDPA is used.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dspark.models.ckernel import CKernel

SOURCE = Path(__file__).with_name("row_attention.c")
ROW_LIMIT = 512  # new tokens of one sequence in one call handled row by row; more: SDPA on that sequence
MAX_HEAD_DIM = 256  # MAX_D in row_attention.c
# -ffp-contract=off: the kernel says itself which multiply-adds are fused (row_attention.c's fma8)
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], ["-O3", "-march=native", "-ffp-contract=off"],
             ["-O3", "-ffp-contract=off"])


KV_DTYPES = (torch.float32, torch.float16)  # the key/value dtypes the kernel reads (q and out: float32)


def _setup(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.dspark_row_attention, lib.dspark_row_attention_f16):
        fn.argtypes = [i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64,
                       ctypes.c_float, i64]
        fn.restype = ctypes.c_int
    return _self_test(lib.dspark_row_attention) and _self_test(lib.dspark_row_attention_f16, torch.float16)


KERNEL = CKernel(SOURCE, FLAG_SETS, _setup, env="DSPARK_ROW_ATTENTION")


def _compile(out_dir: Path) -> ctypes.CDLL:
    return KERNEL.compile(out_dir)


def _library() -> ctypes.CDLL | None:
    return KERNEL.library()


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these heads (it returns -1 for any other shape)."""
    return 8 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0 and num_kv_heads >= 1 and \
        num_heads % num_kv_heads == 0


def available() -> bool:
    """Whether the kernel is built (compiling it now if need be) and passed its self-test."""
    return KERNEL.available()


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or has not been asked)."""
    return KERNEL.unavailable_reason()


def _call(fn, q: Tensor, k: Tensor, v: Tensor, rows: "RowPlan", out: Tensor, scale: float) -> None:
    # q: [rows_total, H, D] view (D contiguous); k, v: [slots, Hkv, len, D]; out like q.
    n_rows, H, D = rows.n, q.shape[1], q.shape[2]
    rc = fn(n_rows, H, k.shape[1], D, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
            k.stride(0), k.stride(1), k.stride(2), rows.row_q.data_ptr(), rows.row_slot.data_ptr(),
            rows.row_len.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1), scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"row attention kernel returned {rc} (H={H}, Hkv={k.shape[1]}, D={D})")


def _self_test(fn, kv_dtype: torch.dtype = torch.float32) -> bool:
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, L = 4, 2, 16, 21
    q = torch.randn(3, H, D, generator=g)
    k = torch.randn(2, Hkv, 32, D, generator=g).to(kv_dtype)
    v = torch.randn(2, Hkv, 32, D, generator=g).to(kv_dtype)
    rows = RowPlan.from_lists([0, 1, 2], [1, 0, 1], [L, 5, 1])
    out = torch.zeros_like(q)
    _call(fn, q, k, v, rows, out, D ** -0.5)
    k, v = k.float(), v.float()  # the reference on the same (rounded) keys and values
    for r, (slot, n) in enumerate([(1, L), (0, 5), (1, 1)]):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[r:r + 1, :, None], k[slot:slot + 1, :, :n], v[slot:slot + 1, :, :n], enable_gqa=True)[0, :, 0]
        if not torch.allclose(out[r], ref, atol=1e-5, rtol=1e-4):
            return False
    return True


@dataclass
class RowPlan:
    """The query rows of one forward call that the kernel scores: row index into the flattened
    [batch * k_max] new tokens, the cache slot, and how many keys it sees."""

    n: int
    row_q: Tensor  # [n] int64
    row_slot: Tensor  # [n] int64
    row_len: Tensor  # [n] int64

    @classmethod
    def from_lists(cls, row_q: list[int], row_slot: list[int], row_len: list[int]) -> "RowPlan":
        t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
        return cls(len(row_q), t(row_q), t(row_slot), t(row_len))


@dataclass
class AttentionPlan:
    """How one forward call's attention is computed: `rows` by the kernel, `long` sequences
    (index in the batch, slot, start, new tokens) by SDPA one at a time."""

    rows: RowPlan | None
    long: list[tuple[int, int, int, int]]
    padded: bool  # some output rows belong to no token (ragged batch): they are zeroed


def plan(slots: list[int], start: list[int], num_new: list[int], k_max: int) -> AttentionPlan:
    row_q, row_slot, row_len, long = [], [], [], []
    for b, (slot, s, n) in enumerate(zip(slots, start, num_new)):
        if n > ROW_LIMIT:
            long.append((b, slot, s, n))
            continue
        for j in range(n):
            row_q.append(b * k_max + j)
            row_slot.append(slot)
            row_len.append(s + j + 1)
    rows = RowPlan.from_lists(row_q, row_slot, row_len) if row_q else None
    return AttentionPlan(rows, long, any(n != k_max for n in num_new))


def _kernel(kv_dtype: torch.dtype):
    lib = KERNEL.loaded or _library()
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"row attention reads float32 or float16 keys and values, not {kv_dtype}")
    return lib.dspark_row_attention_f16 if kv_dtype == torch.float16 else lib.dspark_row_attention  # type: ignore[union-attr]


def kernel_address(kv_dtype: torch.dtype = torch.float32) -> int:
    """The address of `dspark_row_attention` (`_f16` for float16 keys and values), for C code that calls
    it (`int4_gemm.layer`)."""
    return ctypes.cast(_kernel(kv_dtype), ctypes.c_void_p).value  # type: ignore[return-value]


def attention(q: Tensor, k_layer: Tensor, v_layer: Tensor, p: AttentionPlan, scale: float) -> Tensor:
    """q: [batch, k_max, H, D] float32 with D contiguous and rows evenly strided; k_layer, v_layer:
    the cache's [max_seqs, Hkv, max_len, D] tensors for this layer (float32 or float16), new keys
    already written. Returns [batch, k_max, H * D] float32."""
    b, k_max, H, D = q.shape
    out = (torch.zeros if p.padded or p.long else torch.empty)(b, k_max, H, D, dtype=q.dtype)
    if p.rows is not None:
        # the library once loaded (a model planned with it keeps it; no environment lookup per layer)
        _call(_kernel(k_layer.dtype), q.view(b * k_max, H, D) if q.is_contiguous() else q.flatten(0, 1), k_layer,
              v_layer, p.rows, out.view(b * k_max, H, D), scale)
    for bi, slot, s, n in p.long:
        keys, values = k_layer[slot:slot + 1, :, :s + n], v_layer[slot:slot + 1, :, :s + n]
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a float16 cache: its (rounded) values, widened
        mask = None
        if s:
            mask = torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[bi:bi + 1, :n].transpose(1, 2).contiguous(), keys, values, attn_mask=mask, is_causal=not s,
            enable_gqa=H != keys.shape[1], scale=scale)  # [1, H, n, D]
        out[bi, :n] = o[0].transpose(0, 1)
    return out.view(b, k_max, H * D)
