"""Preallocated per-sequence KV cache with rollback.

Each sequence owns a *slot*: a fixed row of a preallocated tensor. A forward call appends k tokens to
each of a batch of slots (k may differ per slot); speculative decoding then rolls rejected draft
tokens back with `truncate`, which only moves the slot's length — the stale keys past it are never
attended to and are overwritten by the next append.

Usage:
    cache = KVCache(num_layers=28, max_seqs=8, max_len=4096, num_kv_heads=8, head_dim=128,
                    dtype=torch.bfloat16, device="cuda")
    slot = cache.allocate()
    batch = cache.prepare([slot], [len(prompt)])   # once per forward call, shared by every layer
    k_all, v_all = cache.update(layer, batch, k_new, v_new)   # inside each attention layer
    cache.commit(batch)                               # after the forward succeeded
    cache.truncate(slot, cache.length(slot) - rejected)
    cache.free(slot)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dspark.errors import CacheError, CacheFullError, ContextOverflowError


@dataclass
class CacheBatch:
    """Where one forward call's new tokens go; computed once per call and shared by all layers.

    Symbols: batch = number of slots in the call, k_max = largest number of new tokens of any slot,
    kv_len = keys the call attends to = max over slots of (old length + new tokens).

    The index tensors (`positions`, `valid`, `write_slot`, `write_pos`, `slot_index`, `attn_mask`) are
    built from the lists on first read and kept: the C layers and the drafters' C kernels read only
    `start`, so a decoding round does not pay a dozen small tensor builds it never uses.
    """

    slots: list[int]
    num_new: list[int]
    start: list[int]  # each slot's length before the call = RoPE position of its first new token
    k_max: int
    kv_len: int
    slot_range: tuple[int, int] | None  # (lo, hi) when slots == range(lo, hi): read by slicing, no gather
    write_range: tuple[int, int] | None  # (start, end) when slot_range is set, all starts are equal and
    # no row is padding: the new tokens form one rectangular block, written by a plain slice copy
    is_causal: bool  # no mask needed: plain causal (all slots empty before) or, if False, attend to all
    attention_plan: object = None  # set by a model that computes attention row by row (row_attention)
    masked: bool = False  # attention needs `attn_mask` (neither one query a slot at equal starts nor causal)
    limit: int = 0  # the largest RoPE position a padding row is clamped to
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _lazy: dict = field(default_factory=dict, repr=False)

    def _get(self, name: str, build: Callable[[], Tensor | None]) -> Tensor | None:
        if name not in self._lazy:
            self._lazy[name] = build()
        return self._lazy[name]

    @property
    def positions(self) -> Tensor:
        """[batch, k_max] long; padding rows clamped to a valid table index."""
        return self._get("positions", lambda: torch.tensor(
            [[min(s + j, self.limit) for j in range(self.k_max)] for s in self.start], dtype=torch.long,
            device=self.device))  # type: ignore[return-value]

    @property
    def valid(self) -> Tensor | None:
        """[batch, k_max] bool, True = real token; None when no row is padding."""
        return self._get("valid", lambda: torch.tensor(
            [[j < n for j in range(self.k_max)] for n in self.num_new], device=self.device)
            if any(n != self.k_max for n in self.num_new) else None)

    @property
    def write_slot(self) -> Tensor | None:
        """[n_valid] long; slot of each real new token (None if write_range is set)."""
        return self._get("write_slot", lambda: None if self.write_range is not None else torch.tensor(
            [sl for sl, n in zip(self.slots, self.num_new) for _ in range(n)], device=self.device))

    @property
    def write_pos(self) -> Tensor | None:
        """[n_valid] long; cache position of each real new token (None if write_range is set)."""
        return self._get("write_pos", lambda: None if self.write_range is not None else torch.tensor(
            [s + j for s, n in zip(self.start, self.num_new) for j in range(n)], device=self.device))

    @property
    def slot_index(self) -> Tensor | None:
        """[batch] long; None when slot_range is set."""
        return self._get("slot_index", lambda: None if self.slot_range is not None else torch.tensor(
            self.slots, dtype=torch.long, device=self.device))

    @property
    def attn_mask(self) -> Tensor | None:
        """[batch, 1, k_max, kv_len] bool, True = may attend (a new token at offset j of a slot with
        `s` cached tokens sees cache positions <= s + j); None = see is_causal."""
        def build() -> Tensor | None:
            if not self.masked:
                return None
            key_pos = torch.arange(self.kv_len, dtype=torch.long, device=self.device)
            return (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]
        return self._get("attn_mask", build)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, but on CPU from a private anonymous mapping: the OS hands out zeroed 4 KiB pages
    only when they are first written, so a cache sized for the whole context costs nothing until it is
    used. (torch.zeros writes every page up front, seconds for a few GB; numpy's calloc'd arrays ask
    for 2 MiB huge pages, each zeroed whole on first touch, which costs the same once every slot runs.)"""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import math
    import mmap

    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = max(1, math.prod(shape) * itemsize)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no anonymous private mappings here (non-POSIX)
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps `buf` alive


