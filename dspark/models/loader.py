"""Load a Hugging Face checkpoint directory into a `TargetModel` and run it against a `KVCache`.

Usage:
    target = load_target("/models/Qwen3-8B", dtype="bfloat16", device="cuda")
    cache = target.new_cache(max_seqs=8, max_len=4096)
    slot = cache.allocate()
    out = target.forward(cache, [slot], [target.tokenizer.encode("Hello")], hidden_layer_ids=[1, 17])
    next_token = out.logits[0, out.num_new[0] - 1].argmax()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from dspark.config import ATTENTION_MODES, CPU_GEMM_MODES, KV_CACHE_DTYPES
from dspark.errors import CheckpointError
from dspark.kv_cache import KVCache
from dspark.models.config import ModelConfig
from dspark.models.gguf import QUANT_FILE, gguf_to_hf_dir, is_gguf
from dspark.models.transformer import Transformer, interleave_rope_rows
from dspark.tokenizer import Tokenizer, read_json

# The KV cache is preallocated, so `new_cache` without `max_len` must not reserve the full
# (often 32k-128k) context for every slot.
DEFAULT_CACHE_LEN = 4096

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU (bf16 matmuls are slow there), the checkpoint's dtype elsewhere;
    "auto" -> the checkpoint's `dtype`/`torch_dtype`; strings like "bfloat16" -> that dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = "float32" if device.type == "cpu" else "auto"
    if dtype == "auto":
        dtype = cfg.torch_dtype or "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[name]


@dataclass
class ForwardResult:
    """Output of one `TargetModel.forward` call.

    Rows past a sequence's own `num_new` are padding with unspecified values.
    """

    logits: Tensor  # [batch, k_max, vocab] float32 ([batch, 1, vocab] with all_logits=False)
    hidden: Tensor | None  # [batch, k_max, len(hidden_layer_ids), hidden] in the model dtype
    num_new: list[int] = field(default_factory=list)


class TargetModel:
    """A loaded target model: config, tokenizer, weights, and a cache-aware forward.

    Hidden-state ids (`hidden_layer_ids`): -1 = embedding output, i = output of decoder layer i
    (0-based) before the final norm; equal to transformers' `output_hidden_states[i + 1]` except for
    the last layer, whose transformers entry is `final_norm` of ours.
    """

    def __init__(
        self,
        config: ModelConfig,
        transformer: Transformer,
        tokenizer: Tokenizer | None,
        generation_config: dict[str, Any],
        path: Path | None = None,
        source: Path | None = None,
    ) -> None:
        self.config = config
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.path = path  # the model directory the weights were read from
        self.source = source if source is not None else path  # what the user named: a directory or a .gguf
        self.kv_cache_dtype: torch.dtype = self.dtype  # what new_cache keeps keys and values in (load_target sets it)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embed_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.embed_weight.device

    @property
    def cpu_gemm(self) -> str:
        """Which GEMMs the projections and the LM head use, joined by "+": "int4" (4-bit codes of the
        checkpoint), "int8-head" (its Q8_0 LM head on the int8 GEMM), each with "-a8" on 8-bit
        activations, "fp16-weights" (the packed fp16-weight GEMM); "fp32" when none. The default on
        SmolLM2's Q4_1 file: "int4-a8+int8-head-a8"."""
        from dspark.models.transformer import Int4Linear, Int8Linear, PackedLinear

        t = self.transformer
        parts = []
        if getattr(t, "int4_packed", 0):
            a8 = any(isinstance(p, Int4Linear) and p.act8 for layer in t.layers for p in layer.attn.packed.values())
            parts.append("int4-a8" if a8 else "int4")
        if isinstance(t.packed_lm_head, Int8Linear):
            parts.append("int8-head-a8" if t.packed_lm_head.act8 else "int8-head")
        packs = [t.packed_lm_head] + [p for layer in t.layers for p in (*layer.attn.packed.values(),
                                                                     *layer.mlp.packed.values())]
        if any(isinstance(p, PackedLinear) for p in packs):
            parts.append("fp16-weights")
        return "+".join(parts) or "fp32"

    @property
    def attention(self) -> str:
        """"rows" (the batch-invariant row kernel: a token's outputs do not depend on what it is batched
        with) or "sdpa"."""
        return "rows" if self.transformer.row_attention else "sdpa"

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return list(self.tokenizer.eos_token_ids)
        return list(self.config.eos_token_id or [])

    def new_cache(self, max_seqs: int, max_len: int | None = None) -> KVCache:
        """A KV cache for up to `max_seqs` sequences of `max_len` tokens (default
        min(context length, 4096))."""
        if max_len is None:
            max_len = min(self.context_length, DEFAULT_CACHE_LEN)
        if max_len > self.context_length:
            raise ValueError(
                f"max_len={max_len} exceeds the model's max_position_embeddings={self.context_length}"
            )
        c = self.config
        return KVCache(c.num_layers, max_seqs, max_len, c.num_kv_heads, c.head_dim, self.kv_cache_dtype, self.device)

    # ---- pieces shared with drafters --------------------------------------------------------------

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings: ids [...] -> [..., hidden]."""
        # No grad mode switch here or below: a training drafter backpropagates *through* these
        # (the weights themselves have requires_grad=False, so they stay frozen).
        return self.transformer.embed(ids.to(self.device))

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The model's final RMSNorm: [..., hidden] -> [..., hidden]."""
        return self.transformer.final_norm(hidden)

    def lm_head(self, hidden: Tensor) -> Tensor:
        """LM head only (no final norm): [..., hidden] -> [..., vocab] in the model dtype."""
        return self.transformer.lm_head(hidden)

    # ---- the forward --------------------------------------------------------------------------------

    def forward(
        self,
        cache: KVCache,
        slots: Sequence[int],
        tokens: Sequence[Sequence[int]] | Tensor,
        hidden_layer_ids: Sequence[int] = (),
        all_logits: bool = True,
    ) -> ForwardResult:
        """Append `tokens[i]` to sequence `slots[i]` and score them.

        Serves prefill (one slot, many tokens), decoding (many slots, one token each) and draft
        verification (many slots, k_i tokens each). `tokens` is a list of id lists (lengths may
        differ) or a `[batch, k]` long tensor. Each sequence is positioned at its own cache length and
        attends causally to its own prefix only. With `all_logits=False` only each sequence's last
        new token is scored (logits `[batch, 1, vocab]`), which saves the LM head on long prompts.
        Each slot's cache length grows by its number of new tokens.
        """
        slots = list(slots)
        L = self.config.num_layers
        for i in hidden_layer_ids:
            if not -1 <= i < L:
                raise ValueError(f"hidden layer id {i} out of range [-1, {L - 1}]")
        if isinstance(tokens, Tensor):
            ids = tokens.to(device=self.device, dtype=torch.long)  # [batch, k]
            if ids.dim() != 2 or ids.shape[0] != len(slots):
                raise ValueError(f"tokens tensor must be [len(slots)={len(slots)}, k], got {tuple(ids.shape)}")
            num_new = [ids.shape[1]] * len(slots)
        else:
            if len(tokens) != len(slots):
                raise ValueError(f"got {len(tokens)} token lists for {len(slots)} slots")
            num_new = [len(t) for t in tokens]
            k_max = max(num_new) if num_new else 0
            rows = [list(t) + [0] * (k_max - len(t)) for t in tokens]
            ids = torch.tensor(rows, dtype=torch.long).to(self.device)
        if cache.max_len > self.transformer.rope_len:
            self.transformer.build_rope(cache.max_len)
        batch = cache.prepare(slots, num_new, max_position=cache.max_len)
        # no_grad rather than inference_mode: outputs are ordinary tensors a trainer may feed to layers
        # that need grad (inference tensors cannot be saved for backward).
        with torch.no_grad():
            x, taps = self.transformer(ids, cache, batch, hidden_layer_ids)  # [batch, k_max, hidden]
            if not all_logits:
                last = torch.tensor(num_new, device=self.device) - 1
                x = x[torch.arange(len(slots), device=self.device), last].unsqueeze(1)  # [batch, 1, hidden]
            logits = self.transformer.lm_head(self.transformer.final_norm(x)).float()
        cache.commit(batch)
        return ForwardResult(logits=logits, hidden=taps, num_new=num_new)

    __call__ = forward


