"""GGUF checkpoints (llama.cpp's single-file format) as a Hugging Face model directory, cached.

A GGUF file holds the config as metadata (`llama.block_count`, ...), the tokenizer (vocabulary,
merges, special tokens, chat template) and the weights, often quantized in blocks. `gguf_to_hf_dir`
dequantizes the weights with the `gguf` package, undoes llama.cpp's Q/K row permutation for the
llama architecture, builds a `tokenizers` tokenizer from the metadata, and writes an ordinary model
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) into a per-user cache keyed by the file's identity (resolved path, size,
modification time) and the dtype, so that only the first load pays for the conversion.

Usage:
    from dspark.models import load_target
    target = load_target("SmolLM2-135M-Instruct.Q4_1.gguf")        # converts once, then cached
    hf_dir = gguf_to_hf_dir("model.gguf", dtype="float32")            # the cached directory

The weights in the directory are exactly `gguf.quants.dequantize` of the file's tensors, stored in
float32 (dtype="float32") or rounded to float16 / bfloat16. 1-D tensors (norms, biases) that the file
stores as F32 stay float32 whatever the dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark.errors import CheckpointError

# Bump when the directory layout or the conversion changes, so stale cache entries are not reused.
FORMAT_VERSION = 3
# 4-bit codes of Q4_0 / Q4_1 matrices and 8-bit codes of Q8_0 ones, beside model.safetensors, for the
# CPU weight-only GEMMs (dspark.models.int4_gemm).
QUANT_FILE = "quant.safetensors"
Q4_GROUP = 32
GGUF_MAGIC = b"GGUF"
CACHE_ENV = "DSPARK_CACHE_DIR"

# The dtype the cached weights are stored in when the caller does not say: float16 keeps more of a
# dequantized block's precision than bfloat16 (10 mantissa bits against 7), and float16-exact weights
# run on the packed fp16-weight CPU GEMM (dspark.models.transformer).
DEFAULT_STORAGE_DTYPE = "float16"
_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                    "bf16": "bfloat16"}


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF `general.architecture` maps onto a Hugging Face config."""

    hf_architecture: str
    model_type: str
    permuted_qk: bool  # llama.cpp permutes Q/K rows of llama models into its interleaved RoPE order


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", permuted_qk=False),
}

# Tensor types this loader accepts (all dequantized by the `gguf` package).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (per layer: with "blk.{i}.") -> Hugging Face name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the regexes the vocabularies were trained with).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Vocabularies trained on single digits (a Digits pre-tokenizer before the byte-level split).
_DIGIT_SPLIT = {"smollm", "starcoder", "refact"}

# Control tokens llama.cpp treats as end of generation by their text, beside the eos/eot ids.
_END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
                      "<end_of_turn>", "<|eom_id|>")


def _write_json(path: Path, obj: Any) -> None:
    # Plain writes: the whole directory is built in a temporary folder and renamed into place.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_gguf(path: str | os.PathLike) -> bool:
    """True when `path` is a file that starts with the GGUF magic (or is named *.gguf)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with p.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def cache_root() -> Path:
    """Per-user cache directory: $DSPARK_CACHE_DIR, else $XDG_CACHE_HOME/dspark, else ~/.cache/dspark."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dspark"


