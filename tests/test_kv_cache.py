"""KVCache bookkeeping, errors, and the fast paths of `prepare`/`update` against plain references."""

from __future__ import annotations

import pytest
import torch

from dspark.errors import CacheError, CacheFullError, ContextOverflowError, DSparkError
from dspark.kv_cache import CacheBatch, KVCache


def make_cache(max_seqs: int = 4, max_len: int = 16) -> KVCache:
    return KVCache(num_layers=2, max_seqs=max_seqs, max_len=max_len, num_kv_heads=2, head_dim=4)


def test_allocate_free_length_truncate() -> None:
    cache = make_cache(max_seqs=2)
    a, b = cache.allocate(), cache.allocate()
    assert (a, b) == (0, 1) and cache.num_free == 0
    batch = cache.prepare([a, b], [3, 5])
    cache.commit(batch)
    assert cache.length(a) == 3 and cache.length(b) == 5
    cache.truncate(b, 2)
    assert cache.length(b) == 2
    cache.truncate(b, 0)
    assert cache.length(b) == 0
    cache.free(a)
    assert cache.allocate() == a and cache.length(a) == 0  # reused slot starts empty


def test_cache_full_error() -> None:
    cache = make_cache(max_seqs=2)
    cache.allocate(), cache.allocate()
    with pytest.raises(CacheFullError, match="max_seqs=2"):
        cache.allocate()


def test_truncate_errors() -> None:
    cache = make_cache()
    slot = cache.allocate()
    cache.commit(cache.prepare([slot], [4]))
    with pytest.raises(CacheError, match="length 4"):
        cache.truncate(slot, 5)
    with pytest.raises(CacheError, match="between 0"):
        cache.truncate(slot, -1)
    with pytest.raises(CacheError, match="slot 3"):
        cache.truncate(3, 0)  # never allocated
    assert cache.length(slot) == 4


def test_context_overflow_names_limit_and_changes_nothing() -> None:
    cache = make_cache(max_len=16)
    a, b = cache.allocate(), cache.allocate()
    cache.commit(cache.prepare([a], [14]))
    with pytest.raises(ContextOverflowError, match="max_len=16") as info:
        cache.prepare([b, a], [1, 3])
    assert isinstance(info.value, DSparkError) and isinstance(info.value, ValueError)
    assert cache.length(a) == 14 and cache.length(b) == 0
    cache.commit(cache.prepare([a], [2]))  # exactly full is fine
    assert cache.length(a) == 16


def test_bad_calls() -> None:
    cache = make_cache()
    a = cache.allocate()
    with pytest.raises(CacheError, match="twice"):
        cache.prepare([a, a], [1, 1])
    with pytest.raises(CacheError, match="at least one"):
        cache.prepare([a], [0])
    with pytest.raises(CacheError, match="not an allocated slot"):
        cache.prepare([2], [1])


def reference_mask(start: list[int], num_new: list[int], kv_len: int) -> torch.Tensor:
    """[batch, k_max, kv_len] bool: token j of sequence b may see cache positions <= start_b + j."""
    k_max = max(num_new)
    m = torch.zeros(len(start), k_max, kv_len, dtype=torch.bool)
    for b, s in enumerate(start):
        for j in range(num_new[b]):
            m[b, j, : s + j + 1] = True
    return m


def effective_mask(batch: CacheBatch) -> torch.Tensor:
    """The mask the attention actually applies, whichever fast path `prepare` chose."""
    n, k, L = len(batch.slots), batch.k_max, batch.kv_len
    if batch.attn_mask is not None:
        return batch.attn_mask[:, 0]
    if batch.is_causal:
        return torch.ones(k, L, dtype=torch.bool).tril().expand(n, k, L)
    return torch.ones(n, k, L, dtype=torch.bool)


