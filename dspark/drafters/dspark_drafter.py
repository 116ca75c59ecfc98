"""The DSpark drafter (paper §3.1): a parallel DFlash-style backbone plus a cheap sequential head.

Math and I/O of the drafter checkpoint live here; the engine only sees the `Drafter` protocol.

    drafter = DSparkDrafter.from_pretrained("runs/drafter", target, max_seqs=8, max_len=4096)
    model = DSparkModel.from_target(DSparkConfig.for_target(target.config, mask_token_id=...), target)
    out = model.forward_train(target_hidden, input_ids, anchors, anchor_mask, loss_mask)   # training

Architecture (parameter names follow DeepSpec's `Qwen3DSparkModel`, so checkpoints interchange):
  * context features: `hidden_norm(fc(concat of the target's hidden states at target_layer_ids))`,
    one vector per sequence position whose target features are known;
  * every draft layer (`layers.N`, Qwen3-style: q/k RMSNorm, SwiGLU, pre-norm) projects the context
    features with its own `k_proj`/`v_proj` (+ `k_norm`, RoPE at the context position) into extra
    keys/values; the block (anchor + γ−1 mask tokens, embedded with the target's frozen embedding, at
    positions p..p+γ−1) attends to all context positions < p and bidirectionally to itself;
  * `norm`, then the target's LM head -> base logits U_1..U_γ (the anchor is prediction position 1);
  * sequential head (`markov_head`): a transition bias B_k from the previous token, sampled left to
    right, p_k = softmax(U_k + B_k) after the request's temperature/top-k/top-p;
  * confidence head (`confidence_head.proj`): c_k = σ(wᵀ[h_k; W1[x_{k−1}]]).

Symbols in shape comments:
    B  sequences in a training batch       T  training sequence length     A  anchors per sequence
    n  sequences in a propose call         G  block_size (γ)               V  vocabulary
    H  hidden size                         Hq / Hkv  query / key-value heads    D  head_dim
    L  target layers tapped (len(target_layer_ids))                          r  markov_rank
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dspark.drafters.base import DraftCommit, DraftProposal, DraftStop, register_drafter
from dspark.drafters.common import CommitOne, SlotTable, check_propose_args, check_target_hidden, sample_step
from dspark.errors import CheckpointError
from dspark.kv_cache import KVCache
from dspark.models.config import ModelConfig, RopeScaling, _rope
from dspark.drafters import markov_kernel
from dspark.models import int4_gemm, row_attention
from dspark.models.transformer import Int8Linear, PackedLinear, fp16_gemm_available, linear, rms_norm
from dspark.sampling import SamplingTensors

if TYPE_CHECKING:
    from dspark.models import TargetModel

ARCHITECTURE = "Qwen3DSparkModel"
WEIGHTS_FILE = "model.safetensors"
# Sequential Temperature Scaling of the confidence head (`dspark calibrate` writes it next to the
# weights): {"temperatures": [T_1, ..., T_G], ...}; loading applies c_k = σ(z_k / T_k).
CALIBRATION_FILE = "calibration.json"
# Tensors a DeepSpec checkpoint may carry that we take from the target instead.
SHARED_KEYS = ("embed_tokens.weight", "lm_head.weight")
INIT_STD = 0.02  # DeepSpec/transformers `initializer_range`


def read_calibration(path: Path, block_size: int) -> list[float] | None:
    """The confidence temperatures stored in drafter directory `path`, or None when it has none.
    A file that is there but unusable is an error naming it and the key."""
    f = Path(path) / CALIBRATION_FILE
    if not f.is_file():
        return None
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    temps = raw.get("temperatures") if isinstance(raw, dict) else None
    if not isinstance(temps, list) or not temps:
        raise CheckpointError(f"{f}: missing key 'temperatures' (a list of one temperature per draft position)")
    if len(temps) != block_size:
        raise CheckpointError(f"{f}: key 'temperatures' has {len(temps)} values; the drafter's block_size is "
                              f"{block_size}")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf") for t in temps):
        raise CheckpointError(f"{f}: key 'temperatures' must hold positive finite numbers, got {temps}")
    return [float(t) for t in temps]


def default_target_layer_ids(num_target_layers: int, num_taps: int = 3) -> list[int]:
    """Evenly spaced target layers to tap, never the last one (its features are too specialised to
    the next token), skipping the first and last two when the target is deep enough.

    8 layers -> [1, 3, 5]; 36 layers, 5 taps -> [1, 9, 17, 25, 33]; 3 layers -> [0, 1].
    """
    L = int(num_target_layers)
    if L < 2:
        return [-1]  # only the embedding output is not the last layer's output
    lo = 1 if L >= 4 else 0
    hi = L - 3 if L >= 6 else L - 2
    n = max(1, min(num_taps, hi - lo + 1))
    if n == 1:
        return [lo]
    return sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)})


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DrafterConfigBase:
    """What the configs of drafters built from `DraftLayer`s share (DSpark/DFlash and EAGLE-3): the
    backbone fields, their checks, their `config.json` spelling and the agreement with the target.

    Subclasses are `@dataclass(kw_only=True)` with their own fields (at least `drafter_type`) and
    `architecture`; they extend `_validate_extra`, and build `from_json_dict` on `_parse_json` and
    `to_json_dict` on `_json_dict`."""

    architecture: ClassVar[str]  # config.json `architectures[0]`
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    block_size: int = 7  # γ, the largest `propose` accepts (EAGLE-3: the TTT horizon)
    num_hidden_layers: int = 1  # draft layers
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    # Reduced draft vocabulary (vLLM's `draft_vocab_size` + `d2t`): the drafter predicts only these
    # many target tokens (the `d2t` buffer says which); None = the whole target vocabulary.
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if self.draft_vocab_size is not None and int(self.draft_vocab_size) == int(self.vocab_size):
            self.draft_vocab_size = None  # the whole vocabulary is not a reduction

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size is not None

    @property
    def draft_vocab(self) -> int:
        """Size of the distribution the drafter predicts: draft_vocab_size, else the target's vocabulary."""
        return int(self.draft_vocab_size) if self.draft_vocab_size is not None else int(self.vocab_size)

    def validate(self, source: str = "drafter config") -> None:
        """Raise CheckpointError naming `source` and the offending key."""

        def bad(key: str, msg: str) -> None:
            raise CheckpointError(f"{source}: {key}={getattr(self, key)!r} {msg}")

        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "vocab_size", "num_target_layers", "num_hidden_layers", "block_size"):
            if int(getattr(self, key)) < 1:
                bad(key, "must be >= 1")
        if self.draft_vocab_size is not None and not 1 <= int(self.draft_vocab_size) <= int(self.vocab_size):
            bad("draft_vocab_size", f"must be in [1, vocab_size={self.vocab_size}]")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"is not a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even (RoPE rotates pairs)")
        if not self.target_layer_ids:
            bad("target_layer_ids", "must not be empty")
        for prev, cur in zip(self.target_layer_ids, self.target_layer_ids[1:]):
            if cur <= prev:
                bad("target_layer_ids", "must be strictly increasing")
        for i in self.target_layer_ids:
            if not -1 <= i < self.num_target_layers:
                bad("target_layer_ids", f"has {i}, outside [-1, {self.num_target_layers - 1}] "
                                        f"(num_target_layers={self.num_target_layers}; -1 = embedding)")
        self._validate_extra(bad)

    def _validate_extra(self, bad: Callable[[str, str], None]) -> None:
        """Checks of the subclass's own fields; `bad(key, msg)` raises."""

    @classmethod
    def for_target(cls, target: ModelConfig, **overrides: Any) -> Any:
        """A drafter shaped like `target` (same width, heads, RoPE, vocabulary; DSpark's default taps),
        with `overrides` (None values ignored)."""
        kw: dict[str, Any] = dict(
            hidden_size=target.hidden_size,
            num_attention_heads=target.num_heads,
            num_key_value_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            intermediate_size=target.intermediate_size,
            vocab_size=target.vocab_size,
            num_target_layers=target.num_layers,
            target_layer_ids=default_target_layer_ids(target.num_layers),
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**kw)
        cfg.validate("drafter settings")
        return cfg

    def backbone(self) -> ModelConfig:
        """The draft layers' shape as a target-style `ModelConfig` (RoPE frequencies come from it)."""
        return ModelConfig(
            architecture=self.architecture, model_type="qwen3", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers, num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            qk_norm=True, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
            rope_scaling=self.rope_scaling,
        )

    def _json_dict(self, dtype: torch.dtype, model_type: str, own: dict[str, Any]) -> dict[str, Any]:
        """`config.json`: identification, block and taps, the subclass's `own` keys, then the backbone
        (key order as the files have always been written)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "drafter_type": self.drafter_type,
            "model_type": model_type,
            "block_size": self.block_size,
            "target_layer_ids": list(self.target_layer_ids),
            "num_target_layers": self.num_target_layers,
            **own,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            **({"draft_vocab_size": self.draft_vocab_size} if self.reduced_vocab else {}),
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
    def _parse_json(cls, raw: Mapping[str, Any], source: str,
                    own: Callable[[Callable[[str], Any]], dict[str, Any]]) -> Any:
        """Build from a `config.json`: the backbone fields here, the subclass's from `own(req)` (`req`
        reads a required key). Errors name `source` and the key."""

        def req(key: str) -> Any:
            if raw.get(key) is None:
                raise CheckpointError(f"{source}: missing required key {key!r}")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        theta, scaling = _rope(raw, source)
        try:
            heads = int(req("num_attention_heads"))
            hidden = int(req("hidden_size"))
            cfg = cls(
                hidden_size=hidden,
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                intermediate_size=int(req("intermediate_size")),
                vocab_size=int(req("vocab_size")),
                num_target_layers=int(req("num_target_layers")),
                target_layer_ids=list(req("target_layer_ids")),
                block_size=int(req("block_size")),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
                attention_bias=bool(raw.get("attention_bias", False)),
                draft_vocab_size=None if raw.get("draft_vocab_size") is None else int(raw["draft_vocab_size"]),
                **own(req),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
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


# Sequential-head names: DeepSpec writes "vanilla" / "gated" / "rnn"; the paper's words are accepted too.
HEAD_ALIASES = {"markov": "vanilla", "vanilla": "vanilla", "gated_markov": "gated", "gated": "gated", "rnn": "rnn",
                "joint": "joint"}


@dataclass(kw_only=True)
class DSparkConfig(DrafterConfigBase):
    """A DSpark (or DFlash: markov_rank=0) drafter, with DeepSpec's `config.json` field names."""

    architecture: ClassVar[str] = ARCHITECTURE
    mask_token_id: int
    markov_rank: int = 256  # 0 = no sequential head (DFlash)
    markov_head_type: str = "vanilla"  # "vanilla"/"markov", "gated"/"gated_markov", "rnn"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    num_anchors: int = 512  # training only (anchors per sequence); kept for DeepSpec compatibility
    drafter_type: str = "dspark"
    # This project's extension (not in DeepSpec, vLLM or SGLang): every block input also gets
    # `block_context_proj(feature of the last context position)`, the target's features in the block's
    # residual stream (as EAGLE-3's layer input has them), not only in the draft layers' keys/values.
    block_context: bool = False
    # This project's extension too: context position i's features also read the token after it,
    # hidden_norm(fc(taps_i) + next_token_proj(embed(x_{i+1}))), as EAGLE-3's context rows pair g_i with
    # x_{i+1}; a position's keys and values are then written once the token after it is known.
    context_next_token: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.markov_head_type = HEAD_ALIASES.get(str(self.markov_head_type), str(self.markov_head_type))
        if self.markov_rank <= 0 and self.enable_confidence_head:
            # Without a sequential head there is no W1[x_{k-1}] to feed the confidence head.
            self.confidence_head_with_markov = False

    def _validate_extra(self, bad: Callable[[str, str], None]) -> None:
        if not 0 <= self.mask_token_id < self.vocab_size:
            bad("mask_token_id", f"must be a token id in [0, {self.vocab_size})")
        if self.markov_rank < 0:
            bad("markov_rank", "must be >= 0 (0 = no sequential head)")
        if self.markov_rank > 0 and self.markov_head_type not in SEQUENTIAL_HEADS:
            bad("markov_head_type", f"is not one of {sorted(HEAD_ALIASES)}")
        if self.confidence_head_with_markov and self.enable_confidence_head and self.markov_rank <= 0:
            bad("confidence_head_with_markov", "needs markov_rank > 0")

    @property
    def has_sequential_head(self) -> bool:
        return self.markov_rank > 0

    @classmethod
    def for_target(cls, target: ModelConfig, mask_token_id: int, **overrides: Any) -> "DSparkConfig":
        """A drafter shaped like `target` (same width, heads, RoPE, vocabulary), with `overrides`."""
        return super().for_target(target, mask_token_id=mask_token_id, **overrides)

    def to_json_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The `config.json` DeepSpec writes: a Qwen3 config plus the drafter fields."""
        return self._json_dict(dtype, "qwen3", {
            "mask_token_id": self.mask_token_id,
            "markov_rank": self.markov_rank,
            "markov_head_type": self.markov_head_type,
            "enable_confidence_head": self.enable_confidence_head,
            "confidence_head_with_markov": self.confidence_head_with_markov,
            "num_anchors": self.num_anchors,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            **({"block_context": True} if self.block_context else {}),
            **({"context_next_token": True} if self.context_next_token else {}),
        })

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, Any], source: str = "config.json",
                       default_mask_token_id: int | None = None) -> "DSparkConfig":
        """Parse a DeepSpec-layout `config.json`; errors name `source` and the key."""

        def own(req: Callable[[str], Any]) -> dict[str, Any]:
            mask = raw.get("mask_token_id", default_mask_token_id)
            if mask is None:
                raise CheckpointError(f"{source}: missing required key 'mask_token_id' (and the target's "
                                      "tokenizer has no mask token)")
            rank = int(raw.get("markov_rank", 0) or 0)
            conf = bool(raw.get("enable_confidence_head", False))
            return dict(
                mask_token_id=int(mask),
                num_hidden_layers=int(req("num_hidden_layers")),
                markov_rank=rank,
                markov_head_type=str(raw.get("markov_head_type", "vanilla")),
                enable_confidence_head=conf,
                confidence_head_with_markov=bool(raw.get("confidence_head_with_markov", False)) and conf,
                num_anchors=int(raw.get("num_anchors", 512)),
                drafter_type=str(raw.get("drafter_type") or ("dspark" if rank > 0 else "dflash")),
                block_context=bool(raw.get("block_context", False)),
                context_next_token=bool(raw.get("context_next_token", False)),
            )

        return cls._parse_json(raw, source, own)


# ---------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(inv_freq: Tensor, num_positions: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos / sign-folded sin `[num_positions, D]`, the convention of `dspark.models.transformer`:
    rotate_half(x) * sin == roll(x, D/2) * sin_folded, so RoPE is two multiplies and a roll."""
    pos = torch.arange(num_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq[None, :]  # [num_positions, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, : inv_freq.shape[0]] *= -1
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [..., S, heads, D]; cos, sin: [..., S, 1, D]
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class DraftAttention(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.Hq, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.Hq * self.D, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.Hkv * self.D, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.Hkv * self.D, bias=b)
        self.o_proj = nn.Linear(self.Hq * self.D, cfg.hidden_size, bias=b)
        self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps)

    def keys_values(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values of `x` [b, S, H] at the positions of cos/sin [b, S, 1, D] -> [b, S, Hkv, D] each.

        The same projection serves block tokens and context features (DeepSpec's k_proj on both)."""
        b, s, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, s, self.Hkv, self.D))
        v = self.v_proj(x).view(b, s, self.Hkv, self.D)
        return apply_rope(k, cos, sin), v

    def query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.Hq, self.D))
        return apply_rope(q, cos, sin)  # [b, S, Hq, D]


