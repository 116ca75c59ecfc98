"""The EAGLE-3 drafter: the autoregressive baseline of the paper (one draft layer, TTT horizon γ).

    drafter = Eagle3Drafter.from_pretrained("runs/eagle3", target, max_seqs=8, max_len=4096)
    model = Eagle3Model.from_target(Eagle3Config.for_target(target.config), target)
    out = model.forward_train(target_hidden, input_ids, anchors, anchor_mask, loss_mask)   # training

Architecture (EAGLE-3 style, built from the DSpark drafter's layers, norms and RoPE):
  * fused features g_i = fc(concat of the target's hidden states at target_layer_ids) at position i,
    the same low/middle/high taps DSpark reads;
  * draft row i (RoPE position i) reads [embed(x_{i+1}) ; g_i], each half RMS-normed, projected
    2H -> H by `in_proj`, then `num_hidden_layers` decoder layers (causal attention over earlier
    rows); h_i (before `norm`) is the drafter's own feature and `lm_head(norm(h_i))` predicts x_{i+2};
  * drafting from an anchor x_p: step 1 is row p-1 = [embed(x_p) ; g_{p-1}] (target features), step
    k > 1 is row p+k-2 = [embed(d_{k-1}) ; h from step k-1], because the target's features of the
    drafted tokens are unknown: the drafter feeds itself;
  * training-time test (TTT): training unrolls the same γ steps, step k feeding step k-1's h (with
    gradient), with the attention pattern inference has: a step-k row sees the step-1 rows up to its
    anchor (the committed context plus the anchor's own step-1 row) and its own rows of steps 2..k.

Symbols in shape comments:
    B  sequences in a training batch    T  training sequence length    A  anchors per sequence
    n  sequences in a propose call      G  block_size (TTT horizon, largest γ)   V  vocabulary
    H  hidden size                      L  target layers tapped        Hkv / D  key-value heads / head_dim
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from dspark.drafters.base import DraftCommit, register_drafter
from dspark.drafters.common import check_propose_args, sample_step
from dspark.drafters.dspark_drafter import (BlockDraft, DraftLayer, DrafterConfigBase, DraftTrainOutput,
                                            FeatureDrafter, FeatureDrafterModel, RMSNorm,
                                            SharedWeights, block_labels, default_train_masks)
from dspark.kv_cache import CacheBatch, KVCache
from dspark.sampling import SamplingTensors

if TYPE_CHECKING:
    from dspark.models import TargetModel

ARCHITECTURE = "Eagle3DraftModel"


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass(kw_only=True)
class Eagle3Config(DrafterConfigBase):
    """An EAGLE-3 drafter: the backbone fields of `DSparkConfig` (same names, same meaning), so the
    draft layers (`DraftLayer`) and the trainer read either config. block_size = the TTT horizon."""

    architecture: ClassVar[str] = ARCHITECTURE
    drafter_type: str = "eagle3"

    def to_json_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        # "llama" is what EAGLE-3 checkpoints declare; the fields are what we read.
        return self._json_dict(dtype, "llama", {"num_hidden_layers": self.num_hidden_layers})

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "Eagle3Config":
        return cls._parse_json(raw, source, lambda req: {"num_hidden_layers": int(raw.get("num_hidden_layers", 1))})


# ---------------------------------------------------------------------------------------------------
# The model


class Eagle3Model(FeatureDrafterModel):
    """Drafter weights and math (no caches, no sampling state)."""

    def __init__(self, cfg: Eagle3Config, shared: SharedWeights | None = None) -> None:
        super().__init__(cfg, shared)
        H = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * H, H, bias=False)
        # Token embeddings and fed-back features live on different scales; each half is normed
        # before the two are mixed.
        self.embed_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.in_proj = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))  # type: ignore[arg-type]
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    @classmethod
    def _config_from_json(cls, raw: Mapping[str, Any], source: str, target: "TargetModel") -> Eagle3Config:
        return Eagle3Config.from_json_dict(raw, source)

    # ---- pieces ------------------------------------------------------------------------------------

    def fuse(self, target_hidden: Tensor) -> Tensor:
        """target_hidden [..., L, H] (taps in target_layer_ids order) -> fused features g [..., H]."""
        return self.fc(target_hidden.reshape(*target_hidden.shape[:-2], -1).to(self.dtype))

    def row_inputs(self, ids: Tensor, features: Tensor) -> Tensor:
        """ids [...] (the row's token), features [..., H] (g or the drafter's own h) -> [..., H]."""
        e = self.embed(ids)
        return self.in_proj(torch.cat([self.embed_norm(e), self.hidden_norm(features.to(self.dtype))], dim=-1))

    def logits(self, hidden: Tensor) -> Tensor:
        """h [..., H] (before `norm`) -> next-token logits [..., V] float32 via the target's LM head."""
        return self._shared().logits(self.norm(hidden)).float()

    def run_cached(self, cache: KVCache, batch: CacheBatch, ids: Tensor, features: Tensor) -> Tensor:
        """Rows appended to `cache` per `batch`: ids [b, S], features [b, S, H] -> h [b, S, H].
        The caller commits (or rolls back) the batch."""
        key_pos = torch.arange(batch.kv_len, device=ids.device)
        mask = (key_pos[None, None, :] <= batch.positions[:, :, None]).unsqueeze(1)  # [b, 1, S, kv_len]
        return self.run_layers(self.row_inputs(ids, features), batch.positions,
                               lambda i, k, v: cache.update(i, batch, k, v), mask)

    # ---- training -----------------------------------------------------------------------------------

    def forward_train(
        self,
        target_hidden: Tensor,  # [B, T, L, H] taps at every position (padding rows must be finite)
        input_ids: Tensor,  # [B, T] long
        anchors: Tensor,  # [B, A] long positions p; the block drafts input_ids[p + 1 .. p + G]
        anchor_mask: Tensor | None = None,  # [B, A] bool, False = padding anchor (no loss)
        loss_mask: Tensor | None = None,  # [B, T] bool, True = position may be predicted
    ) -> DraftTrainOutput:
        """Training-time test over G steps for every anchor, in the `DraftTrainOutput` the DSpark
        trainer and losses read. Step 1 runs every row causally (the rows inference commits); steps
        k >= 2 run only at the anchors, embedding the data token x_{p+k-1} and feeding step k-1's h.
        With the drafter's own tokens in `input_ids`, step k's logits are those `propose` computes."""
        B, T = input_ids.shape
        A, G = anchors.shape[1], self.config.block_size
        dev = input_ids.device
        anchor_mask, loss_mask = default_train_masks(input_ids, anchors, anchor_mask, loss_mask)
        # Step 1 reads the target's features of position p - 1, so an anchor needs p >= 1.
        anchor_mask = anchor_mask & (anchors >= 1)
        anchors = torch.where(anchor_mask, anchors, torch.ones_like(anchors)).clamp(1, max(T - 1, 1))

        # Step 1, every row r = [x_{r+1} ; g_r] at position r (the last row's token is padding:
        # causal attention keeps it from every other row).
        g = self.fuse(target_hidden)  # [B, T, H]
        next_ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(B, 1)], dim=1)
        positions = torch.arange(T, device=dev).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]  # [1, 1, T, T]
        ctx_kv: list[tuple[Tensor, Tensor]] = []  # per layer, step-1 keys/values [B, T, Hkv, D]

        def step1_kv(i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            ctx_kv.append((k, v))
            return k.transpose(1, 2), v.transpose(1, 2)

        h_all = self.run_layers(self.row_inputs(next_ids, g), positions, step1_kv, causal)  # [B, T, H]

        rows = anchors - 1  # [B, A] each anchor's step-1 row
        h = h_all.gather(1, rows.unsqueeze(-1).expand(-1, -1, h_all.shape[-1]))  # [B, A, H]
        steps = [h]
        see_ctx = torch.arange(T, device=dev)[None, None, :] <= rows[:, :, None]  # [B, A, T]
        own = torch.eye(A, dtype=torch.bool, device=dev).expand(B, A, A)  # a row sees only its own steps
        new_kv: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.layers]  # per layer, per step >= 2

        for k in range(2, G + 1):
            ids = input_ids.gather(1, (anchors + k - 1).clamp(max=T - 1))  # x_{p+k-1}: [B, A]
            mask = torch.cat([see_ctx] + [own] * (k - 1), dim=-1).unsqueeze(1)  # [B, 1, A, T + (k-1)A]

            def step_kv(i: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
                new_kv[i].append((k_new, v_new))
                keys = torch.cat([ctx_kv[i][0]] + [kk for kk, _ in new_kv[i]], dim=1)
                values = torch.cat([ctx_kv[i][1]] + [vv for _, vv in new_kv[i]], dim=1)
                return keys.transpose(1, 2), values.transpose(1, 2)

            h = self.run_layers(self.row_inputs(ids, h), rows + k - 1, step_kv, mask)  # [B, A, H]
            steps.append(h)

        hidden = torch.stack(steps, dim=2)  # [B, A, G, H]
        logits = self.logits(hidden)  # [B, A, G, V]
        labels, valid = block_labels(input_ids, anchors, anchor_mask, loss_mask, G)  # [B, A, G] each
        return DraftTrainOutput(logits=logits, base_logits=logits, hidden=hidden, confidence_logits=None,
                                labels=labels, label_mask=valid)

    forward = forward_train  # so DistributedDataParallel(model)(...) runs the training forward


# ---------------------------------------------------------------------------------------------------
# The drafter the engine talks to


@register_drafter("eagle3", architectures=(ARCHITECTURE,))
class Eagle3Drafter(FeatureDrafter):
    """`Drafter` over an `Eagle3Model`, with a per-sequence cache of the draft layers' keys/values.

    Cache row i of a sequence is [x_{i+1} ; g_i]; the cache holds exactly the rows whose target
    features are known and whose token is accepted, so after the prefill of n tokens it holds rows
    0..n-2 and the last feature g_{n-1} waits (`_pending`) for the token that follows it: the next
    anchor. `propose` appends its γ rows as scratch and rolls them back; `commit` appends the rows
    of the accepted tokens, recomputed from the target's features, as training computes them.
    """

    name = "eagle3"
    model_class = Eagle3Model

    def __init__(self, model: Eagle3Model, max_seqs: int, max_len: int) -> None:
        super().__init__(model, max_seqs, max_len)
        # g of the last position with known target features, per cache slot: [max_seqs, H]
        self._pending = torch.zeros(max_seqs, model.config.hidden_size, dtype=model.dtype, device=model.device)

    # ---- Drafter protocol ---------------------------------------------------------------------------

    def add_sequence(self, slot: int, prompt_ids: list[int], target_hidden: Tensor | None) -> None:
        # Row i pairs g_i with x_{i+1}: the prompt's own tokens after the first, then the anchor.
        self._open_slot(slot, lambda cslot: self._append_rows(
            slot, list(prompt_ids[1:]), target_hidden, len(prompt_ids), first=True))

    @torch.inference_mode()
    def commit_batch(self, batch: DraftCommit) -> None:
        """Every sequence's kept tokens in one ragged pass: row j of sequence r pairs token j with the
        feature before it (the pending one for j = 0); the last new feature becomes pending."""
        model = self.model
        cslots = [self._cslot(s) for s in batch.slots]
        counts = [len(t) for t in batch.token_ids]
        k_max = max(counts)
        g = model.fuse(self._batch_features_in(batch))  # [num_reqs, k_max, H]
        rows = torch.tensor(cslots, device=model.device)
        feats = torch.cat([self._pending[rows].unsqueeze(1), g[:, :-1]], dim=1)  # [num_reqs, k_max, H]
        ids = torch.tensor([t + [0] * (k_max - len(t)) for t in batch.token_ids], device=model.device)
        cb = self.cache.prepare(cslots, counts, max_position=self.cache.max_len)
        model.run_cached(self.cache, cb, ids, feats)
        self.cache.commit(cb)
        last = torch.tensor(counts, device=model.device) - 1
        self._pending[rows] = g[torch.arange(len(cslots), device=model.device), last]

    # ---- internals -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _append_rows(self, slot: int, ids: list[int], target_hidden: Tensor | None, n: int, first: bool) -> None:
        """Features of `n` new positions arrived: append one row per token in `ids`, pairing it with
        the feature before it (the pending one first, unless this is the prompt), and keep the last
        feature pending."""
        cslot = self._cslot(slot)
        model = self.model
        g = model.fuse(self._features_in(target_hidden, n))  # [n, H]
        feats = g[:-1] if first else torch.cat([self._pending[cslot, None], g[:-1]])  # [len(ids), H]
        if ids:
            batch = self.cache.prepare([cslot], [len(ids)], max_position=self.cache.max_len)
            model.run_cached(self.cache, batch, torch.tensor([ids], device=model.device), feats.unsqueeze(0))
            self.cache.commit(batch)
        self._pending[cslot] = g[-1]

    @torch.inference_mode()
    def draft_block(self, slots: list[int], anchors: list[int], num_draft_tokens: int | list[int],
                    sampling: SamplingTensors, generators: list[torch.Generator | None], stop=None) -> BlockDraft:
        """γ = max ℓ sequential steps for every slot (a row past its own ℓ is padding: argmax, no
        randomness); each step appends one scratch row per slot, and all of them are rolled back at
        the end (the accepted ones come back through `commit_batch`)."""
        if stop is not None:
            raise ValueError("the eagle3 drafter has no confidence head to stop drafting early with")
        ells = check_propose_args(num_draft_tokens, self.block_size, slots, anchors, generators)
        gamma = max(ells)
        model = self.model
        dev = model.device
        n = len(slots)
        cslots = [self._cslot(s) for s in slots]
        starts = [self.cache.length(c) for c in cslots]
        prev = torch.tensor(anchors, dtype=torch.long, device=dev)  # [n]
        feats = self._pending[torch.tensor(cslots, device=dev)]  # [n, H] g_{p-1}, then the drafter's h
        tokens, step_logits, step_probs = [], [], []
        try:
            for k in range(gamma):
                batch = self.cache.prepare(cslots, [1] * n, max_position=self.cache.max_len)
                h = model.run_cached(self.cache, batch, prev[:, None], feats[:, None])[:, 0]  # [n, H]
                self.cache.commit(batch)  # advance so the next step sees this row; rolled back below
                logits_k = model.logits(h)  # [n, V]
                tok, probs_k = sample_step(logits_k, sampling, generators, active=[e > k for e in ells])
                tok = model.to_target_tokens(tok)
                step_probs.append(model.to_target_probs(probs_k))
                tokens.append(tok)
                step_logits.append(logits_k)
                prev, feats = tok, h
        finally:
            for c, s in zip(cslots, starts):
                self.cache.truncate(c, s)
        logits = torch.stack(step_logits, dim=1)  # [n, gamma, V]
        return BlockDraft(token_ids=torch.stack(tokens, dim=1), logits=logits, base_logits=logits,
                          probs=None if step_probs[0] is None else torch.stack(step_probs, dim=1),
                          confidence=None)
