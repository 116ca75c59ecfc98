"""What the drafters that keep their own KV cache share: the checks on `propose`'s arguments, the
rule that turns one step's logits into a draft token, and the engine-slot -> cache-slot table.

    ells = check_propose_args(num_draft_tokens, self.block_size, slots, anchors, generators)
    tok, probs = sample_step(logits_k, sampling, generators, active=[e > k for e in ells])

One implementation of each, so the DSpark, EAGLE-3 and draft-model drafters cannot drift apart in
what they accept or in how they sample (a drafter that sampled differently from the distribution
it reports would make verification lossy).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from dspark.drafters.base import DraftCommit, as_num_draft_tokens
from dspark.errors import CacheError
from dspark.kv_cache import KVCache
from dspark.sampling import SamplingTensors, logits_to_probs, sample_from_probs


def check_propose_args(num_draft_tokens: int | list[int], block_size: int, slots: list[int], anchors: list[int],
                       generators: list[torch.Generator | None]) -> list[int]:
    """ℓ per slot, checked: each in [0, block_size], at least one >= 1 (an int: the same ℓ for all, in
    [1, block_size]), one anchor and one generator per slot. Raises ValueError naming the problem
    (the engine guarantees all of it; direct callers get a clear message)."""
    if isinstance(num_draft_tokens, int) and not 1 <= num_draft_tokens <= block_size:
        raise ValueError(f"gamma={num_draft_tokens} is outside [1, {block_size}] (the drafter's block_size)")
    ells = as_num_draft_tokens(num_draft_tokens, len(slots))
    bad = [e for e in ells if not 0 <= e <= block_size]
    if bad or not ells or max(ells) < 1:
        raise ValueError(f"num_draft_tokens={ells}: each must be in [0, {block_size}] (the drafter's "
                         "block_size) and at least one >= 1")
    if len(anchors) != len(slots) or len(generators) != len(slots):
        raise ValueError(f"need one anchor and one generator per slot: {len(slots)} slots, "
                         f"{len(anchors)} anchors, {len(generators)} generators")
    return ells


def sample_step(logits: Tensor, sampling: SamplingTensors, generators: list[torch.Generator | None],
                active: list[bool] | None = None) -> tuple[Tensor, Tensor | None]:
    """One draft position: logits [n, V] -> (tokens [n] long, probs [n, V] float32 or None).

    All-greedy batches skip the softmax (verification then compares tokens only); otherwise the
    token is sampled from exactly the `probs` returned, which `DraftProposal.probs` must report.
    `active[i]` False: row i is past its ℓ (padding) and takes the argmax without touching its
    generator, so a request draws randomness only for the drafts it was asked for."""
    greedy = list(sampling.greedy)
    if all(greedy):
        return logits.argmax(dim=-1), None
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    draw = greedy if active is None else [g or not a for g, a in zip(greedy, active)]
    return sample_from_probs(probs, generators, draw), probs


class CommitOne:
    """Mixin: the one-sequence `commit` of the Drafter protocol, as a `commit_batch` of one."""

    def commit_batch(self, batch: DraftCommit) -> None:
        raise NotImplementedError

    def commit(self, slot: int, accepted_ids: list[int], target_hidden: Tensor | None) -> None:
        hidden = None if target_hidden is None else target_hidden.unsqueeze(0)
        self.commit_batch(DraftCommit([slot], [list(accepted_ids)], hidden))


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