class DraftMLP(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# Given (layer index, new keys, new values) [b, S, Hkv, D], return every key/value the block attends
# to, [b, Hkv, kv_len, D]: context first (or wherever the mask says), block included.
KeyValueSource = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]
# Given (layer index, queries [b, S, Hq, D], new keys, new values [b, S, Hkv, D]), return the layer's
# attention output [b, S, Hq * D] (stores the new keys/values wherever the caller keeps them).
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------
# Sequential heads: B_k from the tokens already drafted in the block


class SequentialHead(Protocol):
    """A transition bias added to the base logits, left to right (teacher-forced in training)."""

    markov_w1: nn.Embedding  # [V, r] previous-token embedding, also read by the confidence head

    def init_state(self, n: int, like: Tensor) -> Tensor | None: ...

    def step(self, prev_ids: Tensor, hidden: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """prev_ids [n], hidden h_k [n, H] -> (bias B_k [n, V], next state)."""
        ...

    def block(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        """Teacher forcing: prev_ids [..., G] (x_0..x_{G-1}), hidden [..., G, H] -> bias [..., G, V]."""
        ...


SEQUENTIAL_HEADS: dict[str, type] = {}


def _register_head(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        SEQUENTIAL_HEADS[name] = cls
        return cls
    return deco


@_register_head("vanilla")
class MarkovHead(nn.Module):
    """B(x_{k-1}, ·) = W1[x_{k-1}] W2: a rank-r bigram transition (paper eq. 5)."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(cfg.vocab_size, cfg.markov_rank)
        # Previous tokens are target ids (the anchor may be any token); the bias covers the draft vocabulary.
        self.markov_w2 = nn.Linear(cfg.markov_rank, cfg.draft_vocab, bias=False)

    def init_state(self, n: int, like: Tensor) -> Tensor | None:
        return None

    def bias(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        return self.markov_w2(self.markov_w1(prev_ids))

    def step(self, prev_ids: Tensor, hidden: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.bias(prev_ids, hidden), None

    def block(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        return self.bias(prev_ids, hidden)  # memoryless, so the whole block at once


@_register_head("gated")
class GatedMarkovHead(MarkovHead):
    """The Markov bias with its rank-r embedding scaled per dimension by a gate read from the block:
    g = σ(gate_proj([h_k; W1[x_{k-1}]])), B_k = (g ⊙ W1[x_{k-1}]) W2. The backbone can then switch the
    bigram off where the context already settles the token (as DeepSpec's "gated" head does)."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__(cfg)
        self.gate_proj = nn.Linear(cfg.hidden_size + cfg.markov_rank, cfg.markov_rank)

    def bias(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        e = self.markov_w1(prev_ids)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, e.to(hidden.dtype)], dim=-1)))
        return self.markov_w2(gate.to(e.dtype) * e)


@_register_head("rnn")
class RNNHead(MarkovHead):
    """Paper eq. 6: z_k = [s_{k-1}; W1[x_{k-1}]; h_k]; one projection split into gate, candidate and
    output; s_k = σ(g) ⊙ s_{k-1} + (1 − σ(g)) ⊙ tanh(c); B_k = W2ᵀ tanh(o); s_0 = 0."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__(cfg)
        self.rank = cfg.markov_rank
        self.joint_proj = nn.Linear(2 * cfg.markov_rank + cfg.hidden_size, 3 * cfg.markov_rank)

    def init_state(self, n: int, like: Tensor) -> Tensor | None:
        return like.new_zeros(n, self.rank)

    def step(self, prev_ids: Tensor, hidden: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert state is not None
        e = self.markov_w1(prev_ids).to(hidden.dtype)
        g, c, o = self.joint_proj(torch.cat([state, e, hidden], dim=-1)).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        state = g * state + (1 - g) * torch.tanh(c)
        return self.markov_w2(torch.tanh(o)), state

    def block(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        lead = prev_ids.shape[:-1]
        G = prev_ids.shape[-1]
        flat_ids = prev_ids.reshape(-1, G)  # [N, G]
        flat_h = hidden.reshape(-1, G, hidden.shape[-1])  # [N, G, H]
        state = self.init_state(flat_ids.shape[0], flat_h)
        out = []
        for k in range(G):
            b, state = self.step(flat_ids[:, k], flat_h[:, k], state)
            out.append(b)
        return torch.stack(out, dim=1).reshape(*lead, G, -1)


@_register_head("joint")
class JointMarkovHead(MarkovHead):
    """This project's head (not in the paper or the engines): the Markov bias plus a correction in the
    hidden space read jointly from the backbone state and the previous token, through the target's LM
    head: δ_k = down(silu(up([h_k; W1[x_{k-1}]]))), B_k = W1[x_{k-1}] W2 + LM(δ_k). The vanilla bias is
    the same for every context; here the previous token's effect can depend on what h_k says."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__(cfg)
        width = 8 * cfg.markov_rank
        self.up = nn.Linear(cfg.hidden_size + cfg.markov_rank, width, bias=False)
        self.down = nn.Linear(width, cfg.hidden_size, bias=False)
        # the drafter's LM head, set by DSparkModel (a function, not a submodule: no weights of its own)
        self.lm_head: Callable[[Tensor], Tensor] | None = None

    def bias(self, prev_ids: Tensor, hidden: Tensor) -> Tensor:
        assert self.lm_head is not None
        e = self.markov_w1(prev_ids)
        delta = self.down(F.silu(self.up(torch.cat([hidden, e.to(hidden.dtype)], dim=-1))))
        return self.markov_w2(e) + self.lm_head(delta).to(e.dtype)


class ConfidenceHead(nn.Module):
    """c_k = σ(wᵀ[h_k; W1[x_{k-1}]]) (paper eq. 7), or σ(wᵀh_k) without the Markov embedding."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features).squeeze(-1).float()  # logits; σ of them is c_k


# ---------------------------------------------------------------------------------------------------
# The model


def _packed_linear_forward(mod: nn.Linear, packed: PackedLinear, x: Tensor) -> Tensor:
    return linear(x, mod.weight, mod.bias, packed)


def quantize_q8_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A float weight [N, K] (K a multiple of 32) in GGUF Q8_0's form: int8 codes [N, K] and a scale per
    group of 32 [N, K / 32], d = max|w| / 127, codes = round(w / d)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // 32, 32)
    d = w.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.round(w * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).reshape(n, k)
    return codes, d.contiguous()


def _int8_linear_forward(mod: nn.Linear, q8: Int8Linear, x: Tensor) -> Tensor:
    # inference on the int8 GEMM; training (grad enabled) and other devices/dtypes on the float weights
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, mod.weight, mod.bias)
    y = q8(x)
    return y if mod.bias is None else y + mod.bias


@dataclass
class SharedWeights:
    """The target's embedding and LM head: frozen, shared, never saved with the drafter."""

    embed: Tensor  # [V, H]
    lm_head: Tensor  # [V, H]
    # The target's LM head packed for the fp16-weight GEMM (inference only), when the target has one.
    packed_lm_head: PackedLinear | None = None

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head over hidden [..., H] -> [..., V] in the weights' dtype."""
        return linear(hidden, self.lm_head, None, self.packed_lm_head)


@dataclass
class DraftTrainOutput:
    """Everything the losses need from one training forward (all A blocks of each sequence)."""

    logits: Tensor  # [B, A, G, V] float32: U_k + B_k, with B_k teacher-forced on the ground truth
    base_logits: Tensor  # [B, A, G, V] float32: U_k
    hidden: Tensor  # [B, A, G, H] h_k (after the final norm)
    confidence_logits: Tensor | None  # [B, A, G]; c_k = sigmoid of these
    labels: Tensor  # [B, A, G] long: input_ids[anchor + k]
    label_mask: Tensor  # [B, A, G] bool: a contiguous prefix of each block, False past the data


@dataclass
class BlockDraft:
    """One `draft_block` call (DSpark or EAGLE-3): a `DraftProposal` plus the logits behind it."""

    token_ids: Tensor  # [n, gamma] long target ids
    # Logits are over the draft vocabulary (Vd = V unless it is reduced; draft id d is the target's
    # `draft_ids[d]`); probs are over the target's vocabulary, zero outside the draft vocabulary.
    logits: Tensor  # [n, gamma, Vd] float32: U_k + B_k(x_{k-1}) for the drafted x_{k-1}
    base_logits: Tensor  # [n, gamma, Vd] float32
    probs: Tensor | None  # [n, gamma, V] float32 sampling distribution; None if all rows greedy
    confidence: Tensor | None  # [n, gamma]
    confidence_logits: Tensor | None = None  # [n, gamma] raw, before calibration

    def proposal(self) -> DraftProposal:
        return DraftProposal(token_ids=self.token_ids, probs=self.probs, confidence=self.confidence,
                             confidence_logits=self.confidence_logits)


def block_label_positions(anchors: Tensor, block_size: int) -> Tensor:
    """Sequence positions each block predicts: anchors [..., A] -> [..., A, G] = anchor + 1..G.
    The target's own prediction for position j sits at its logits row j - 1."""
    return anchors.unsqueeze(-1) + torch.arange(1, block_size + 1, device=anchors.device)


def default_train_masks(input_ids: Tensor, anchors: Tensor, anchor_mask: Tensor | None,
                        loss_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """`forward_train`'s optional masks, all-True where not given: anchor_mask [B, A], loss_mask [B, T]."""
    if anchor_mask is None:
        anchor_mask = torch.ones(anchors.shape, dtype=torch.bool, device=input_ids.device)
    if loss_mask is None:
        loss_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return anchor_mask, loss_mask


def block_labels(input_ids: Tensor, anchors: Tensor, anchor_mask: Tensor, loss_mask: Tensor,
                 block_size: int) -> tuple[Tensor, Tensor]:
    """What each block's k-th prediction is trained on: (labels [B, A, G] long = input_ids[anchor + k],
    label_mask [B, A, G] bool). A block is supervised up to its first position past the data, outside
    `loss_mask` or of a padding anchor, and not after it."""
    B, T = input_ids.shape
    A, G = anchors.shape[1], block_size
    label_pos = block_label_positions(anchors, G)  # [B, A, G]
    safe = label_pos.clamp(max=T - 1).view(B, A * G)
    labels = input_ids.gather(1, safe).view(B, A, G)
    valid = (label_pos < T) & loss_mask.gather(1, safe).view(B, A, G) & anchor_mask.unsqueeze(-1)
    return labels, valid.long().cumprod(dim=-1).bool()


class FeatureDrafterModel(nn.Module):
    """Weights plumbing of drafters conditioned on the target's hidden states and sharing its
    embedding and LM head (DSpark/DFlash, EAGLE-3): initialisation, attaching to a target, RoPE,
    the draft layers, and the `config.json` + `model.safetensors` checkpoint.

    Subclasses set `config_class`, register their parameters (at least `fc`, `layers`, `norm`) after
    `super().__init__`, and say how their config is read in `_config_from_json`."""

    # Tensors a checkpoint may lack, zero-filled then (some exporters drop this bias).
    OPTIONAL_ZERO_KEYS: tuple[str, ...] = ()

    def __init__(self, cfg: Any, shared: SharedWeights | None = None) -> None:
        super().__init__()
        self.config = cfg
        # A plain attribute (not a Parameter): excluded from state_dict, optimiser and DDP.
        self.shared = shared
        # RoPE tables are plain attributes, not buffers: each process grows them on demand, so there
        # is nothing for DDP to synchronise and nothing to save.
        self._inv_freq = cfg.backbone().rope_inv_freq()
        self._rope_cos = self._rope_sin = torch.empty(0)
        self._target_lm_head: tuple[Tensor, PackedLinear | None] | None = None  # the full head, for re-slicing
        if cfg.reduced_vocab:
            # vLLM's convention: draft id d is target id d + d2t[d] (saved with the weights).
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab, dtype=torch.long))

    # ---- construction ------------------------------------------------------------------------------

    def init_weights(self, seed: int = 0) -> Any:
        """DeepSpec's initialisation (normal(0, 0.02) linears and embeddings, zero biases, unit norms),
        drawn from a private generator so the result depends on `seed` only."""
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
    def from_target(cls, cfg: Any, target: "TargetModel", seed: int = 0, dtype: torch.dtype | None = None) -> Any:
        """A freshly initialised drafter sharing `target`'s embedding and LM head."""
        cfg.check_target(target.config, "drafter settings")
        model = cls(cfg).init_weights(seed)
        dtype = dtype or target.dtype
        model.to(device=target.device, dtype=dtype)
        model.attach(target, dtype)
        return model

    def attach(self, target: "TargetModel", dtype: torch.dtype | None = None) -> None:
        """Share `target`'s embedding and LM head (cast to `dtype` if it differs; no copy otherwise)."""
        from dspark.bundled import fingerprint_fields

        t = target.transformer
        dtype = dtype or t.embed_weight.dtype
        # Written into config.json on save, so the drafter is only picked for the target it was made for.
        self.target_fields = fingerprint_fields(target)
        self._target_lm_head = (t.lm_head_weight.detach().to(dtype),
                                t.packed_lm_head if dtype == t.lm_head_weight.dtype else None)
        self.shared = SharedWeights(embed=t.embed_weight.detach().to(dtype), lm_head=self._target_lm_head[0],
                                    packed_lm_head=self._target_lm_head[1])
        self._slice_lm_head()

    # ---- reduced draft vocabulary -------------------------------------------------------------------

    @property
    def draft_ids(self) -> Tensor | None:
        """[Vd] long: the target id of each draft id, or None when the drafter predicts the whole vocabulary."""
        if not self.config.reduced_vocab:
            return None
        # Read at every draft position: cached, rebuilt whenever d2t is replaced or written to.
        key = (self.d2t.data_ptr(), self.d2t._version, self.d2t.device)
        cached = self.__dict__.get("_draft_ids")
        if cached is None or cached[0] != key or torch.is_grad_enabled():
            cached = (key, torch.arange(self.config.draft_vocab, device=self.d2t.device) + self.d2t)
            self.__dict__["_draft_ids"] = cached
        return cached[1]

    def set_draft_vocab(self, target_ids: Tensor) -> None:
        """Choose the draft vocabulary: `target_ids` [Vd], distinct target token ids (stored sorted)."""
        cfg = self.config
        if not cfg.reduced_vocab:
            raise ValueError("this drafter predicts the whole vocabulary (draft_vocab_size unset)")
        ids = torch.as_tensor(target_ids, dtype=torch.long).flatten().sort().values
        if ids.numel() != cfg.draft_vocab or ids.unique().numel() != ids.numel():
            raise ValueError(f"the draft vocabulary needs {cfg.draft_vocab} distinct target ids, got {ids.numel()} "
                             f"({ids.unique().numel()} distinct)")
        if int(ids[0]) < 0 or int(ids[-1]) >= cfg.vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {cfg.vocab_size})")
        with torch.no_grad():
            self.d2t.copy_(ids.to(self.d2t.device) - torch.arange(ids.numel(), device=self.d2t.device))
        self._slice_lm_head()

    def _slice_lm_head(self) -> None:
        """The LM head rows of the draft vocabulary (a copy; the target's head when not reduced)."""
        if self.shared is None or self._target_lm_head is None:
            return
        full, packed = self._target_lm_head
        ids = self.draft_ids
        if ids is None:
            self.shared.lm_head, self.shared.packed_lm_head = full, packed
            return
        ids = ids.to(full.device)
        if int(ids.min()) < 0 or int(ids.max()) >= full.shape[0]:
            raise CheckpointError(f"d2t maps draft ids outside the target vocabulary [0, {full.shape[0]})")
        sub = full[ids].contiguous()
        self.shared.lm_head = sub
        if isinstance(packed, Int8Linear):  # the target's Q8_0 head: the same rows on the int8 GEMM
            self.shared.packed_lm_head = packed.rows(ids.to(packed.codes.device))
        else:
            self.shared.packed_lm_head = PackedLinear(sub, None) if packed is not None else None

    def to_target_tokens(self, draft_tokens: Tensor) -> Tensor:
        """Draft ids -> target ids (identity without a reduced vocabulary)."""
        ids = self.draft_ids
        return draft_tokens if ids is None else ids[draft_tokens]

    def to_target_probs(self, probs: Tensor | None) -> Tensor | None:
        """A distribution over the draft vocabulary [..., Vd] -> the same one over the target's [..., V]
        (zero outside the draft vocabulary), which is what verification compares against."""
        ids = self.draft_ids
        if probs is None or ids is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.config.vocab_size)
        out[..., ids] = probs
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    # ---- shared pieces ------------------------------------------------------------------------------

    def _shared(self) -> SharedWeights:
        if self.shared is None:
            raise RuntimeError(f"{type(self).__name__} has no embedding/LM head: call attach(target) first")
        return self.shared

    def embed(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self._shared().embed)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin `[..., S, 1, D]` for integer positions `[..., S]` (tables grown on demand)."""
        self._grow_rope(int(positions.max()) + 1 if positions.numel() else 1)
        return self._rope_cos[positions].unsqueeze(-2), self._rope_sin[positions].unsqueeze(-2)

    def rope_rows(self, positions: Tensor, max_position: int) -> tuple[Tensor, Tensor]:
        """cos, sin `[M, D]` (contiguous, the tables' dtype) for the flat long positions `[M]`, all at
        most `max_position` (known to the caller: no read back of the positions)."""
        self._grow_rope(max_position + 1)
        return self._rope_cos.index_select(0, positions), self._rope_sin.index_select(0, positions)

    def _grow_rope(self, need: int) -> None:
        """Make the cos / sin tables cover positions [0, need) in the model's dtype and device."""
        cos = self._rope_cos
        if cos.shape[0] < need or cos.dtype != self.dtype or cos.device != self.device:
            size = max(need, 2 * cos.shape[0], 256)
            # Normal tensors even when first needed under inference_mode: training saves them for backward.
            with torch.inference_mode(False):
                self._rope_cos, self._rope_sin = rope_tables(self._inv_freq.to(self.device), size, self.dtype)

    def run_layers(self, x: Tensor, positions: Tensor, kv: KeyValueSource | None, mask: Tensor | None,
                   attend: "Attend | None" = None) -> Tensor:
        """The draft layers over inputs x [b, S, H] at positions [b, S], before the final norm.

        `kv` supplies each layer's full key/value set [b, Hkv, kv_len, D] given the new ones; mask
        [b, 1, S|1, kv_len] bool, True = may attend. Or `attend` computes each layer's attention
        itself from its queries and new keys/values (the row kernel at inference, see `Attend`)."""
        cos, sin = self.rope(positions)
        b, s, _ = x.shape
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            hn = layer.input_layernorm(x)
            q = a.query(hn, cos, sin)
            if attend is not None:
                out = attend(i, q, *a.keys_values(hn, cos, sin))  # [b, S, Hq * D]
                x = x + a.o_proj(out)
            else:
                assert kv is not None
                keys, values = kv(i, *a.keys_values(hn, cos, sin))
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=a.Hq != a.Hkv
                )  # [b, Hq, S, D]
                x = x + a.o_proj(out.transpose(1, 2).reshape(b, s, a.Hq * a.D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def pack_fp16_weights(self) -> int:
        """Run this drafter's projections on a packed CPU GEMM at inference: its weights rounded to
        GGUF's Q8_0 (int8 per group of 32) on the int8 GEMM with 8-bit activations where that kernel
        builds (`dspark.models.int4_gemm`: 3-6x faster than the fp16-weight GEMM at the few rows a
        draft block has), else the packed fp16-weight GEMM. Unlike the target's, a drafter's weights
        need not be exact: rounding them changes the proposals slightly, never the output
        distribution, because draft probabilities stay exactly those the tokens are sampled from.
        Training (grad enabled) still runs F.linear on the float32 weights. Returns the number of
        projections packed."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return 0
        q8 = int4_gemm.available()
        if not q8 and not fp16_gemm_available():
            return 0
        n = 0
        for mod in self.modules():
            if not isinstance(mod, nn.Linear) or mod.out_features < 8:
                continue
            if q8 and mod.in_features % 32 == 0:
                packed8 = Int8Linear(*quantize_q8_0(mod.weight), act8=True)
                mod.forward = functools.partial(_int8_linear_forward, mod, packed8)  # type: ignore[method-assign]
                mod.q8 = packed8  # what a fused C layer reads (DSparkModel.c_layers)
            elif fp16_gemm_available():
                packed = PackedLinear(mod.weight, mod.bias)
                mod.forward = functools.partial(_packed_linear_forward, mod, packed)  # type: ignore[method-assign]
            else:
                continue
            n += 1
        return n

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_pretrained(self, out: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write `config.json` + `model.safetensors` (without the target's embedding / LM head)."""
        from dspark.train.checkpoint import atomic_save_safetensors, atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dtype = dtype or self.dtype
        tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in self.state_dict().items()}
        atomic_save_safetensors(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
        raw = {**self.config.to_json_dict(dtype), **getattr(self, "target_fields", {})}
        atomic_write_text(out / "config.json", json.dumps(raw, indent=2) + "\n")
        return out

    @classmethod
    def _config_from_json(cls, raw: Mapping[str, Any], source: str, target: "TargetModel") -> Any:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path, target: "TargetModel", dtype: torch.dtype | None = None) -> Any:
        """Read a drafter directory (ours, or DeepSpec's for DSpark) for `target`, frozen, in eval mode."""
        from safetensors import safe_open

        from dspark.models.loader import _Weights

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"missing file config.json in drafter directory {path}")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        cfg = cls._config_from_json(raw, str(cfg_file), target)
        cfg.check_target(target.config, str(cfg_file))
        model = cls(cfg)
        weights = _Weights(path)
        try:
            with torch.no_grad():
                expected = model.state_dict()
                for key, param in expected.items():
                    if key in cls.OPTIONAL_ZERO_KEYS and not weights.has(key):
                        param.zero_()
                        continue
                    param.copy_(weights.get(key, tuple(param.shape), param.dtype, param.device))
                for key in SHARED_KEYS:  # accepted when present, but the target's copy is the one used
                    if weights.has(key):
                        f = weights.key_to_file[key]
                        with safe_open(str(f), framework="pt") as h:
                            shape = list(h.get_slice(key).get_shape())
                        want = [cfg.vocab_size, cfg.hidden_size]
                        if shape != want and shape != [cfg.draft_vocab, cfg.hidden_size]:
                            raise CheckpointError(f"tensor {key!r} in {f} has shape {shape}, expected {want}")
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


