"""What the drafters that keep their own KV cache share: the checks on `propose`'s arguments, the
rule that turns one step's logits into a draft token, and the engine-slot -> cache-slot table.

    check_propose_args(gamma, self.block_size, slots, anchors, generators)
    tok, probs = sample_step(logits_k, sampling, generators)      # probs None when every row is greedy

One implementation of each, so the DSpark, EAGLE-3 and draft-model drafters cannot drift apart in
what they accept or in how they sample (a drafter that sampled differently from the distribution
it reports would make verification lossy).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from dspark.errors import CacheError
from dspark.kv_cache import KVCache
from dspark.sampling import SamplingTensors, logits_to_probs, sample_from_probs


def check_propose_args(gamma: int, block_size: int, slots: list[int], anchors: list[int],
                       generators: list[torch.Generator | None]) -> None:
    """Raise ValueError unless 1 <= gamma <= block_size and there is one anchor and one generator
    per slot (the engine guarantees both; direct callers get a clear message)."""
    if not 1 <= gamma <= block_size:
        raise ValueError(f"gamma={gamma} is outside [1, {block_size}] (the drafter's block_size)")
    if len(anchors) != len(slots) or len(generators) != len(slots):
        raise ValueError(f"need one anchor and one generator per slot: {len(slots)} slots, "
                         f"{len(anchors)} anchors, {len(generators)} generators")


def sample_step(logits: Tensor, sampling: SamplingTensors,
                generators: list[torch.Generator | None]) -> tuple[Tensor, Tensor | None]:
    """One draft position: logits [n, V] -> (tokens [n] long, probs [n, V] float32 or None).

    All-greedy batches skip the softmax (verification then compares tokens only); otherwise the
    token is sampled from exactly the `probs` returned, which `DraftProposal.probs` must report."""
    greedy = list(sampling.greedy)
    if all(greedy):
        return logits.argmax(dim=-1), None
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return sample_from_probs(probs, generators, greedy), probs


def check_target_hidden(drafter: str, target_layer_ids: list[int], target_hidden: Tensor | None, n: int) -> Tensor:
    """target_hidden must be [n, len(target_layer_ids), hidden]; returns it."""
    L = len(target_layer_ids)
    if target_hidden is None:
        raise ValueError(f"the {drafter} drafter needs the target's hidden states (layers "
                         f"{target_layer_ids}); got None")
    if target_hidden.dim() != 3 or target_hidden.shape[0] != n or target_hidden.shape[1] != L:
        raise ValueError(f"target_hidden must be [{n}, {L}, hidden] (one row per token, one tap per "
                         f"target layer id), got {tuple(target_hidden.shape)}")
    return target_hidden


class SlotTable:
    """Mixin: engine slot -> per-sequence state holding a slot of `self.cache`.

    The state is the cache slot itself unless a drafter overrides `_new_state` / `_cache_slot`."""

    cache: KVCache
    _slots: dict[int, Any]

    def _new_state(self, cslot: int) -> Any:
        return cslot

    @staticmethod
    def _cache_slot(state: Any) -> int:
        return state

    def _open_slot(self, slot: int, fill: Callable[[int], None]) -> None:
        """Track `slot` on a fresh cache slot and run `fill(cache_slot)`; a failing fill leaves nothing
        allocated, so the engine may retry or free without leaking cache slots."""
        if slot in self._slots:
            raise CacheError(f"drafter: slot {slot} is already tracked (free it first)")
        cslot = self.cache.allocate()
        self._slots[slot] = self._new_state(cslot)
        try:
            fill(cslot)
        except Exception:
            self.free(slot)
            raise

    def _state(self, slot: int) -> Any:
        if slot not in self._slots:
            raise CacheError(f"drafter: slot {slot} is not tracked (call add_sequence first)")
        return self._slots[slot]

    def _cslot(self, slot: int) -> int:
        return self._cache_slot(self._state(slot))

    def free(self, slot: int) -> None:
        state = self._slots.pop(slot, None)
        if state is not None:
            self.cache.free(self._cache_slot(state))