# ---------------------------------------------------------------------------------------------------
# Checkpoint reading


class _Weights:
    """Tensors of a (possibly sharded) safetensors checkpoint, by key, with checks that name files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index_file = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index_file.is_file():
            index = read_json(index_file)
            weight_map = index.get("weight_map") if index else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_file}: missing key 'weight_map'")
            self.key_to_file = {k: path / f for k, f in weight_map.items()}
            self.listing = index_file.name
            for f in sorted(set(self.key_to_file.values())):
                if not f.is_file():
                    raise CheckpointError(f"missing file {f.name} in {path} (listed in {index_file.name})")
        else:
            files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"missing file model.safetensors in {path} (no *.safetensors and no "
                    "model.safetensors.index.json)"
                )
            self.key_to_file = {}
            for f in files:
                with self._open(f) as h:
                    for k in h.keys():
                        self.key_to_file[k] = f
            # Names the file(s) searched, for error messages.
            self.listing = files[0].name if len(files) == 1 else "{" + ",".join(f.name for f in files) + "}"
        self._handles: dict[Path, Any] = {}
        self.matrix_dtypes: set[torch.dtype] = set()  # dtypes the 2-D tensors read so far were stored in

    @staticmethod
    def _open(f: Path) -> Any:
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None

    def has(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        f = self.key_to_file.get(key)
        if f is None:
            raise CheckpointError(f"missing tensor {key!r} in {self.path / self.listing}")
        if f not in self._handles:
            self._handles[f] = self._open(f).__enter__()
        try:
            t = self._handles[f].get_tensor(key)
        except Exception:
            raise CheckpointError(f"missing tensor {key!r} in {f} (listed in {self.listing})") from None
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {key!r} in {f} has shape {list(t.shape)}, expected {list(shape)}"
            )
        if t.dim() == 2:
            self.matrix_dtypes.add(t.dtype)
        return t.to(device=device, dtype=dtype)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _load_weights(model: Transformer, w: _Weights, dtype: torch.dtype, device: torch.device) -> None:
    """Copy HF-named tensors into the fused layout: q/k/v -> qkv, gate/up -> gate_up, q/k norms stacked."""
    c = model.cfg
    hid, D, H, Hkv, inter = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size

    def get(key: str, *shape: int) -> Tensor:
        return w.get(key, shape, dtype, device)

    model.embed_weight.data = get("model.embed_tokens.weight", c.vocab_size, hid)
    model.norm_weight.data = get("model.norm.weight", hid)
    if c.tie_word_embeddings:
        model.lm_head_weight = model.embed_weight  # shared storage, as in the checkpoint
    else:
        model.lm_head_weight.data = get("lm_head.weight", c.vocab_size, hid)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a, m = layer.attn, layer.mlp
        layer.input_norm.data = get(p + "input_layernorm.weight", hid)
        layer.post_attn_norm.data = get(p + "post_attention_layernorm.weight", hid)
        proj = [("q_proj", H * D), ("k_proj", Hkv * D), ("v_proj", Hkv * D)]
        # q and k rows go to the interleaved RoPE order the transformer rotates in (v is left alone).
        heads = {"q_proj": H, "k_proj": Hkv}
        ws = [get(f"{p}self_attn.{n}.weight", rows, hid) for n, rows in proj]
        ws = [interleave_rope_rows(w, heads[n], D) if n in heads else w for w, (n, _) in zip(ws, proj)]
        a.qkv_weight.data = torch.cat(ws)
        if a.qkv_bias is not None:
            bs = [get(f"{p}self_attn.{n}.bias", rows) for n, rows in proj]
            bs = [interleave_rope_rows(b, heads[n], D) if n in heads else b for b, (n, _) in zip(bs, proj)]
            a.qkv_bias.data = torch.cat(bs)
        a.o_weight.data = get(p + "self_attn.o_proj.weight", hid, H * D)
        if a.o_bias is not None:
            a.o_bias.data = get(p + "self_attn.o_proj.bias", hid)
        if a.qk_norm is not None:
            qn, kn = get(p + "self_attn.q_norm.weight", D), get(p + "self_attn.k_norm.weight", D)
            qn, kn = interleave_rope_rows(qn, 1, D), interleave_rope_rows(kn, 1, D)
            a.qk_norm.data = torch.cat([qn.expand(H, D), kn.expand(Hkv, D)])
        m.gate_up_weight.data = torch.cat(
            [get(p + "mlp.gate_proj.weight", inter, hid), get(p + "mlp.up_proj.weight", inter, hid)]
        )
        m.down_weight.data = get(p + "mlp.down_proj.weight", hid, inter)
        if m.gate_up_bias is not None:
            m.gate_up_bias.data = torch.cat([get(p + "mlp.gate_proj.bias", inter), get(p + "mlp.up_proj.bias", inter)])
            m.down_bias.data = get(p + "mlp.down_proj.bias", hid)


def check_finite(model: torch.nn.Module, path: Path) -> None:
    """Raise when a weight holds NaN or inf (greedy decoding would stop after one token and sampling
    loop). One sum per tensor: a NaN or inf anywhere makes it non-finite; only then is the tensor
    scanned, so an overflowing sum of finite values is never reported."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p.detach().sum(dtype=torch.float32))):
            bad = ~torch.isfinite(p.detach())
            if bool(bad.any()):
                raise CheckpointError(f"{path}: weight {name} holds {int(bad.sum())} NaN/inf value(s) "
                                      "(a damaged or badly converted checkpoint)")


