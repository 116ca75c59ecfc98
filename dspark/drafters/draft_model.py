"""Classic speculative sampling with an independent small causal LM as the drafter ("draft-model").

    drafter = load_drafter("models/my-small-lm", target, max_seqs=8, max_len=4096)   # any HF causal LM
    drafter = DraftModelDrafter.from_pretrained("models/my-small-lm", target, 8, 4096, block_size=5)

The draft model is loaded with DSpark's own `load_target` (it is just a small target) and must
share the target's tokenizer: same vocabulary size, and the same token -> id map when both ship a
tokenizer. A directory whose `config.json` names a supported causal-LM architecture
(Qwen3ForCausalLM, LlamaForCausalLM, ...) is recognised as a draft model by `load_drafter`; a
`drafter_type: "draft-model"` key does the same for any other directory `load_target` reads, and an
optional `block_size` key sets the largest γ (default 7). `save_pretrained` writes both keys.

Cache handling: the draft model keeps its own KV cache of the sequence. `propose` feeds the anchor
and the first γ−1 drafts (the γ-th draft is sampled but not fed), and `commit` rolls the cache back
to the accepted prefix; accepted tokens the draft model has not read yet (after a full acceptance,
the last draft; the anchor of a round without `propose`) are fed at the start of the next `propose`,
in the same forward as the anchor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dspark.drafters.base import DraftCommit, DraftProposal, DraftStop, register_drafter
from dspark.drafters.common import CommitOne, SlotTable, check_propose_args, sample_step
from dspark.errors import CheckpointError
from dspark.kv_cache import KVCache
from dspark.models.config import supported_architectures
from dspark.sampling import SamplingTensors

if TYPE_CHECKING:
    from dspark.models import TargetModel

# The paper's block size; a draft model can draft any number of tokens, this is only the default
# largest γ (and the engine's default γ).
DEFAULT_BLOCK_SIZE = 7


@dataclass
class _SlotState:
    cslot: int  # the draft cache's slot
    unread: list[int] = field(default_factory=list)  # accepted tokens not yet in the draft cache
    # Set by `propose` until the next `commit`: the cache length before the round's tokens, and the
    # tokens the round appended after it ([anchor, d_1, ..., d_{γ-1}]).
    round_start: int | None = None
    round_tokens: list[int] = field(default_factory=list)


def check_same_vocabulary(draft: "TargetModel", target: "TargetModel", source: str) -> None:
    """Draft and target probabilities are compared token id by token id: the vocabularies must match."""
    if draft.vocab_size != target.vocab_size:
        raise CheckpointError(
            f"{source}: draft model vocab_size={draft.vocab_size} does not match the target model's "
            f"{target.vocab_size}; a draft model must share the target's tokenizer and vocabulary")
    if draft.tokenizer is not None and target.tokenizer is not None:
        mine = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
        theirs = target.tokenizer.backend.get_vocab(with_added_tokens=True)
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
            raise CheckpointError(
                f"{source}: the draft model's tokenizer differs from the target's (e.g. token/id pairs "
                f"{diff} are in only one of them); a draft model must share the target's tokenizer")


@register_drafter("draft-model", architectures=tuple(supported_architectures()))
class DraftModelDrafter(CommitOne, SlotTable):
    """`Drafter` over an independent small causal LM with its own KV cache."""

    name = "draft-model"
    has_confidence = False

    def __init__(self, draft: "TargetModel", max_seqs: int, max_len: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        c = draft.config
        self.draft = draft
        self.block_size = block_size
        self.target_layer_ids: list[int] = []  # reads no target features
        # Room for the round's scratch past the longest sequence: a request whose own ℓ is 0 is
        # still drafted the round's full γ.
        self.cache = KVCache(c.num_layers, max_seqs, max_len + block_size, c.num_kv_heads, c.head_dim,
                             draft.dtype, draft.device)
        self._slots: dict[int, _SlotState] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path | None, target: "TargetModel", max_seqs: int, max_len: int,
                        block_size: int | None = None) -> "DraftModelDrafter":
        """`block_size`: the largest γ; default the directory's `block_size` key, else 7."""
        from dspark.models import load_target
        from dspark.tokenizer import read_json

        if path is None:
            raise CheckpointError("the draft-model drafter needs a model directory (a small causal LM "
                                  "sharing the target's tokenizer), not a bare name")
        path = Path(path)
        draft = load_target(path, dtype=target.dtype, device=target.device,
                            load_tokenizer=(path / "tokenizer.json").is_file())
        check_same_vocabulary(draft, target, str(path))
        if block_size is None:
            raw = read_json(path / "config.json") or {}
            block_size = int(raw.get("block_size") or DEFAULT_BLOCK_SIZE)
        return cls(draft, max_seqs, max_len, block_size)

    def save_pretrained(self, out: str | Path) -> Path:
        """Copy the draft model's directory (weights, tokenizer, configs) to `out`, adding
        `drafter_type` and `block_size` to its config.json; transformers ignores the two keys."""
        from dspark.train.checkpoint import atomic_write_text

        src = self.draft.path
        if src is None:
            raise CheckpointError("this draft model was not loaded from a directory; nothing to copy")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(src).iterdir():
            if f.is_file() and Path(src).resolve() != out.resolve():
                shutil.copy(f, out / f.name)
        raw = json.loads((out / "config.json").read_text(encoding="utf-8"))
        raw.update(drafter_type=self.name, block_size=self.block_size)
        atomic_write_text(out / "config.json", json.dumps(raw, indent=2) + "\n")
        return out

    # ---- Drafter protocol ---------------------------------------------------------------------------

    def add_sequence(self, slot: int, prompt_ids: list[int], target_hidden: Tensor | None) -> None:
        self._open_slot(slot, lambda cslot: self.draft.forward(self.cache, [cslot], [list(prompt_ids)],
                                                               all_logits=False))

    def commit_batch(self, batch: DraftCommit) -> None:
        # Only cache bookkeeping per sequence (no forward): the accepted tokens not read yet are fed
        # with the next round's anchor, in that round's one batched forward.
        for slot, ids in zip(batch.slots, batch.token_ids):
            self._commit_one(slot, ids)

    def _commit_one(self, slot: int, accepted_ids: list[int]) -> None:
        st = self._state(slot)
        if st.round_start is None:  # no proposal this round: nothing of it is in the cache
            st.unread.extend(accepted_ids)
            return
        # accepted_ids = [anchor, accepted drafts...] is a prefix of [anchor, d_1, ..., d_γ]; the cache
        # holds [anchor, d_1, ..., d_{γ-1}] after round_start. Keep the common prefix.
        kept = 0
        for fed, acc in zip(st.round_tokens, accepted_ids):
            if fed != acc:
                break
            kept += 1
        self.cache.truncate(st.cslot, st.round_start + kept)
        st.unread = list(accepted_ids[kept:])
        st.round_start, st.round_tokens = None, []

    @torch.inference_mode()
    def propose(self, slots: list[int], anchors: list[int], num_draft_tokens: int | list[int],
                sampling: SamplingTensors, generators: list[torch.Generator | None],
                stop: DraftStop | None = None) -> DraftProposal:
        """γ = max ℓ draft-model steps: the first reads each sequence's unread tokens and its anchor in
        one forward, each later one reads the previous draft. A row past its own ℓ is padding: it
        takes the argmax and draws no randomness."""
        if stop is not None:
            raise ValueError("the draft-model drafter has no confidence head to stop drafting early with")
        ells = check_propose_args(num_draft_tokens, self.block_size, slots, anchors, generators)
        gamma = max(ells)
        states = [self._state(s) for s in slots]
        cslots = [st.cslot for st in states]
        feed = [st.unread + [a] for st, a in zip(states, anchors)]
        for st, f in zip(states, feed):
            st.round_start = self.cache.length(st.cslot) + len(f) - 1  # the anchor's cache position
            st.unread = []
        tokens, step_probs = [], []
        for k in range(gamma):
            res = self.draft.forward(self.cache, cslots, feed, all_logits=False)
            logits_k = res.logits[:, -1]  # [n, V] the next-token logits of each sequence
            tok, probs_k = sample_step(logits_k, sampling, generators, active=[e > k for e in ells])
            step_probs.append(probs_k)
            tokens.append(tok)
            if k < gamma - 1:
                feed = tok[:, None]  # [n, 1]
        token_ids = torch.stack(tokens, dim=1)  # [n, gamma]
        for st, a, row in zip(states, anchors, token_ids[:, : gamma - 1].tolist()):
            st.round_tokens = [a] + row
        probs = None if step_probs[0] is None else torch.stack(step_probs, dim=1)
        return DraftProposal(token_ids=token_ids, probs=probs, confidence=None)

    # ---- internals -----------------------------------------------------------------------------------

    def _new_state(self, cslot: int) -> _SlotState:
        return _SlotState(cslot)

    @staticmethod
    def _cache_slot(state: _SlotState) -> int:
        return state.cslot