class DSparkModel(FeatureDrafterModel):
    """Drafter weights and math (no caches, no sampling state)."""

    OPTIONAL_ZERO_KEYS = ("confidence_head.proj.bias",)

    def __init__(self, cfg: DSparkConfig, shared: SharedWeights | None = None) -> None:
        super().__init__(cfg, shared)
        L = len(cfg.target_layer_ids)
        self.fc = nn.Linear(L * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_context_proj = (nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
                                   if cfg.block_context else None)
        self.next_token_proj = (nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
                                if cfg.context_next_token else None)
        self.markov_head: SequentialHead | None = (
            SEQUENTIAL_HEADS[cfg.markov_head_type](cfg) if cfg.has_sequential_head else None
        )
        if isinstance(self.markov_head, JointMarkovHead):
            self.markov_head.lm_head = lambda h: self._shared().logits(h)
        self.confidence_head: ConfidenceHead | None = None
        if cfg.enable_confidence_head:
            extra = cfg.markov_rank if cfg.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(cfg.hidden_size + extra)

    c_layers: "list[int4_gemm.DraftLayerWeights] | None" = None  # set by pack_fp16_weights where it can
    c_context: "int4_gemm.DraftContextWeights | None" = None  # likewise, with c_layers

    def pack_fp16_weights(self) -> int:
        """As `FeatureDrafterModel.pack_fp16_weights`; then, where every projection went to the int8 GEMM and
        the row attention kernel runs, each draft layer is also described for `int4_gemm.draft_layer`
        (q|k|v and gate|up fused by rows: the same codes and scales, so the same outputs) in `c_layers`, and
        what a commit computes (context features and every layer's keys and values) in `c_context`."""
        n = super().pack_fp16_weights()
        self.c_layers = self.c_context = None
        if not n:
            return n
        a = self.layers[0].self_attn
        mods = [m for layer in self.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                      layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        if not (all(hasattr(m, "q8") for m in mods) and a.D % 16 == 0 and a.D <= 256 and row_attention.available()
                and row_attention.supports(a.Hq, a.Hkv, a.D)):
            return n

        def fuse(*ms: nn.Linear) -> Any:
            codes = torch.cat([m.q8.codes for m in ms])
            d = torch.cat([m.q8.d for m in ms])
            bias = None
            if any(m.bias is not None for m in ms):
                bias = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                                  for m in ms]).contiguous()
            return SimpleNamespace(codes=codes, d=d, sc4=int4_gemm.scales4(d, None), out_features=codes.shape[0],
                                   bias=bias, il=int4_gemm.vnni_layout(codes, d))
        eps = self.config.rms_norm_eps
        self.c_layers = [
            int4_gemm.DraftLayerWeights.of(
                (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.self_attn.q_norm.weight,
                 layer.self_attn.k_norm.weight), eps,
                fuse(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), fuse(layer.self_attn.o_proj),
                fuse(layer.mlp.gate_proj, layer.mlp.up_proj), fuse(layer.mlp.down_proj), a.Hq, a.Hkv, a.D)
            for layer in self.layers]
        if hasattr(self.fc, "q8"):
            self.c_context = int4_gemm.DraftContextWeights.of(
                self.fc.q8, self.hidden_norm.weight, eps,
                [fuse(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in self.layers],
                [layer.self_attn.k_norm.weight for layer in self.layers], a.Hkv, a.D)
        return n

    @classmethod
    def _config_from_json(cls, raw: Mapping[str, Any], source: str, target: "TargetModel") -> DSparkConfig:
        tok = target.tokenizer
        return DSparkConfig.from_json_dict(raw, source, tok.mask_token_id if tok is not None else None)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self._shared().logits(hidden).float()

    def context_features(self, target_hidden: Tensor, next_ids: Tensor | None = None) -> Tensor:
        """target_hidden [..., L, H] (taps in target_layer_ids order) -> context features [..., H];
        with `context_next_token`, next_ids [...] are the tokens after those positions."""
        flat = target_hidden.reshape(*target_hidden.shape[:-2], -1).to(self.dtype)
        x = self.fc(flat)
        if self.next_token_proj is not None:
            if next_ids is None:
                raise ValueError("this drafter has context_next_token: its context needs the token after each position")
            x = x + self.next_token_proj(self.embed(next_ids))
        return self.hidden_norm(x)

    def context_keys_values(self, features: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per draft layer, keys/values of context features [b, S, H] at positions [b, S]:
        [(k, v)] with k, v [b, S, Hkv, D]."""
        cos, sin = self.rope(positions)
        return [layer.self_attn.keys_values(features, cos, sin) for layer in self.layers]

    def run_block(self, x: Tensor, positions: Tensor, kv: KeyValueSource | None, mask: Tensor | None,
                  attend: Attend | None = None) -> Tensor:
        """The draft layers over block inputs x [b, S, H] at positions [b, S] (see `run_layers`).
        Returns h [b, S, H] after the final norm."""
        return self.norm(self.run_layers(x, positions, kv, mask, attend))

    def add_block_context(self, x: Tensor, last_features: Tensor | None) -> Tensor:
        """x [b, S, H] block inputs (S = blocks x G) + the projected context features of each block's last
        context position, last_features [b, S // G, H] (zeros where a block has no context); x unchanged
        without `block_context`."""
        if self.block_context_proj is None:
            return x
        if last_features is None:
            raise ValueError("this drafter has block_context: its blocks need the last context position's features")
        add = self.block_context_proj(last_features.to(x.dtype))  # [b, blocks, H]
        return x + add.repeat_interleave(x.shape[1] // add.shape[1], dim=1)

    def block_inputs(self, anchor_ids: Tensor) -> Tensor:
        """anchor_ids [...] -> block token ids [..., G]: the anchor, then G-1 mask tokens."""
        ids = torch.full((*anchor_ids.shape, self.config.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=anchor_ids.device)
        ids[..., 0] = anchor_ids
        return ids

    def confidence_logits(self, hidden: Tensor, prev_ids: Tensor) -> Tensor | None:
        """hidden [..., H], prev_ids [...] (x_{k-1}) -> logits [...] of c_k, or None without a head."""
        if self.confidence_head is None:
            return None
        feats = hidden
        if self.config.confidence_head_with_markov:
            assert self.markov_head is not None
            feats = torch.cat([hidden, self.markov_head.markov_w1(prev_ids).to(hidden.dtype)], dim=-1)
        return self.confidence_head(feats)

    # ---- training -----------------------------------------------------------------------------------

    def forward_train(
        self,
        target_hidden: Tensor,  # [B, T, L, H] taps at every position (padding rows must be finite)
        input_ids: Tensor,  # [B, T] long
        anchors: Tensor,  # [B, A] long positions; block a starts at input_ids[anchors[b, a]]
        anchor_mask: Tensor | None = None,  # [B, A] bool, False = padding anchor (no loss)
        loss_mask: Tensor | None = None,  # [B, T] bool, True = position may be predicted
    ) -> DraftTrainOutput:
        """All A blocks of each sequence in one forward.

        Block a's queries see context positions < anchors[a] and all of block a, nothing of other
        blocks, exactly what `propose` sees at inference for the same anchor. Its k-th prediction
        (k = 1..G) targets input_ids[anchor + k]; the sequential head is teacher-forced on those
        ground-truth tokens (x_0 = the anchor)."""
        B, T = input_ids.shape
        A, G = anchors.shape[1], self.config.block_size
        dev = input_ids.device
        anchor_mask, loss_mask = default_train_masks(input_ids, anchors, anchor_mask, loss_mask)
        anchors = torch.where(anchor_mask, anchors, torch.zeros_like(anchors)).clamp(0, T - 1)

        next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last is never seen
        feats = self.context_features(target_hidden, next_ids)  # [B, T, H]
        ctx_pos = torch.arange(T, device=dev).expand(B, T)
        ctx_kv = self.context_keys_values(feats, ctx_pos)

        anchor_ids = input_ids.gather(1, anchors)  # [B, A]
        x = self.embed(self.block_inputs(anchor_ids).view(B, A * G))  # [B, A*G, H]
        if self.block_context_proj is not None:
            last = feats.gather(1, (anchors - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
            x = self.add_block_context(x, last * (anchors > 0).unsqueeze(-1).to(last.dtype))  # [B, A, H] per block
        offsets = torch.arange(G, device=dev)
        positions = (anchors.unsqueeze(-1) + offsets).view(B, A * G)

        # Mask over keys [context 0..T-1 | blocks]: context j iff j < anchor of the query's block;
        # block keys iff same block.
        q_block = torch.arange(A * G, device=dev) // G  # [A*G]
        q_anchor = anchors[:, q_block]  # [B, A*G]
        see_ctx = torch.arange(T, device=dev)[None, None, :] < q_anchor[:, :, None]  # [B, A*G, T]
        see_blk = (q_block[:, None] == q_block[None, :]).expand(B, -1, -1)  # [B, A*G, A*G]
        mask = torch.cat([see_ctx, see_blk], dim=-1).unsqueeze(1)  # [B, 1, A*G, T + A*G]

        def kv(i: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
            k_ctx, v_ctx = ctx_kv[i]
            return (torch.cat([k_ctx, k_new], dim=1).transpose(1, 2),
                    torch.cat([v_ctx, v_new], dim=1).transpose(1, 2))

        h = self.run_block(x, positions, kv, mask).view(B, A, G, -1)  # [B, A, G, H]
        base = self.lm_head(h)  # [B, A, G, V]

        labels, valid = block_labels(input_ids, anchors, anchor_mask, loss_mask, G)  # [B, A, G] each

        prev = torch.cat([anchor_ids.unsqueeze(-1), labels[..., :-1]], dim=-1)  # x_0..x_{G-1}
        logits = base
        if self.markov_head is not None:
            logits = base + self.markov_head.block(prev, h).float()
        return DraftTrainOutput(
            logits=logits, base_logits=base, hidden=h, confidence_logits=self.confidence_logits(h, prev),
            labels=labels, label_mask=valid,
        )

    forward = forward_train  # so DistributedDataParallel(model)(...) runs the training forward


# ---------------------------------------------------------------------------------------------------
# The drafter the engine talks to


class FeatureDrafter(CommitOne, SlotTable):
    """Engine side shared by the drafters over a `FeatureDrafterModel` (DSpark/DFlash, EAGLE-3): the
    model, a KV cache of its draft layers (one cache slot per sequence), loading and saving, and
    `propose` = `draft_block(...)` (which each subclass implements) as a `DraftProposal`."""

    name: str
    model_class: type[FeatureDrafterModel]
    has_confidence = False

    def __init__(self, model: FeatureDrafterModel, max_seqs: int, max_len: int) -> None:
        cfg = model.config
        self.model = model
        self.config = cfg
        self.block_size = cfg.block_size
        self.target_layer_ids = list(cfg.target_layer_ids)
        # Room for the block scratch past the longest context.
        self.cache = KVCache(cfg.num_hidden_layers, max_seqs, max_len + cfg.block_size,
                             cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device)
        self._slots: dict[int, int] = {}  # engine slot -> cache slot

    @classmethod
    def from_pretrained(cls, path: str | Path | None, target: "TargetModel", max_seqs: int, max_len: int) -> Any:
        if path is None:
            raise CheckpointError(f"the {cls.name} drafter needs a trained drafter directory, not a bare name")
        model = cls.model_class.load(path, target)
        if getattr(target, "cpu_gemm", "fp32") != "fp32":
            # follow the target: a packed GEMM on CPU (fp16-weight, int4 or int8) unless turned off there
            model.pack_fp16_weights()
        return cls(model, max_seqs, max_len)

    def save_pretrained(self, out: str | Path) -> Path:
        return self.model.save_pretrained(out)

    def propose(self, slots: list[int], anchors: list[int], num_draft_tokens: int | list[int],
                sampling: SamplingTensors, generators: list[torch.Generator | None],
                stop: DraftStop | None = None) -> DraftProposal:
        return self.draft_block(slots, anchors, num_draft_tokens, sampling, generators, stop=stop).proposal()

    def draft_block(self, slots: list[int], anchors: list[int], num_draft_tokens: int | list[int],
                    sampling: SamplingTensors, generators: list[torch.Generator | None],
                    stop: DraftStop | None = None) -> BlockDraft:
        raise NotImplementedError

    def _features_in(self, target_hidden: Tensor | None, n: int) -> Tensor:
        """The target's taps of `n` new positions, checked, on the model's device: [n, L, H]."""
        return check_target_hidden(self.name, self.target_layer_ids, target_hidden, n).to(self.model.device)

    def commit(self, slot: int, accepted_ids: list[int], target_hidden: Tensor | None) -> None:
        check_target_hidden(self.name, self.target_layer_ids, target_hidden, len(accepted_ids))
        super().commit(slot, accepted_ids, target_hidden)

    def _batch_features_in(self, batch: DraftCommit) -> Tensor:
        """A round's taps, checked, on the model's device: [num_reqs, k_max, L, H]."""
        h = batch.target_hidden
        L = len(self.target_layer_ids)
        k_max = max(len(t) for t in batch.token_ids)
        if h is None or h.dim() != 4 or h.shape[0] != len(batch.slots) or h.shape[1] < k_max or h.shape[2] != L:
            raise ValueError(f"the {self.name} drafter needs target_hidden [{len(batch.slots)}, >= {k_max}, {L}, "
                             f"hidden] for this commit, got {None if h is None else tuple(h.shape)}")
        return h[:, :k_max].to(self.model.device)


@register_drafter("dspark", architectures=(ARCHITECTURE,))
class DSparkDrafter(FeatureDrafter):
    """`Drafter` over a `DSparkModel`, with a per-sequence cache of the draft layers' context K/V.

    Context position i of a sequence = sequence position i, and the cache of a sequence holds exactly
    the positions whose target features are known (prompt, then every committed token). A proposal
    for an anchor at position p writes its block's keys/values at cache positions p..p+G-1 without
    advancing the length, so the next `commit` simply overwrites them.
    """

    name = "dspark"
    model_class = DSparkModel

    def __init__(self, model: DSparkModel, max_seqs: int, max_len: int) -> None:
        super().__init__(model, max_seqs, max_len)
        cfg = model.config
        self.name = cfg.drafter_type if cfg.drafter_type in ("dspark", "dflash") else type(self).name
        # Proposals carry c_k, so the confidence scheduler can choose ℓ (see dspark.schedule).
        self.has_confidence = model.confidence_head is not None
        # Calibration of c_k (Sequential Temperature Scaling): [G] float32 or None (raw sigmoid).
        self.confidence_temperatures: Tensor | None = None
        # With `block_context`: the taps of each cache slot's last context position [max_seqs, L, H].
        self._last_taps: Tensor | None = None
        if cfg.block_context:
            self._last_taps = torch.zeros(max_seqs, len(cfg.target_layer_ids), cfg.hidden_size,
                                          dtype=model.dtype, device=model.device)
        # With `context_next_token`: per cache slot, the taps [L, H] of its last context position, whose
        # keys and values wait for the token after it (the next anchor, or the next commit's first token).
        self._pending: dict[int, Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path | None, target: "TargetModel", max_seqs: int, max_len: int) -> Any:
        drafter = super().from_pretrained(path, target, max_seqs, max_len)
        if drafter.has_confidence:
            drafter.set_confidence_temperatures(read_calibration(Path(path), drafter.block_size))
        return drafter

    def set_confidence_temperatures(self, temperatures: "list[float] | Tensor | None") -> None:
        """Calibrate c_k = σ(z_k / T_k) (None: the head's raw sigmoid)."""
        if temperatures is None:
            self.confidence_temperatures = None
            return
        t = torch.as_tensor(temperatures, dtype=torch.float32, device=self.model.device)
        if t.shape != (self.block_size,) or not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"confidence temperatures must be {self.block_size} positive finite numbers, "
                             f"got {t.tolist()}")
        self.confidence_temperatures = t

    def _calibrated(self, logits: Tensor, first: int = 0) -> Tensor:
        """c from raw logits [n, m] of positions first..first+m-1."""
        if self.confidence_temperatures is None:
            return torch.sigmoid(logits)
        return torch.sigmoid(logits.float() / self.confidence_temperatures[first:first + logits.shape[-1]])

    # ---- Drafter protocol ---------------------------------------------------------------------------

    def add_sequence(self, slot: int, prompt_ids: list[int], target_hidden: Tensor | None) -> None:
        self._open_slot(slot, lambda cslot: self._append_context(slot, list(prompt_ids), target_hidden))

    @torch.inference_mode()
    def commit_batch(self, batch: DraftCommit) -> None:
        """Append the context K/V of every sequence's kept tokens in one ragged pass."""
        taps = self._batch_features_in(batch)  # [num_reqs, k_max, L, H]
        self._keep_last_taps([self._cslot(s) for s in batch.slots], [len(t) for t in batch.token_ids], taps)
        if self.model.next_token_proj is not None:
            self._append_with_next([self._cslot(s) for s in batch.slots],
                                   [t[:len(ids)] for t, ids in zip(taps, batch.token_ids)], batch.token_ids)
            return
        if self._context_c_runs(taps):
            lens = [len(t) for t in batch.token_ids]
            rows = taps[0, :lens[0]] if len(lens) == 1 else torch.cat([t[:n] for t, n in zip(taps, lens)])
            self._append_context_c([self._cslot(s) for s in batch.slots], lens, rows)
            return
        feats = self.model.context_features(taps)  # [num_reqs, k_max, H]
        self._commit_features([self._cslot(s) for s in batch.slots], [len(t) for t in batch.token_ids], feats)

    def context_length(self, slot: int) -> int:
        """Positions whose target features the drafter holds (a pending one counted: see `_pending`)."""
        cslot = self._cslot(slot)
        return self.cache.length(cslot) + (cslot in self._pending)

    # ---- internals -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _append_context(self, slot: int, ids: list[int], target_hidden: Tensor | None) -> None:
        """Append the K/V of the new context positions of tokens `ids` (only these; nothing is recomputed)."""
        cslot = self._cslot(slot)
        model = self.model
        n = len(ids)
        taps = self._features_in(target_hidden, n)  # [n, L, H]
        self._keep_last_taps([cslot], [n], taps.unsqueeze(0))
        if model.next_token_proj is not None:
            self._pending.pop(cslot, None)  # a fresh sequence on this cache slot
            self._append_with_next([cslot], [taps], [ids])
            return
        if self._context_c_runs(taps):
            self._append_context_c([cslot], [n], taps)
            return
        feats = model.context_features(taps.unsqueeze(0))  # [1, n, H]
        self._commit_features([cslot], [n], feats)

    def _append_with_next(self, cslots: list[int], taps: list[Tensor], ids: list[list[int]]) -> None:
        """`context_next_token`: per cache slot, new positions with taps [k, L, H] holding tokens ids (k of
        them). Writes the K/V of the slot's pending position (the token after it: ids[0]) and of every new
        position but the last, which becomes pending (the token after it is not known yet)."""
        rows, nexts = [], []
        for c, t, tok in zip(cslots, taps, ids):
            r, nx = t[:-1], list(tok[1:])
            if c in self._pending:
                r, nx = torch.cat([self._pending.pop(c).unsqueeze(0), r]), [tok[0], *nx]
            self._pending[c] = t[-1].clone()  # the caller may reuse its buffer
            rows.append(r)
            nexts.append(nx)
        self._write_context(cslots, rows, nexts)

    def _write_context(self, cslots: list[int], rows: list[Tensor], nexts: list[list[int]]) -> None:
        """Append context positions: taps rows[i] [k_i, L, H], the tokens after them nexts[i] (k_i)."""
        keep = [i for i, r in enumerate(rows) if len(r)]
        if not keep:
            return
        model = self.model
        lens = [len(rows[i]) for i in keep]
        m = max(lens)
        taps = rows[keep[0]].new_zeros(len(keep), m, *rows[keep[0]].shape[1:])
        nxt = torch.zeros(len(keep), m, dtype=torch.long, device=taps.device)
        for j, i in enumerate(keep):
            taps[j, :lens[j]] = rows[i]
            nxt[j, :lens[j]] = torch.tensor(nexts[i], dtype=torch.long)
        self._commit_features([cslots[i] for i in keep], lens, model.context_features(taps, nxt))

    def _commit_features(self, cslots: list[int], lens: list[int], feats: Tensor) -> None:
        """Append `lens[i]` context positions to cache slot cslots[i]: their features feats [n, max(lens), H]
        (rows past a slot's length are padding) -> every draft layer's keys and values."""
        cb = self.cache.prepare(cslots, lens, max_position=self.cache.max_len)
        for i, (k, v) in enumerate(self.model.context_keys_values(feats, cb.positions)):
            self.cache.update(i, cb, k, v)
        self.cache.commit(cb)

    def _keep_last_taps(self, cslots: list[int], lens: list[int], taps: Tensor) -> None:
        """taps [n, k_max, L, H] of `lens` new positions per cache slot: remember each slot's last row."""
        if self._last_taps is not None:
            for c, k, t in zip(cslots, lens, taps):
                if k:
                    self._last_taps[c] = t[k - 1]

    @torch.inference_mode()
    def draft_block(self, slots: list[int], anchors: list[int], num_draft_tokens: int | list[int],
                    sampling: SamplingTensors, generators: list[torch.Generator | None],
                    stop: DraftStop | None = None) -> BlockDraft:
        """One backbone forward for every slot, then the sequential head left to right, γ = max ℓ
        positions; a row past its own ℓ is padding (argmax, no randomness drawn).

        With `stop` (needs the confidence head) the confidence of each position is computed before
        its token is drafted and drafting ends as soon as `stop` settles how many will be verified:
        the returned block may then hold fewer than `gamma` tokens (and confidences)."""
        G = self.block_size
        ells = check_propose_args(num_draft_tokens, G, slots, anchors, generators)
        gamma = max(ells)
        model = self.model
        dev = model.device
        n = len(slots)
        cslots = [self._cslot(s) for s in slots]
        anchor_t = torch.tensor(anchors, dtype=torch.long, device=dev)  # [n]

        if model.next_token_proj is not None:  # the pending positions: the anchor is the token after them
            pend = [self._pending.pop(c, None) for c in cslots]
            self._write_context(cslots, [p.unsqueeze(0) if p is not None else anchor_t.new_zeros(0) for p in pend],
                                [[a] for a in anchors])
        # The whole block is always run (the backbone was trained on G inputs); only gamma are drafted.
        batch = self.cache.prepare(cslots, [G] * n, max_position=self.cache.max_len)
        x = model.embed(model.block_inputs(anchor_t))  # [n, G, H]
        if self._last_taps is not None:
            last = model.context_features(self._last_taps[torch.tensor(cslots, device=dev)],
                                          anchor_t if model.next_token_proj is not None else None)  # [n, H]
            x = model.add_block_context(x, last.unsqueeze(1))
        if self.use_c_layers and model.c_layers is not None and self._row_kernel_runs():
            h = self._run_block_c(x, batch, cslots, G)
        elif (attend := self._row_attend(batch, cslots, G)) is not None:
            h = model.run_block(x, batch.positions, None, None, attend)
        else:
            ends = torch.tensor(batch.start, device=dev) + G  # each row sees its context and its block
            mask = (torch.arange(batch.kv_len, device=dev)[None, :] < ends[:, None])[:, None, None, :]  # [n,1,1,kv]
            h = model.run_block(x, batch.positions, lambda i, k, v: self.cache.update(i, batch, k, v), mask)
        h = h[:, :gamma]  # [n, gamma, H]

        head = model.markov_head
        if stop is not None and model.confidence_head is None:
            raise ValueError(f"the {self.name} drafter has no confidence head to stop drafting early with")
        if self._greedy_kernel_fits(sampling, h):
            return self._draft_greedy_kernel(h, anchor_t, gamma, stop)
        base = model.lm_head(h)  # [n, gamma, V]
        prev = anchor_t
        state = head.init_state(n, h) if head is not None else None
        tokens, step_logits, step_probs, prevs = [], [], [], []
        confs: list[Tensor] = []  # c_k computed step by step (only with `stop`)
        need: int | None = None  # drafts the scheduler will verify at most, once settled
        for k in range(gamma):
            if stop is not None and need is None:
                confs.append(model.confidence_logits(h[:, k], prev))
                need = stop(self._calibrated(torch.stack(confs, dim=1)))
            if need is not None and k >= need:
                break
            logits_k = base[:, k]  # [n, V]
            if head is not None:
                bias, state = head.step(prev, h[:, k], state)
                logits_k = logits_k + bias.float()
            tok, probs_k = sample_step(logits_k, sampling, generators, active=[e > k for e in ells])
            tok = model.to_target_tokens(tok)
            step_probs.append(model.to_target_probs(probs_k))
            prevs.append(prev)
            tokens.append(tok)
            step_logits.append(logits_k)
            prev = tok
        m = len(tokens)
        if not tokens:  # the scheduler settled on verifying no draft at all
            V = model.config.vocab_size
            greedy = all(sampling.greedy)
            return BlockDraft(token_ids=torch.zeros(n, 0, dtype=torch.long, device=dev), logits=base[:, :0],
                              base_logits=base, probs=None if greedy else base.new_zeros(n, 0, V),
                              confidence=base.new_zeros(n, 0), confidence_logits=base.new_zeros(n, 0))
        if stop is not None:
            conf: Tensor | None = torch.stack(confs, dim=1)[:, :m]
        else:
            conf = model.confidence_logits(h, torch.stack(prevs, dim=1))  # prevs: x_0..x_{gamma-1}
        return BlockDraft(
            token_ids=torch.stack(tokens, dim=1),
            logits=torch.stack(step_logits, dim=1),
            base_logits=base,
            probs=None if step_probs[0] is None else torch.stack(step_probs, dim=1),
            confidence=None if conf is None else self._calibrated(conf),
            confidence_logits=conf,
        )

    # The block's attention on the row kernel (`dspark.models.row_attention`) where it runs: each block
    # row against its sequence's context and whole block, read in place from the cache (SDPA with a
    # mask copied keys, values and mask every layer: ~1 ms of a 2-7 ms proposal at 100+ context
    # tokens). False turns it off (tests compare both).
    use_row_attention = True

    def _row_kernel_runs(self) -> bool:
        if not self.use_row_attention or self.model.dtype != torch.float32:
            return False
        if self._row_kernel_ok is None:  # the rest is fixed once the drafter is built
            a = self.model.layers[0].self_attn
            self._row_kernel_ok = (self.cache.device.type == "cpu" and row_attention.supports(a.Hq, a.Hkv, a.D)
                                   and row_attention.available())
        return self._row_kernel_ok

    _row_kernel_ok: bool | None = None

    def _row_attend(self, batch: Any, cslots: list[int], G: int) -> Attend | None:
        if not self._row_kernel_runs():
            return None
        a = self.model.layers[0].self_attn
        rows = row_attention.RowPlan.from_lists(
            [b * G + j for b in range(len(cslots)) for j in range(G)],
            [c for c in cslots for _ in range(G)], [s + G for s in batch.start for _ in range(G)])
        plan = row_attention.AttentionPlan(rows, [], False)
        scale = a.D ** -0.5

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_layer, v_layer = self.cache.write(i, batch, k, v)
            return row_attention.attention(q.contiguous(), k_layer, v_layer, plan, scale)
        return attend

    # Each draft layer in one C call (`int4_gemm.draft_layer`) where `DSparkModel.c_layers` is set (the
    # int8 projections and the row kernel, as above, without the ~25 torch calls a layer between them).
    use_c_layers = True

    def _run_block_c(self, x: Tensor, batch: Any, cslots: list[int], G: int) -> Tensor:
        model = self.model
        n, _, H = x.shape
        xf = x.reshape(n * G, H).float().contiguous()  # a fresh tensor (the embedding's output): updated in place
        row_pos_list = [s + j for s in batch.start for j in range(G)]
        row_pos = torch.tensor(row_pos_list, dtype=torch.int64)
        cos, sin = model.rope_rows(row_pos, max(row_pos_list))  # [n * G, D]
        row_slot = torch.tensor([c for c in cslots for _ in range(G)], dtype=torch.int64)
        row_len = torch.tensor([s + G for s in batch.start for _ in range(G)], dtype=torch.int64)
        attn = self._attention_address()
        scale = model.layers[0].self_attn.D ** -0.5
        cos, sin = cos.float(), sin.float()
        for i, w in enumerate(model.c_layers):  # type: ignore[union-attr]
            k_layer, v_layer = self.cache.layer_tensors(i)
            int4_gemm.draft_layer(xf, w, cos, sin, k_layer, v_layer, row_slot, row_pos, row_len, attn, scale)
        return model.norm(xf.view(n, G, H))

    _attn_address: int | None = None

    def _attention_address(self) -> int:
        if self._attn_address is None:
            self._attn_address = row_attention.kernel_address()
        return self._attn_address

    def _context_c_runs(self, taps: Tensor) -> bool:
        """Whether a commit's context keys and values go through `int4_gemm.draft_context` (with the C
        draft layers, on float32 CPU taps and cache)."""
        return (self.use_c_layers and self.model.c_context is not None and taps.dtype == torch.float32
                and taps.device.type == "cpu" and self.cache.k.dtype == torch.float32 and self.cache.device.type == "cpu")

    def _append_context_c(self, cslots: list[int], lens: list[int], taps: Tensor) -> None:
        """`commit_batch` / `_append_context` in one C call: taps [sum(lens), L, H], the rows of each
        cache slot in turn."""
        model = self.model
        batch = self.cache.prepare(cslots, lens, max_position=self.cache.max_len)  # checks; where rows go
        pos_list = [s + j for s, n in zip(batch.start, lens) for j in range(n)]
        pos = torch.tensor(pos_list, dtype=torch.int64)
        cos, sin = model.rope_rows(pos, max(pos_list))  # [M, D]
        feats = taps.reshape(taps.shape[0], -1).contiguous()
        row_slot = torch.tensor([c for c, n in zip(cslots, lens) for _ in range(n)], dtype=torch.int64)
        int4_gemm.draft_context(model.c_context, feats, cos.float(), sin.float(), self.cache.k, self.cache.v,
                                row_slot, pos)
        self.cache.commit(batch)

    def _greedy_kernel_fits(self, sampling: SamplingTensors, h: Tensor) -> bool:
        """Whether this block can be drafted by the greedy Markov kernel (`markov_kernel`): every row
        greedy, the vanilla Markov head (rank a multiple of 8), a confidence head (if any) reading the
        Markov embedding, float32 on the CPU, no gradient."""
        if not (all(sampling.greedy) and h.device.type == "cpu" and not torch.is_grad_enabled()):
            return False
        if self._greedy_kernel_ok is None:  # the rest is fixed once the drafter is built
            head, conf = self.model.markov_head, self.model.confidence_head
            self._greedy_kernel_ok = (type(head) is MarkovHead and head.markov_w1.weight.shape[1] % 8 == 0
                                      and (conf is None or self.config.confidence_head_with_markov)
                                      and markov_kernel.available())
        return self._greedy_kernel_ok

    _greedy_kernel_ok: bool | None = None

    def _confidence_weights(self) -> tuple[Tensor | None, float]:
        """The confidence head's weight row and bias (as a float) for the greedy kernel; the bias is read
        again only when it changed (its version counter), a host read a round saved."""
        ch = self.model.confidence_head
        if ch is None:
            return None, 0.0
        b = ch.proj.bias
        key = (ch.proj.weight.data_ptr(), None if b is None else (b.data_ptr(), b._version))
        if self._conf_cache is None or self._conf_cache[0] != key:
            self._conf_cache = (key, ch.proj.weight.detach()[0], 0.0 if b is None else float(b))
        return self._conf_cache[1], self._conf_cache[2]

    _conf_cache: tuple[Any, Tensor, float] | None = None

    # With `stop`, the greedy kernel drafts the block in chunks of positions [0, 2), [2, gamma): a
    # position's LM head row is computed only once the scheduler has not settled before it (most rounds
    # the confidence policy verifies 1-2 drafts; the draft-vocabulary LM head is ~40% of a proposal).
    # Every step reads only its own position and the previous token, so chunks draft what one call would.
    FIRST_CHUNK = 2

    def _draft_greedy_kernel(self, h: Tensor, anchor_t: Tensor, gamma: int, stop: DraftStop | None) -> BlockDraft:
        """The greedy left-to-right loop of `draft_block` in C: the same tokens (up to float rounding in
        the transition bias), confidences and early stop."""
        model = self.model
        head = model.markov_head
        cw, cb = self._confidence_weights()
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
        prev = anchor_t
        m, settled = gamma, None  # drafts to return; confidences the scheduler read when it settled
        k0 = 0
        while k0 < m:
            k1 = min(m, self.FIRST_CHUNK) if stop is not None and settled is None and k0 == 0 else m
            hk = h[:, k0:k1]
            base_k = model.lm_head(hk)  # [n, k1 - k0, V]
            logits, _, tokens, conf = markov_kernel.markov_greedy(
                base_k, head.markov_w1.weight, head.markov_w2.weight, model.draft_ids, prev, hk, cw, cb)
            parts.append((base_k, logits, tokens, conf))
            prev = tokens[:, -1]
            if stop is not None and settled is None:
                assert conf is not None
                conf_all = torch.cat([p[3] for p in parts], dim=1)  # type: ignore[misc]
                for k in range(k0, k1):  # what the step-by-step loop decides, on the same confidences
                    need = stop(self._calibrated(conf_all[:, :k + 1]))
                    if need is not None:  # drafting goes on (without stop) up to `need` drafts
                        m, settled = min(need, gamma), k + 1
                        break
            k0 = k1
        settled = gamma if settled is None else settled
        if len(parts) == 1:
            base, logits, tokens, conf = parts[0]
        else:
            base, logits, tokens = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
            conf = None if cw is None else torch.cat([p[3] for p in parts], dim=1)  # type: ignore[misc]
        n = h.shape[0]
        if m == 0:  # the scheduler settled on verifying no draft at all
            return BlockDraft(token_ids=tokens[:, :0], logits=base[:, :0], base_logits=base, probs=None,
                              confidence=base.new_zeros(n, 0), confidence_logits=base.new_zeros(n, 0))
        conf_m = None if conf is None else conf[:, :min(m, settled)]
        return BlockDraft(token_ids=tokens[:, :m], logits=logits[:, :m], base_logits=base, probs=None,
                          confidence=None if conf_m is None else self._calibrated(conf_m), confidence_logits=conf_m)


@register_drafter("dflash")
class DFlashDrafter(DSparkDrafter):
    """DFlash: the same backbone without a sequential head (markov_rank = 0)."""

    name = "dflash"