def storage_dtype_name(dtype: str | torch.dtype | None) -> str:
    """The dtype the converted weights are stored in: float32, float16 or bfloat16."""
    if dtype is None or dtype == "auto":
        return DEFAULT_STORAGE_DTYPE
    name = str(dtype).removeprefix("torch.")
    name = _STORAGE_ALIASES.get(name, name)
    if name not in _STORAGE:
        raise ValueError(f"unsupported dtype {dtype!r} for a GGUF model; use one of float32, float16, bfloat16, auto")
    return name


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies a GGUF file for the cache: resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_dir_for(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
    p = Path(path)
    ident = file_identity(p)
    key = json.dumps({**ident, "dtype": storage_dtype_name(dtype), "version": FORMAT_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{p.stem}-{storage_dtype_name(dtype)}-{digest}"


def gguf_to_hf_dir(path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                   cache: bool = True) -> Path:
    """Convert a GGUF file into a Hugging Face model directory (cached) and return the directory."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    storage = storage_dtype_name(dtype)
    out = cache_dir_for(path, storage)
    if cache and (out / "source.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    from dspark.train.checkpoint import current_umask

    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the cache follows the user's umask
    try:
        _convert(path, tmp, storage)
        if out.exists():  # another process finished first, or a stale entry with cache=False
            shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------
# Reading


class _Meta:
    """The metadata of one GGUF file, with lookups whose errors name the file and the key."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path = path
        self.reader = reader

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # a field whose bytes do not decode
            raise CheckpointError(f"{self.path}: metadata key {key!r} cannot be read ({e})") from None

    def req(self, key: str) -> Any:
        if not self.has(key):
            raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
        return self.get(key)


def _open_reader(path: Path) -> Any:
    try:
        import gguf
    except ModuleNotFoundError:  # pragma: no cover - gguf is a core dependency
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (the first bytes are not 'GGUF')")
    class _Reader(gguf.GGUFReader):
        # The stock reader fails on a truncated tensor with a bare reshape error; check each tensor's
        # extent first so the message can name it.
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                except (ValueError, KeyError):
                    raise CheckpointError(f"{path}: tensor {name!r} has an unknown type id {int(raw_dtype[0])}") \
                        from None
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > len(self.data):
                    raise CheckpointError(f"{path}: tensor {name!r} is truncated (its data ends at byte {end}, "
                                          f"the file has {len(self.data)})")
            super()._build_tensors(start_offs, fields)

    try:
        reader = _Reader(str(path), "r")
    except CheckpointError:
        raise
    except Exception as e:  # truncated headers surface as numpy/struct errors deep in the reader
        raise CheckpointError(f"{path}: cannot read the GGUF header, the file is damaged or truncated "
                              f"({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path}: tensor {t.name!r} is truncated (the file ends before its data)")
    return reader


def read_config(path: Path, meta: _Meta, tensor_names: set[str]) -> dict[str, Any]:
    """A Hugging Face `config.json` dict from the GGUF metadata."""
    arch_name = meta.req("general.architecture")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise CheckpointError(f"{path}: unknown architecture {arch_name!r} in metadata key 'general.architecture'; "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
    a = arch_name
    if meta.has(f"{a}.rope.scaling.type") and meta.get(f"{a}.rope.scaling.type") not in ("none", None):
        raise CheckpointError(f"{path}: metadata key '{a}.rope.scaling.type' = "
                              f"{meta.get(f'{a}.rope.scaling.type')!r} is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE scaling) is not supported")
    hidden = int(meta.req(f"{a}.embedding_length"))
    heads = int(meta.req(f"{a}.attention.head_count"))
    kv_heads = meta.get(f"{a}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise CheckpointError(f"{path}: metadata key '{a}.attention.head_count_kv' varies by layer; not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{a}.vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{path}: missing metadata key '{a}.vocab_size' (and no 'tokenizer.ggml.tokens')")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta.req(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(meta.req(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(meta.get(f"{a}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta.req(f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.req(f"{a}.context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
    }


def _hf_name(name: str, num_layers: int) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if idx.isdigit() and int(idx) < num_layers and rest in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
    return None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation (rows of each head from [re..., im...] pairs interleaved back
    to Hugging Face's half-split order)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(path: Path, t: Any) -> np.ndarray:
    from gguf import quants

    type_name = getattr(t.tensor_type, "name", str(t.tensor_type))
    if type_name not in SUPPORTED_TENSOR_TYPES:
        raise CheckpointError(f"{path}: tensor {t.name!r} has type {type_name}, which is not supported "
                              f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
    try:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r} of type {type_name} ({e})") from None
    shape = tuple(int(d) for d in reversed(list(t.shape)))  # GGUF lists dimensions fastest first
    return np.array(arr.reshape(shape), dtype=np.float32, order="C")  # a writable copy


def q4_codes(path: Path, t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes uint8 [N, K] in 0..15, scale float32 [N, K/32], zero float32 [N, K/32]) of a Q4_0 or
    Q4_1 matrix, such that its weights are exactly (codes - 8) * scale + zero (None for other types).

    Block layout (ggml): Q4_0 = d (fp16), 16 bytes of nibbles, w = d * (q - 8); Q4_1 = d, m (fp16),
    16 bytes, w = d * q + m. Byte j holds element j in its low nibble and element j + 16 in its high
    one. Checked against `gguf.quants.dequantize` in the tests."""
    kind = getattr(t.tensor_type, "name", "")
    if kind not in ("Q4_0", "Q4_1") or len(t.shape) != 2:
        return None
    n, k = int(t.shape[1]), int(t.shape[0])
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(n, k // Q4_GROUP, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:20]
        zero = m + 8 * d  # d * q + m == d * (q - 8) + (m + 8 d)
    else:
        qs = blocks[..., 2:18]
        zero = np.zeros_like(d)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return np.ascontiguousarray(codes, dtype=np.uint8), d, zero


def q8_codes(t: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes int8 [N, K], scale float32 [N, K/32]) of a Q8_0 matrix, whose weights are exactly
    codes * scale (None for other types). Block layout (ggml): d (fp16), then 32 int8 codes."""
    if getattr(t.tensor_type, "name", "") != "Q8_0" or len(t.shape) != 2:
        return None
    n, k = int(t.shape[1]), int(t.shape[0])
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(n, k // Q4_GROUP, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:34].copy().view(np.int8).reshape(n, k)
    return np.ascontiguousarray(codes), d


def _convert(path: Path, out: Path, storage: str) -> None:
    from safetensors.torch import save_file

    reader = _open_reader(path)
    meta = _Meta(path, reader)
    names = {t.name for t in reader.tensors}
    config = read_config(path, meta, names)
    arch = ARCHITECTURES[meta.req("general.architecture")]
    tok_json, tok_config, gen_config = build_tokenizer(path, meta)
    n_layers = config["num_hidden_layers"]
    weights: dict[str, torch.Tensor] = {}
    quant: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name, n_layers)
        if hf is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {config['model_type']} model")
        arr = _dequantize(path, t)
        if arch.permuted_qk and hf.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _unpermute_rows(arr, config["num_attention_heads"])
        elif arch.permuted_qk and hf.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _unpermute_rows(arr, config["num_key_value_heads"])
        tensor = torch.from_numpy(arr)
        keep_f32 = tensor.dim() == 1 and getattr(t.tensor_type, "name", "") == "F32"
        weights[hf] = tensor if keep_f32 else tensor.to(_STORAGE[storage])
        q4 = q4_codes(path, t)
        if q4 is not None:
            codes, scale, zero = q4
            if arch.permuted_qk and hf.endswith("q_proj.weight"):
                codes, scale, zero = (_unpermute_rows(a, config["num_attention_heads"]) for a in q4)
            elif arch.permuted_qk and hf.endswith("k_proj.weight"):
                codes, scale, zero = (_unpermute_rows(a, config["num_key_value_heads"]) for a in q4)
            quant[hf + ".q4"] = torch.from_numpy(np.ascontiguousarray(codes))
            quant[hf + ".q4_scale"] = torch.from_numpy(np.ascontiguousarray(scale))
            quant[hf + ".q4_zero"] = torch.from_numpy(np.ascontiguousarray(zero))
        q8 = q8_codes(t) if hf in ("model.embed_tokens.weight", "lm_head.weight") else None
        if q8 is not None:  # the LM head (tied to the embedding or not), for the int8 GEMM
            quant[hf + ".q8"] = torch.from_numpy(q8[0])
            quant[hf + ".q8_scale"] = torch.from_numpy(q8[1])
    config["torch_dtype"] = storage
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    if quant:
        save_file(quant, str(out / QUANT_FILE), metadata={"format": "pt", "group_size": str(Q4_GROUP)})
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "generation_config.json", gen_config)
    _write_json(out / "config.json", config)
    # Written last: its presence marks a complete directory.
    _write_json(out / "source.json", {"gguf": file_identity(path), "dtype": storage,
                                            "format_version": FORMAT_VERSION,
                                            "general.name": meta.get("general.name")})


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(path: Path, meta: _Meta) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config dict, generation_config dict) from the metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.req("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: metadata key 'tokenizer.ggml.model' = {kind!r} is not supported "
                              "(supported: 'gpt2', byte-level BPE)")
    tokens = list(meta.req("tokenizer.ggml.tokens"))
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: metadata key 'tokenizer.ggml.token_type' has {len(types)} entries for "
                              f"{len(tokens)} tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{path}: metadata key 'tokenizer.ggml.merges' has a malformed entry {m!r}")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGIT_SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # 3 = CONTROL (special, never split), 4 = USER_DEFINED (matched whole, not special).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

    def token_of(key: str) -> str | None:
        i = meta.get(key)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise CheckpointError(f"{path}: metadata key {key!r} = {i} is outside the vocabulary of {len(tokens)}")
        return tokens[int(i)]

    bos = token_of("tokenizer.ggml.bos_token_id")
    eos = token_of("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        single = " ".join(([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else []))
        special = [(t, vocab[t]) for t in (bos if add_bos else None, eos if add_eos else None) if t]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    config: dict[str, Any] = {
        "bos_token": bos, "eos_token": eos,
        "pad_token": token_of("tokenizer.ggml.padding_token_id"),
        "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 4096)),
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    # End of generation: eos, the end-of-turn / end-of-message ids, and control tokens llama.cpp
    # also stops on by their text.
    eog = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id")]
    eog += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3 and t in _END_OF_GENERATION]
    gen = {"eos_token_id": list(dict.fromkeys(int(i) for i in eog if i is not None))}
    if bos is not None:
        gen["bos_token_id"] = vocab[bos]
    return tok.to_str(), config, gen