def load_config(path: str | Path) -> ModelConfig:
    """Parse `config.json` of a model directory."""
    path = Path(path)
    raw = read_json(path / "config.json")
    assert raw is not None
    return ModelConfig.from_hf(raw, source=str(path / "config.json"))


def load_target(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    load_tokenizer: bool = True,
    cpu_gemm: str = "auto",
    attention: str = "auto",
    kv_cache_dtype: str = "auto",
) -> TargetModel:
    """Load a Hugging Face model directory (config, safetensors, tokenizer, generation config), or a
    GGUF file (converted once into a cached directory of that form, see `dspark.models.gguf`; `dtype`
    then also picks the dtype the dequantized weights are stored in: float16 unless given).

    cpu_gemm: "fp16" runs inference projections through fbgemm's fp16-weight GEMM when the model is
    float32 on CPU and its weights are exactly fp16 values (true of bf16 checkpoints such as the demo
    target, and of GGUF files converted with the default dtype): half the bytes read per step, the same
    weight values and fp32 accumulation. "int4" also runs a 4-bit GGUF's Q4_0/Q4_1 matrices (and a Q8_0
    LM head) on the int4/int8 GEMM, the model described in `dspark.models.transformer` (the file's
    weights, float32 activations); "int4-a8" the same weights times activations quantized to 8 bits per
    group of 32 (llama.cpp's numerics). "auto" is "int4-a8" when the attention is the batch-invariant row
    kernel (with SDPA, int4 outputs would depend on batching), else "fp16". "off" always uses F.linear.
    `TargetModel.cpu_gemm` says which one is in use.

    attention: "auto" computes attention with the batch-invariant row kernel
    (`dspark.models.row_attention`) on float32 CPU models when it builds, "sdpa" with torch's
    scaled_dot_product_attention. `TargetModel.attention` says which one is in use.

    kv_cache_dtype: "auto" keeps the KV cache in float16 when the projections run on the int4 GEMM with
    the row kernel (a 4-bit GGUF on CPU, the default there; llama.cpp's default cache type too: keys and
    values rounded once to float16, whose 11-bit significand is finer than the 8-bit activations these
    numerics already round to; half the bytes a decode step's attention reads), else in the model's
    dtype; "float32" / "float16" force one. Speculative and plain decoding share the cache, so greedy
    speculation still reproduces plain decoding token for token. `TargetModel.kv_cache_dtype` says which."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if cpu_gemm not in CPU_GEMM_MODES:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMM_MODES)}, got {cpu_gemm!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    path = Path(path)
    source = path
    if is_gguf(path):
        path = gguf_to_hf_dir(path, dtype=dtype)  # "auto" / None: the default storage dtype
    elif not path.is_dir():
        if path.suffix.lower() == ".gguf" or path.is_file():
            raise CheckpointError(f"model file {path} does not exist or is not a GGUF file")
        raise CheckpointError(f"model directory {path} does not exist")
    cfg = load_config(path)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    generation_config = read_json(path / "generation_config.json", required=False) or {}

    tokenizer = None
    if load_tokenizer:
        tokenizer = Tokenizer.from_dir(path, generation_config=generation_config)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise CheckpointError(
                f"tokenizer.json in {path} has {tokenizer.vocab_size} tokens, more than vocab_size="
                f"{cfg.vocab_size} in config.json"
            )

    weights = _Weights(path)
    model = Transformer(cfg)
    try:
        _load_weights(model, weights, torch_dtype, device)
    finally:
        weights.close()
    model.eval()
    check_finite(model, path)
    model.build_rope(min(cfg.max_position_embeddings, DEFAULT_CACHE_LEN))
    stored = next(iter(weights.matrix_dtypes)) if len(weights.matrix_dtypes) == 1 else None
    quant_file = path / QUANT_FILE
    rows = model.use_row_attention(attention)
    # A 4-bit checkpoint's codes (GGUF Q4_0 / Q4_1) on the int4 GEMM: asked for, or by default when the
    # attention is batch-invariant (so the bf16 rounding at the int4 GEMM cannot make outputs depend on
    # batching).
    if (cpu_gemm in ("int4", "int4-a8") or (cpu_gemm == "auto" and rows)) and quant_file.is_file() and \
            torch_dtype == torch.float32:
        from safetensors.torch import load_file

        quant = load_file(str(quant_file))
        act8 = cpu_gemm != "int4"
        model.pack_int4_weights(quant, act8=act8)
        model.pack_int8_lm_head(quant, act8=act8)
    model.pack_fp16_weights("off" if cpu_gemm == "off" else "auto", stored=stored)
    target = TargetModel(cfg, model, tokenizer, generation_config, path, source=source)
    if kv_cache_dtype == "auto":
        if rows and getattr(model, "int4_packed", 0):
            target.kv_cache_dtype = torch.float16
    else:
        target.kv_cache_dtype = getattr(torch, kv_cache_dtype)
    return target

