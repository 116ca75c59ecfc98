"""Prompt-lookup (n-gram) drafter: no model, proposes what followed the latest earlier occurrence of
the context's last n tokens.

    llm = LLM(drafter="ngram")      # or LLM(drafter=NgramDrafter(...))

Draft probabilities are one-hot on the proposed token, so the standard speculative-sampling rule
stays exact at any temperature: a proposal x is accepted with probability p_t(x), and a rejection
samples from p_t with x removed (see `dspark.verify`). Where no n-gram matches, the drafter repeats
the anchor; the target rejects what it does not want, so the output is unaffected either way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dspark.drafters.base import DraftCommit, DraftProposal, DraftStop, as_num_draft_tokens, register_drafter
from dspark.drafters.common import CommitOne
from dspark.sampling import SamplingTensors


@register_drafter("ngram", architectures=("NgramDrafter",))
class NgramDrafter(CommitOne):
    name = "ngram"
    weightless = True  # selectable by bare name: prompt lookup needs no checkpoint
    target_layer_ids: list[int] = []
    has_confidence = False

    def __init__(self, vocab_size: int, block_size: int = 16, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.history: dict[int, list[int]] = {}

    @classmethod
    def from_pretrained(cls, path: Path | None, target, max_seqs: int, max_len: int) -> "NgramDrafter":
        kw = {}
        if path is not None:
            import json
            cfg = json.loads((Path(path) / "config.json").read_text())
            kw = {k: cfg[k] for k in ("block_size", "max_ngram", "min_ngram") if k in cfg}
        return cls(target.vocab_size, **kw)

    def add_sequence(self, slot: int, prompt_ids: list[int], target_hidden: Tensor | None) -> None:
        self.history[slot] = list(prompt_ids)

    def commit_batch(self, batch: DraftCommit) -> None:
        for slot, ids in zip(batch.slots, batch.token_ids):
            self.history[slot].extend(ids)

    def free(self, slot: int) -> None:
        self.history.pop(slot, None)

    def lookup(self, context: list[int], gamma: int) -> list[int]:
        """The gamma tokens that followed the latest earlier match of the longest suffix n-gram."""
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = context[n_ctx - n:]
            # Scan right to left: the most recent occurrence is the most relevant one.
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start:start + n] == suffix:
                    follow = context[start + n:start + n + gamma]
                    if follow:
                        # Short continuations are extended by repeating the pattern (periodic text).
                        period = n_ctx - start - n
                        while len(follow) < gamma:
                            follow.append(follow[len(follow) - period] if len(follow) >= period else follow[-1])
                        return follow[:gamma]
        return [context[-1]] * gamma

    def propose(self, slots: list[int], anchors: list[int], num_draft_tokens: int | list[int],
                sampling: SamplingTensors, generators: list[torch.Generator | None],
                stop: DraftStop | None = None) -> DraftProposal:
        if stop is not None:
            raise ValueError("the ngram drafter has no confidence head to stop drafting early with")
        ells = as_num_draft_tokens(num_draft_tokens, len(slots))
        gamma = max(ells, default=0)
        if gamma > self.block_size or min(ells, default=0) < 0:
            raise ValueError(f"gamma={gamma} exceeds the ngram drafter's block_size {self.block_size}")
        # Each row is looked up for its own ℓ and padded (by repeating its last token) to the widest.
        rows = []
        for s, a, ell in zip(slots, anchors, ells):
            row = self.lookup(self.history[s] + [a], ell) if ell else []
            rows.append(row + [row[-1] if row else a] * (gamma - ell))
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(slots), gamma)  # [num_reqs, gamma]
        probs = None
        if not all(sampling.greedy):
            # Deterministic proposals: one-hot draft distributions keep verification exact.
            probs = torch.zeros(len(slots), gamma, self.vocab_size)  # [num_reqs, gamma, vocab]
            probs.scatter_(2, ids[..., None], 1.0)
        return DraftProposal(token_ids=ids, probs=probs, confidence=None)
