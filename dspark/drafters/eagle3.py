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

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dspark.drafters.base import DraftProposal, register_drafter
from dspark.drafters.dspark_drafter import (INIT_STD, SHARED_KEYS, WEIGHTS_FILE, BlockDraft, DraftLayer,
                                            DraftTrainOutput, KeyValueSource, RMSNorm, SharedWeights,
                                            block_label_positions, default_target_layer_ids, rope_tables)
from dspark.errors import CacheError, CheckpointError
from dspark.kv_cache import CacheBatch, KVCache
from dspark.models.config import ModelConfig, RopeScaling, _rope
from dspark.sampling import SamplingTensors, logits_to_probs, sample_from_probs

if TYPE_CHECKING:
    from dspark.models import TargetModel

ARCHITECTURE = "Eagle3DraftModel"


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Eagle3Config:
    """An EAGLE-3 drafter. Field names match `DSparkConfig` where they mean the same, so the draft
    layers (`DraftLayer`) and the trainer read either config."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    block_size: int = 7  # TTT horizon = the largest γ `propose` accepts
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    drafter_type: str = "eagle3"

    def __post_init__(self) -> None:
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]

    def validate(self, source: str = "drafter config") -> None:
        """Raise CheckpointError naming `source` and the offending key."""

        def bad(key: str, msg: str) -> None:
            raise CheckpointError(f"{source}: {key}={getattr(self, key)!r} {msg}")

        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "vocab_size", "num_target_layers", "num_hidden_layers", "block_size"):
            if int(getattr(self, key)) < 1:
                bad(key, "must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"is not a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even (RoPE rotates pairs)")
        if not self.target_layer_ids:
            bad("target_layer_ids", "must not be empty")
        if any(b <= a for a, b in zip(self.target_layer_ids, self.target_layer_ids[1:])):
            bad("target_layer_ids", "must be strictly increasing")
        if any(not -1 <= i < self.num_target_layers for i in self.target_layer_ids):
            bad("target_layer_ids", f"must lie in [-1, {self.num_target_layers - 1}] "
                                    f"(num_target_layers={self.num_target_layers}; -1 = embedding)")

    @classmethod
    def for_target(cls, target: ModelConfig, **overrides: Any) -> "Eagle3Config":
        """A drafter shaped like `target` (width, heads, RoPE, vocabulary; DSpark's default taps)."""
        kw: dict[str, Any] = dict(
            hidden_size=target.hidden_size, num_attention_heads=target.num_heads,
            num_key_value_heads=target.num_kv_heads, head_dim=target.head_dim,
            intermediate_size=target.intermediate_size, vocab_size=target.vocab_size,
            num_target_layers=target.num_layers, target_layer_ids=default_target_layer_ids(target.num_layers),
            rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**kw)
        cfg.validate("drafter settings")
        return cfg

    def backbone(self) -> ModelConfig:
        """The draft layers' shape as a `ModelConfig` (RoPE frequencies come from it)."""
        return ModelConfig(
            architecture=ARCHITECTURE, model_type="qwen3", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers, num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            qk_norm=True, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
            rope_scaling=self.rope_scaling,
        )

    def to_json_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "drafter_type": self.drafter_type,
            "model_type": "llama",  # what EAGLE-3 checkpoints declare; the fields below are what we read
            "block_size": self.block_size,
            "target_layer_ids": list(self.target_layer_ids),
            "num_target_layers": self.num_target_layers,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "dtype": str(dtype).removeprefix("torch."),
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return d

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "Eagle3Config":
        def req(key: str) -> Any:
            if raw.get(key) is None:
                raise CheckpointError(f"{source}: missing required key {key!r}")
            return raw[key]

        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        theta, scaling = _rope(raw, source)
        heads, hidden = int(req("num_attention_heads")), int(req("hidden_size"))
        try:
            cfg = cls(
                hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                intermediate_size=int(req("intermediate_size")), vocab_size=int(req("vocab_size")),
                num_target_layers=int(req("num_target_layers")), target_layer_ids=list(req("target_layer_ids")),
                block_size=int(req("block_size")), num_hidden_layers=int(raw.get("num_hidden_layers", 1)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
                attention_bias=bool(raw.get("attention_bias", False)),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: malformed drafter config ({e})") from None
        cfg.validate(source)
        return cfg

    def check_target(self, target: ModelConfig, source: str) -> None:
        """The drafter shares the target's embedding and LM head and reads its hidden states."""
        for key, mine, theirs in (("hidden_size", self.hidden_size, target.hidden_size),
                                  ("vocab_size", self.vocab_size, target.vocab_size),
                                  ("num_target_layers", self.num_target_layers, target.num_layers)):
            if mine != theirs:
                raise CheckpointError(f"{source}: {key}={mine} does not match the target model's {theirs}")


# ---------------------------------------------------------------------------------------------------
# The model


class Eagle3Model(nn.Module):
    """Drafter weights and math (no caches, no sampling state)."""

    def __init__(self, cfg: Eagle3Config, shared: SharedWeights | None = None) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.config = cfg
        self.fc = nn.Linear(len(cfg.target_layer_ids) * H, H, bias=False)
        # Token embeddings and fed-back features live on different scales; each half is normed
        # before the two are mixed.
        self.embed_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.in_proj = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))  # type: ignore[arg-type]
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.shared = shared  # plain attribute: not saved, not optimised, not synchronised by DDP
        self._inv_freq = cfg.backbone().rope_inv_freq()
        self._rope_cos = self._rope_sin = torch.empty(0)

    # ---- construction ------------------------------------------------------------------------------

    def init_weights(self, seed: int = 0) -> "Eagle3Model":
        """normal(0, 0.02) matrices, zero biases, unit norms, from a private generator (seed only)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
        return self

    @classmethod
    def from_target(cls, cfg: Eagle3Config, target: "TargetModel", seed: int = 0,
                    dtype: torch.dtype | None = None) -> "Eagle3Model":
        """A freshly initialised drafter sharing `target`'s embedding and LM head."""
        cfg.check_target(target.config, "drafter settings")
        model = cls(cfg).init_weights(seed)
        dtype = dtype or target.dtype
        model.to(device=target.device, dtype=dtype)
        model.attach(target, dtype)
        return model

    def attach(self, target: "TargetModel", dtype: torch.dtype | None = None) -> None:
        """Share `target`'s embedding and LM head (frozen; cast only if the dtype differs)."""
        t = target.transformer
        dtype = dtype or t.embed_weight.dtype
        self.shared = SharedWeights(embed=t.embed_weight.detach().to(dtype),
                                    lm_head=t.lm_head_weight.detach().to(dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    # ---- pieces ------------------------------------------------------------------------------------

    def _shared(self) -> SharedWeights:
        if self.shared is None:
            raise RuntimeError("Eagle3Model has no embedding/LM head: call attach(target) first")
        return self.shared

    def fuse(self, target_hidden: Tensor) -> Tensor:
        """target_hidden [..., L, H] (taps in target_layer_ids order) -> fused features g [..., H]."""
        return self.fc(target_hidden.reshape(*target_hidden.shape[:-2], -1).to(self.dtype))

    def row_inputs(self, ids: Tensor, features: Tensor) -> Tensor:
        """ids [...] (the row's token), features [..., H] (g or the drafter's own h) -> [..., H]."""
        e = F.embedding(ids, self._shared().embed)
        return self.in_proj(torch.cat([self.embed_norm(e), self.hidden_norm(features.to(self.dtype))], dim=-1))

    def logits(self, hidden: Tensor) -> Tensor:
        """h [..., H] (before `norm`) -> next-token logits [..., V] float32 via the target's LM head."""
        return F.linear(self.norm(hidden), self._shared().lm_head).float()

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin `[..., S, 1, D]` for integer positions `[..., S]` (tables grown on demand)."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        cos = self._rope_cos
        if cos.shape[0] < need or cos.dtype != self.dtype or cos.device != self.device:
            size = max(need, 2 * cos.shape[0], 256)
            with torch.inference_mode(False):  # training saves these for backward
                self._rope_cos, self._rope_sin = rope_tables(self._inv_freq.to(self.device), size, self.dtype)
        return self._rope_cos[positions].unsqueeze(-2), self._rope_sin[positions].unsqueeze(-2)

    def run_layers(self, x: Tensor, positions: Tensor, kv: KeyValueSource, mask: Tensor) -> Tensor:
        """Decoder layers over rows x [b, S, H] at positions [b, S]; `kv` returns each layer's full
        keys/values [b, Hkv, kv_len, D] given the new ones; mask [b, 1, S, kv_len] bool (True = may
        attend). Returns h [b, S, H] before the final norm (what later steps feed back)."""
        cos, sin = self.rope(positions)
        b, s, _ = x.shape
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            hn = layer.input_layernorm(x)
            q = a.query(hn, cos, sin)
            keys, values = kv(i, *a.keys_values(hn, cos, sin))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 enable_gqa=a.Hq != a.Hkv)  # [b, Hq, S, D]
            x = x + a.o_proj(out.transpose(1, 2).reshape(b, s, a.Hq * a.D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

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
        cfg = self.config
        B, T = input_ids.shape
        A, G = anchors.shape[1], cfg.block_size
        dev = input_ids.device
        if anchor_mask is None:
            anchor_mask = torch.ones(B, A, dtype=torch.bool, device=dev)
        if loss_mask is None:
            loss_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
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
        label_pos = block_label_positions(anchors, G)  # [B, A, G]
        safe = label_pos.clamp(max=T - 1).view(B, A * G)
        labels = input_ids.gather(1, safe).view(B, A, G)
        valid = (label_pos < T) & loss_mask.gather(1, safe).view(B, A, G) & anchor_mask.unsqueeze(-1)
        valid = valid.long().cumprod(dim=-1).bool()  # a block stops at its first unsupervised position
        return DraftTrainOutput(logits=logits, base_logits=logits, hidden=hidden, confidence_logits=None,
                                labels=labels, label_mask=valid)

    forward = forward_train  # so DistributedDataParallel(model)(...) runs the training forward

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_pretrained(self, out: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write `config.json` + `model.safetensors` (without the target's embedding / LM head)."""
        from safetensors.torch import save_file

        from dspark.train.checkpoint import atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dtype = dtype or self.dtype
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / WEIGHTS_FILE)
        atomic_write_text(out / "config.json", json.dumps(self.config.to_json_dict(dtype), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, target: "TargetModel", dtype: torch.dtype | None = None) -> "Eagle3Model":
        """Read a drafter directory written by `save_pretrained` for `target`."""
        from dspark.models.loader import _Weights

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"missing file config.json in drafter directory {path}")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        cfg = Eagle3Config.from_json_dict(raw, str(cfg_file))
        cfg.check_target(target.config, str(cfg_file))
        model = cls(cfg)
        weights = _Weights(path)
        try:
            with torch.no_grad():
                expected = model.state_dict()
                for key, param in expected.items():
                    param.copy_(weights.get(key, tuple(param.shape), param.dtype, param.device))
                extra = sorted(set(weights.key_to_file) - set(expected) - set(SHARED_KEYS))
                if extra:
                    warnings.warn(f"{path}: ignoring {len(extra)} unknown drafter tensor(s): {', '.join(extra[:5])}",
                                  stacklevel=2)
        finally:
            weights.close()
        dtype = dtype or target.dtype
        model.to(device=target.device, dtype=dtype)
        model.requires_grad_(False)
        model.eval()
        model.attach(target, dtype)
        return model


# ---------------------------------------------------------------------------------------------------
# The drafter the engine talks to


@register_drafter("eagle3", architectures=(ARCHITECTURE,))
class Eagle3Drafter:
    """`Drafter` over an `Eagle3Model`, with a per-sequence cache of the draft layers' keys/values.

    Cache row i of a sequence is [x_{i+1} ; g_i]; the cache holds exactly the rows whose target
    features are known and whose token is accepted, so after the prefill of n tokens it holds rows
    0..n-2 and the last feature g_{n-1} waits (`_pending`) for the token that follows it: the next
    anchor. `propose` appends its γ rows as scratch and rolls them back; `commit` appends the rows
    of the accepted tokens, recomputed from the target's features, as training computes them.
    """

    name = "eagle3"

    def __init__(self, model: Eagle3Model, max_seqs: int, max_len: int) -> None:
        cfg = model.config
        self.model = model
        self.config = cfg
        self.block_size = cfg.block_size
        self.target_layer_ids = list(cfg.target_layer_ids)
        self.cache = KVCache(cfg.num_hidden_layers, max_seqs, max_len + cfg.block_size,
                             cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device)
        # g of the last position with known target features, per cache slot: [max_seqs, H]
        self._pending = torch.zeros(max_seqs, cfg.hidden_size, dtype=model.dtype, device=model.device)
        self._slots: dict[int, int] = {}  # engine slot -> cache slot

    @classmethod
    def from_pretrained(cls, path: str | Path | None, target: "TargetModel", max_seqs: int,
                        max_len: int) -> "Eagle3Drafter":
        if path is None:
            raise CheckpointError("the eagle3 drafter needs a trained drafter directory, not a bare name")
        return cls(Eagle3Model.load(path, target), max_seqs, max_len)

    def save_pretrained(self, out: str | Path) -> Path:
        return self.model.save_pretrained(out)

    # ---- Drafter protocol ---------------------------------------------------------------------------

    def add_sequence(self, slot: int, prompt_ids: list[int], target_hidden: Tensor | None) -> None:
        if slot in self._slots:
            raise CacheError(f"drafter: slot {slot} is already tracked (free it first)")
        self._slots[slot] = self.cache.allocate()
        try:
            # Row i pairs g_i with x_{i+1}: the prompt's own tokens after the first, then the anchor.
            self._append_rows(slot, list(prompt_ids[1:]), target_hidden, len(prompt_ids), first=True)
        except Exception:
            self.free(slot)
            raise

    def commit(self, slot: int, accepted_ids: list[int], target_hidden: Tensor | None) -> None:
        self._append_rows(slot, list(accepted_ids), target_hidden, len(accepted_ids), first=False)

    def free(self, slot: int) -> None:
        cslot = self._slots.pop(slot, None)
        if cslot is not None:
            self.cache.free(cslot)

    def propose(
        self,
        slots: list[int],
        anchors: list[int],
        gamma: int,
        sampling: SamplingTensors,
        generators: list[torch.Generator | None],
    ) -> DraftProposal:
        d = self.draft_steps(slots, anchors, gamma, sampling, generators)
        return DraftProposal(token_ids=d.token_ids, probs=d.probs, confidence=None)

    # ---- internals -----------------------------------------------------------------------------------

    def _cslot(self, slot: int) -> int:
        if slot not in self._slots:
            raise CacheError(f"drafter: slot {slot} is not tracked (call add_sequence first)")
        return self._slots[slot]

    @torch.inference_mode()
    def _append_rows(self, slot: int, ids: list[int], target_hidden: Tensor | None, n: int, first: bool) -> None:
        """Features of `n` new positions arrived: append one row per token in `ids`, pairing it with
        the feature before it (the pending one first, unless this is the prompt), and keep the last
        feature pending."""
        cslot = self._cslot(slot)
        L = len(self.target_layer_ids)
        if target_hidden is None:
            raise ValueError(f"the eagle3 drafter needs the target's hidden states (layers "
                             f"{self.target_layer_ids}); got None")
        if target_hidden.dim() != 3 or target_hidden.shape[0] != n or target_hidden.shape[1] != L:
            raise ValueError(f"target_hidden must be [{n}, {L}, hidden] (one row per token, one tap per "
                             f"target layer id), got {tuple(target_hidden.shape)}")
        model = self.model
        g = model.fuse(target_hidden.to(model.device))  # [n, H]
        feats = g[:-1] if first else torch.cat([self._pending[cslot, None], g[:-1]])  # [len(ids), H]
        if ids:
            batch = self.cache.prepare([cslot], [len(ids)], max_position=self.cache.max_len)
            model.run_cached(self.cache, batch, torch.tensor([ids], device=model.device), feats.unsqueeze(0))
            self.cache.commit(batch)
        self._pending[cslot] = g[-1]

    @torch.inference_mode()
    def draft_steps(
        self,
        slots: list[int],
        anchors: list[int],
        gamma: int,
        sampling: SamplingTensors,
        generators: list[torch.Generator | None],
    ) -> BlockDraft:
        """γ sequential steps for every slot; each step appends one scratch row per slot, and all of
        them are rolled back at the end (the accepted ones come back through `commit`)."""
        G = self.block_size
        if not 1 <= gamma <= G:
            raise ValueError(f"gamma={gamma} is outside [1, {G}] (the drafter's block_size)")
        if len(anchors) != len(slots) or len(generators) != len(slots):
            raise ValueError(f"need one anchor and one generator per slot: {len(slots)} slots, "
                             f"{len(anchors)} anchors, {len(generators)} generators")
        model = self.model
        dev = model.device
        n = len(slots)
        cslots = [self._cslot(s) for s in slots]
        starts = [self.cache.length(c) for c in cslots]
        greedy = list(sampling.greedy)
        all_greedy = all(greedy)
        prev = torch.tensor(anchors, dtype=torch.long, device=dev)  # [n]
        feats = self._pending[torch.tensor(cslots, device=dev)]  # [n, H] g_{p-1}, then the drafter's h
        tokens, step_logits, step_probs = [], [], []
        try:
            for _ in range(gamma):
                batch = self.cache.prepare(cslots, [1] * n, max_position=self.cache.max_len)
                h = model.run_cached(self.cache, batch, prev[:, None], feats[:, None])[:, 0]  # [n, H]
                self.cache.commit(batch)  # advance so the next step sees this row; rolled back below
                logits_k = model.logits(h)  # [n, V]
                if all_greedy:
                    tok = logits_k.argmax(dim=-1)
                else:
                    probs_k = logits_to_probs(logits_k, sampling.temperature, sampling.top_k, sampling.top_p)
                    tok = sample_from_probs(probs_k, generators, greedy)
                    step_probs.append(probs_k)
                tokens.append(tok)
                step_logits.append(logits_k)
                prev, feats = tok, h
        finally:
            for c, s in zip(cslots, starts):
                self.cache.truncate(c, s)
        logits = torch.stack(step_logits, dim=1)  # [n, gamma, V]
        return BlockDraft(token_ids=torch.stack(tokens, dim=1), logits=logits, base_logits=logits,
                          probs=None if all_greedy else torch.stack(step_probs, dim=1), confidence=None)