@pytest.mark.parametrize(
    "lengths, num_new",
    [
        ([0], [5]),  # prefill -> is_causal path
        ([0, 0, 0], [2, 5, 1]),  # ragged prefill -> is_causal path, padding rows ignored
        ([4, 4], [1, 1]),  # decode, equal lengths -> no mask
        ([3, 7, 1], [1, 1, 1]),  # decode, ragged lengths -> explicit mask
        ([3, 0, 6], [4, 2, 1]),  # ragged verification -> explicit mask
    ],
)
def test_prepare_masks_match_reference(lengths: list[int], num_new: list[int]) -> None:
    cache = make_cache()
    slots = [cache.allocate() for _ in lengths]
    for s, n in zip(slots, lengths):
        if n:
            cache.commit(cache.prepare([s], [n]))
    batch = cache.prepare(slots, num_new)
    assert batch.start == lengths
    assert batch.kv_len == max(s + n for s, n in zip(lengths, num_new))
    ref = reference_mask(lengths, num_new, batch.kv_len)
    got = effective_mask(batch)
    for b, n in enumerate(num_new):  # only real rows matter; padding rows are don't-care
        assert torch.equal(got[b, :n], ref[b, :n])
        assert batch.positions[b, :n].tolist() == list(range(lengths[b], lengths[b] + n))
    expected = [(sl, p) for sl, s, n in zip(slots, lengths, num_new) for p in range(s, s + n)]
    assert sorted(effective_writes(batch)) == sorted(expected)


def effective_writes(batch: CacheBatch) -> list[tuple[int, int]]:
    """(slot, position) pairs `update` writes, whichever fast path `prepare` chose."""
    if batch.write_range is not None:
        lo, hi = batch.slot_range
        s, e = batch.write_range
        return [(sl, p) for sl in range(lo, hi) for p in range(s, e)]
    return list(zip(batch.write_slot.tolist(), batch.write_pos.tolist()))


@pytest.mark.parametrize("num_new", [[2, 1, 2], [2, 2, 2]])
@pytest.mark.parametrize("equal_starts", [False, True])
def test_update_fast_paths_equal_reference(num_new: list[int], equal_starts: bool) -> None:
    """Slice reads/writes (contiguous slots) and gather/scatter (any order) against a plain loop."""
    cache = make_cache(max_seqs=4, max_len=8)
    slots = [cache.allocate() for _ in range(4)]
    cache.commit(cache.prepare(slots[:3], [2, 2, 2] if equal_starts else [2, 1, 3]))
    for order in ([0, 1, 2], [2, 0, 1]):
        sl = [slots[i] for i in order]
        batch = cache.prepare(sl, num_new)
        assert (batch.slot_range is not None) == (order == [0, 1, 2])
        rectangular = order == [0, 1, 2] and equal_starts and len(set(num_new)) == 1
        assert (batch.write_range is not None) == rectangular
        k_new = torch.randn(3, 2, 2, 4)  # [batch, k_max, Hkv, D]
        v_new = torch.randn(3, 2, 2, 4)
        before_k, before_v = cache.k.clone(), cache.v.clone()
        keys, values = cache.update(1, batch, k_new, v_new)
        # Reference: write each real token with a Python loop, then read each slot's prefix.
        ref_k, ref_v = before_k.clone(), before_v.clone()
        for row, slot in enumerate(sl):
            for j in range(num_new[row]):
                ref_k[1, slot, :, batch.start[row] + j] = k_new[row, j]
                ref_v[1, slot, :, batch.start[row] + j] = v_new[row, j]
        assert torch.equal(cache.k, ref_k) and torch.equal(cache.v, ref_v)  # padding rows not written
        assert keys.shape == (3, 2, batch.kv_len, 4)
        for row, slot in enumerate(sl):
            assert torch.equal(keys[row], ref_k[1, slot, :, : batch.kv_len])
            assert torch.equal(values[row], ref_v[1, slot, :, : batch.kv_len])
        cache.k.copy_(before_k), cache.v.copy_(before_v)  # same starting state for the next order
