"""Target-model configuration: one dataclass for every supported family.

The supported families (Qwen3, Qwen2, Llama) share one decoder implementation; they differ only in
a few switches (q/k RMSNorm, which projections carry a bias, RoPE scaling). A small registry maps
the `architectures[0]` / `model_type` of a Hugging Face `config.json` to a `Family` that knows how to
set those switches, so adding a family is one registry entry, not a new model file.

Usage:
    raw = json.load(open("config.json"))
    cfg = ModelConfig.from_hf(raw, source="/path/config.json")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from dspark.errors import CheckpointError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a decoder-only target model."""

    architecture: str  # e.g. "Qwen3ForCausalLM"; the registry key it was parsed with
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on gate/up/down projections
    rope_scaling: RopeScaling | None = None
    torch_dtype: str | None = None  # the checkpoint's own dtype, used by dtype="auto"
    bos_token_id: int | None = None
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise CheckpointError(
                f"config.json: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse RoPE frequencies, float32 `[head_dim // 2]`, computed exactly as transformers does."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        s = self.rope_scaling
        if s is None:
            return inv_freq
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a Hugging Face `config.json` dict; `source` names the file in error messages."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        model_type = raw.get("model_type")
        family = FAMILIES.get(arch) if arch else None
        if family is None and model_type is not None:
            family = FAMILIES.get(model_type)
        if family is None:
            raise CheckpointError(
                f"{source}: unknown architecture {arch!r} (model_type {model_type!r}); "
                f"supported: {', '.join(supported_architectures())}"
            )
        return family.parse(raw, source, arch or family.name)


# ---------------------------------------------------------------------------------------------------
# Family registry


def _req(raw: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"{source}: missing required key {key!r}")
    return raw[key]


def _int(raw: Mapping[str, Any], key: str, source: str, default: Any = None, minimum: int = 1) -> int:
    """A positive integer config value: a JSON number, never a string ("320") or a bool."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(f"{source}: missing required key {key!r}")
        return int(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise CheckpointError(f"{source}: key {key!r} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise CheckpointError(f"{source}: key {key!r} must be >= {minimum}, got {value}")
    return int(value)


def _float(raw: Mapping[str, Any], key: str, source: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{source}: key {key!r} must be a finite number, got {value!r}")
    return float(value)


def _eos_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope(raw: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either the transformers-5 `rope_parameters` dict or the older
    top-level `rope_theta` + `rope_scaling` keys (checkpoints on the hub use both)."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type == "llama3":
        try:
            return float(theta), RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: llama3 rope scaling is missing key {e.args[0]!r}") from None
    raise CheckpointError(f"{source}: unsupported rope_type {rope_type!r} (supported: default, llama3)")


@dataclass(frozen=True)
class Family:
    """How one Hugging Face family's config keys translate to `ModelConfig` switches."""

    name: str
    qk_norm: bool
    # Given the raw config, which projections have a bias: (qkv_bias, o_bias, mlp_bias).
    biases: Callable[[Mapping[str, Any]], tuple[bool, bool, bool]]

    def parse(self, raw: Mapping[str, Any], source: str, arch: str) -> ModelConfig:
        if raw.get("use_sliding_window"):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        hidden = _int(raw, "hidden_size", source)
        heads = _int(raw, "num_attention_heads", source)
        theta, scaling = _rope(raw, source)
        qkv_bias, o_bias, mlp_bias = self.biases(raw)
        return ModelConfig(
            architecture=arch,
            model_type=str(raw.get("model_type", self.name)),
            vocab_size=_int(raw, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size", source),
            num_layers=_int(raw, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=_int(raw, "num_key_value_heads", source, default=heads),
            head_dim=_int(raw, "head_dim", source, default=hidden // heads),
            rms_norm_eps=_float(raw, "rms_norm_eps", source, 1e-6),
            rope_theta=theta,
            max_position_embeddings=_int(raw, "max_position_embeddings", source, default=4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qk_norm=self.qk_norm,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            rope_scaling=scaling,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=_eos_list(raw.get("eos_token_id")),
            pad_token_id=raw.get("pad_token_id"),
        )


def _attention_bias_everywhere(raw: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    # Llama and Qwen3 use one `attention_bias` flag for q, k, v and o alike.
    b = bool(raw.get("attention_bias", False))
    return b, b, bool(raw.get("mlp_bias", False))


def _qwen2_biases(raw: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    # Qwen2 hard-codes a bias on q/k/v and none on o_proj or the MLP.
    return True, False, False


_QWEN3 = Family("qwen3", qk_norm=True, biases=_attention_bias_everywhere)
_LLAMA = Family("llama", qk_norm=False, biases=_attention_bias_everywhere)
_QWEN2 = Family("qwen2", qk_norm=False, biases=_qwen2_biases)

# Keyed by `architectures[0]` first, then by `model_type` as a fallback.
FAMILIES: dict[str, Family] = {
    "Qwen3ForCausalLM": _QWEN3,
    "qwen3": _QWEN3,
    "LlamaForCausalLM": _LLAMA,
    "llama": _LLAMA,
    "Qwen2ForCausalLM": _QWEN2,
    "qwen2": _QWEN2,
}


def supported_architectures() -> list[str]:
    """Architecture names (`config.json` `architectures[0]`) that `load_target` accepts."""
    return sorted(k for k in FAMILIES if k[0].isupper())
