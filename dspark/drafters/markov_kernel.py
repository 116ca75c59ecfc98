"""Greedy drafting with DSpark's Markov head in one C call (`markov_greedy.c`), for `DSparkDrafter`.

`draft_block` uses it when every row is greedy, the head is the vanilla Markov head, and the drafter
runs in float32 on the CPU; otherwise (sampling, other heads, GPUs) the torch loop runs. The kernel
computes the same quantities (U_k + W2 W1[x_{k-1}], argmax, draft ids to target ids, the confidence
logit before each draft) in float32 with its own summation order; drafts are proposals, so the output
distribution stays the target's whatever they are. `DSPARK_MARKOV_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from dspark.models.ckernel import CKernel

SOURCE = Path(__file__).with_name("markov_greedy.c")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"])


def reference(logits: Tensor, w1: Tensor, w2: Tensor, d2t: Tensor | None, anchor: Tensor, h: Tensor | None = None,
              cw: Tensor | None = None, cb: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """What the kernel computes, in float64 torch ops: (logits U + B, draft ids, target ids, confidence
    logits or None), drafting greedily left to right."""
    n, gamma, _ = logits.shape
    out = logits.double().clone()
    prev = anchor.clone()
    drafts, targets, confs = [], [], []
    for k in range(gamma):
        e = w1[prev].double()  # [n, r]
        if cw is not None:
            confs.append(torch.cat([h[:, k].double(), e], dim=-1) @ cw.double() + cb)
        out[:, k] += e @ w2.double().t()
        tok = out[:, k].argmax(-1)
        prev = tok if d2t is None else d2t[tok]
        drafts.append(tok)
        targets.append(prev)
    return out.float(), torch.stack(drafts, 1), torch.stack(targets, 1), \
        torch.stack(confs, 1).float() if confs else None


def _setup(lib: ctypes.CDLL) -> bool:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dspark_markov_greedy.argtypes = [i64, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                         i64, i64, i64, ptr, ctypes.c_float, ptr, i64]
    lib.dspark_markov_greedy.restype = ctypes.c_int
    g = torch.Generator().manual_seed(0)
    n, gamma, V, Vt, r, H = 2, 3, 37, 50, 16, 16
    logits = torch.randn(n, gamma, V, generator=g)
    w1, w2 = torch.randn(Vt, r, generator=g), torch.randn(V, r, generator=g)
    d2t = torch.randperm(Vt, generator=g)[:V].sort().values
    h, cw = torch.randn(n, gamma, H, generator=g), torch.randn(H + r, generator=g)
    anchor = torch.tensor([3, 49])
    want = reference(logits, w1, w2, d2t, anchor, h, cw, 0.5)
    got = _run(lib, logits.clone(), w1, w2, d2t, anchor, h, cw, 0.5)
    return torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and \
        torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[3], want[3], atol=1e-4)


KERNEL = CKernel(SOURCE, FLAG_SETS, _setup, env="DSPARK_MARKOV_KERNEL")


def available() -> bool:
    return KERNEL.available()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(lib, logits: Tensor, w1: Tensor, w2: Tensor, d2t: Tensor | None, anchor: Tensor, h: Tensor | None,
         cw: Tensor | None, cb: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    n, gamma, V = logits.shape
    Vt, r = w1.shape
    draft = torch.empty(n, gamma, dtype=torch.long)
    target = torch.empty(n, gamma, dtype=torch.long)
    conf = torch.empty(n, gamma) if cw is not None else None
    H = h.shape[-1] if cw is not None else 0
    rc = lib.dspark_markov_greedy(
        n, gamma, V, Vt, r, logits.data_ptr(), logits.stride(0), logits.stride(1), w1.data_ptr(), w2.data_ptr(),
        _ptr(d2t), anchor.data_ptr(), draft.data_ptr(), target.data_ptr(), _ptr(h) if cw is not None else None,
        h.stride(0) if cw is not None else 0, h.stride(1) if cw is not None else 0, H, _ptr(cw), cb, _ptr(conf),
        torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"greedy Markov drafting needs a rank that is a multiple of 8, got {r}")
    if rc != 0:
        raise ValueError(f"greedy Markov drafting: a token id outside the target vocabulary ({Vt})")
    return logits, draft, target, conf


def markov_greedy(logits: Tensor, w1: Tensor, w2: Tensor, d2t: Tensor | None, anchor: Tensor, h: Tensor | None = None,
                  cw: Tensor | None = None, cb: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Greedy drafting of a block: logits [n, gamma, V] float32 (U_k; a copy is returned with B_k added),
    w1 [Vt, r], w2 [V, r], d2t [V] long (draft id -> target id) or None, anchor [n] long target ids;
    with a confidence head, h [n, gamma, H] and its weight cw [H + r] and bias cb. Returns (U + B,
    draft ids [n, gamma], target ids [n, gamma], confidence logits [n, gamma] or None)."""
    lib = KERNEL.library()
    if lib is None:
        raise RuntimeError(f"the greedy Markov kernel is unavailable: {KERNEL.unavailable_reason()}")

    def f32(t: Tensor) -> Tensor:
        return t.detach().float().contiguous()
    logits = logits.detach().float().clone()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    hh = None if cw is None else h.detach().float()
    if hh is not None and hh.stride(-1) != 1:
        hh = hh.contiguous()
    return _run(lib, logits, f32(w1), f32(w2), None if d2t is None else d2t.detach().long().contiguous(),
                anchor.detach().long().contiguous(), hh, None if cw is None else f32(cw), float(cb))