class KVCache:
    """Key/value tensors of shape `[num_layers, max_seqs, num_kv_heads, max_len, head_dim]`.

    Heads come before positions so that a slot's keys are already in the `[heads, len, dim]` layout
    `scaled_dot_product_attention` reads, and a contiguous run of slots is a view, not a copy.
    """

    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if max_seqs < 1 or max_len < 1:
            raise CacheError(f"KVCache needs max_seqs >= 1 and max_len >= 1, got {max_seqs}, {max_len}")
        self.num_layers = num_layers
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, max_seqs, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: padded query rows may read never-written positions, and those must be finite.
        self.k = _zeros(shape, dtype, self.device)
        self.v = _zeros(shape, dtype, self.device)
        # Per-layer views, taken once: indexing self.k[layer] on every call is a measurable cost when decoding.
        self._k_layers = list(self.k.unbind(0))
        self._v_layers = list(self.v.unbind(0))
        self._lengths = [0] * max_seqs
        self._in_use = [False] * max_seqs

    # ---- slot bookkeeping -------------------------------------------------------------------------

    def allocate(self) -> int:
        """Claim a free slot (length 0) and return its id."""
        for slot, used in enumerate(self._in_use):
            if not used:
                self._in_use[slot] = True
                self._lengths[slot] = 0
                return slot
        raise CacheFullError(f"KV cache is full: all max_seqs={self.max_seqs} slots are in use")

    def free(self, slot: int) -> None:
        """Release a slot; its contents are dropped."""
        self._check(slot)
        self._in_use[slot] = False
        self._lengths[slot] = 0

    def length(self, slot: int) -> int:
        """Number of tokens cached for `slot`."""
        self._check(slot)
        return self._lengths[slot]

    def truncate(self, slot: int, new_len: int) -> None:
        """Roll `slot` back to its first `new_len` tokens (e.g. to drop rejected draft tokens)."""
        self._check(slot)
        if not 0 <= new_len <= self._lengths[slot]:
            raise CacheError(
                f"cannot truncate slot {slot} to {new_len}: must be between 0 and its length "
                f"{self._lengths[slot]}"
            )
        self._lengths[slot] = new_len

    @property
    def num_free(self) -> int:
        return self._in_use.count(False)

    def _check(self, slot: int) -> None:
        if not (0 <= slot < self.max_seqs) or not self._in_use[slot]:
            raise CacheError(f"slot {slot} is not an allocated slot of this KV cache")

    # ---- what a forward call uses -------------------------------------------------------------------

    def prepare(self, slots: list[int], num_new: list[int], max_position: int | None = None) -> CacheBatch:
        """Plan appending `num_new[i]` tokens to `slots[i]`; raises before anything is written.

        `max_position` bounds RoPE positions (the model's table size); padding rows are clamped to it.
        """
        if len(slots) != len(num_new) or not slots:
            raise CacheError(f"need one num_new per slot and at least one slot, got {slots} / {num_new}")
        if len(set(slots)) != len(slots):
            raise CacheError(f"a slot appears twice in one forward call: {slots}")
        start = []
        for slot, n in zip(slots, num_new):
            self._check(slot)
            if n < 1:
                raise CacheError(f"slot {slot}: need at least one new token, got {n}")
            length = self._lengths[slot]
            if length + n > self.max_len:
                raise ContextOverflowError(
                    f"slot {slot}: {length} cached + {n} new tokens exceeds the cache's max_len={self.max_len}"
                )
            start.append(length)

        k_max = max(num_new)
        kv_len = max(s + n for s, n in zip(start, num_new))
        limit = (max_position if max_position is not None else self.max_len) - 1
        ragged = any(n != k_max for n in num_new)
        same_start = all(s == start[0] for s in start)
        lo = slots[0]
        slot_range = (lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None
        rectangular = slot_range is not None and not ragged and same_start
        # Masks: one query a slot at equal starts sees every cached key; all slots empty is plain causal
        # (padding rows are don't-care); anything else needs the explicit mask (`attn_mask`).
        masked = not (k_max == 1 and same_start) and not all(s == 0 for s in start)
        return CacheBatch(
            slots=list(slots),
            num_new=list(num_new),
            start=start,
            k_max=k_max,
            kv_len=kv_len,
            slot_range=slot_range,
            write_range=(start[0], start[0] + k_max) if rectangular else None,
            is_causal=not masked and k_max > 1,
            masked=masked,
            limit=limit,
            device=self.device,
        )

    def update(self, layer: int, batch: CacheBatch, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys/values and return everything the batch attends to.

        k_new, v_new: [batch, k_max, num_kv_heads, head_dim] (padding rows are not written).
        Returns keys, values: [batch, num_kv_heads, kv_len, head_dim].
        """
        k_layer, v_layer = self.write(layer, batch, k_new, v_new)
        if batch.slot_range is not None:
            lo, hi = batch.slot_range
            return k_layer[lo:hi, :, : batch.kv_len], v_layer[lo:hi, :, : batch.kv_len]
        return k_layer[batch.slot_index, :, : batch.kv_len], v_layer[batch.slot_index, :, : batch.kv_len]

    def layer_tensors(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's whole key and value tensors `[max_seqs, num_kv_heads, max_len, head_dim]` (views)."""
        return self._k_layers[layer], self._v_layers[layer]

    def write(self, layer: int, batch: CacheBatch, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys/values (as `update`) and return the layer's whole cache tensors
        `[max_seqs, num_kv_heads, max_len, head_dim]` (views, no copy)."""
        k_layer, v_layer = self._k_layers[layer], self._v_layers[layer]
        if batch.write_range is not None:
            lo, hi = batch.slot_range  # type: ignore[misc]
            s, e = batch.write_range
            k_layer[lo:hi, :, s:e].copy_(k_new.transpose(1, 2))
            v_layer[lo:hi, :, s:e].copy_(v_new.transpose(1, 2))
            return k_layer, v_layer
        if batch.valid is None:
            k_flat = k_new.reshape(-1, self.num_kv_heads, self.head_dim)
            v_flat = v_new.reshape(-1, self.num_kv_heads, self.head_dim)
        else:
            k_flat, v_flat = k_new[batch.valid], v_new[batch.valid]
        # One scatter per tensor: advanced indices on (slot, position), heads and dim sliced (a cache
        # kept in another dtype than the model's, e.g. float16 keys of a float32 model: rounded here,
        # to nearest even, as the slice copy above and the C layer kernels round them).
        k_layer[batch.write_slot, :, batch.write_pos] = k_flat.to(self.dtype)
        v_layer[batch.write_slot, :, batch.write_pos] = v_flat.to(self.dtype)
        return k_layer, v_layer

    def commit(self, batch: CacheBatch) -> None:
        """Advance each slot's length once the forward call that wrote `batch` has finished."""
        for slot, s, n in zip(batch.slots, batch.start, batch.num_new):
            self._lengths[slot] = s + n
