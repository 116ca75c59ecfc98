"""Write small GGUF files for the tests, the way llama.cpp's converter lays them out.

    from gguf_files import write_gguf
    path = write_gguf(ckpt, tmp_path / "m.gguf", family="llama", qtype="Q8_0")

The weights come from a tiny transformers checkpoint (conftest.build_checkpoint); 2-D weights are
quantized with `gguf.quants` to `qtype` (1-D ones stay F32, as llama.cpp keeps norms), the llama
architecture's Q/K rows get llama.cpp's RoPE permutation, and the tokenizer (vocabulary, merges,
special tokens, chat template) goes into the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dspark.export import GGUF_LAYER_NAMES

# Hugging Face layer names -> llama.cpp's (the drafter exporter's table, plus the Q/K/V/O biases).
LAYER_NAMES = {
    **GGUF_LAYER_NAMES,
    **{f"self_attn.{p}_proj.bias": f"attn_{g}.bias" for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))},
}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: Hugging Face's half-split RoPE rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, idx, rest = hf.split(".", 3)
    return f"blk.{idx}.{LAYER_NAMES[rest]}"


# Byte offsets of the fp16 scale fields in one block of each k-quant type (block size, offsets).
_K_SCALES = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def random_kquant(rows: int, cols: int, qtype: str, seed: int = 0) -> np.ndarray:
    """Random k-quant blocks with small, finite scales (`gguf` can dequantize these types but not
    quantize to them): uint8 [rows, cols / 256 * block bytes]."""
    block, offsets = _K_SCALES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // 256, block), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    for off in offsets:
        data[:, :, off:off + 2] = scale
    return data.reshape(rows, -1)


def write_gguf(ckpt_dir: Path, out: Path, *, qtype: str = "F32", hf_model: Any = None,
               metadata_hook: Callable[[Any], None] | None = None, skip_keys: tuple[str, ...] = (),
               tensor_qtypes: dict[str, str] | None = None) -> Path:
    """Write `out` from the checkpoint directory `ckpt_dir` (config.json, tokenizer files) and the
    float32 `hf_model` saved there. `tensor_qtypes` overrides the type of single GGUF tensors."""
    import gguf

    cfg = json.loads((ckpt_dir / "config.json").read_text())
    family = cfg["model_type"]
    tok = json.loads((ckpt_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(out), family)
    keys: dict[str, Callable[[], None]] = {}
    a = family
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    keys[f"{a}.block_count"] = lambda: w.add_uint32(f"{a}.block_count", cfg["num_hidden_layers"])
    keys[f"{a}.context_length"] = lambda: w.add_uint32(f"{a}.context_length", cfg["max_position_embeddings"])
    keys[f"{a}.embedding_length"] = lambda: w.add_uint32(f"{a}.embedding_length", cfg["hidden_size"])
    keys[f"{a}.feed_forward_length"] = lambda: w.add_uint32(f"{a}.feed_forward_length", cfg["intermediate_size"])
    keys[f"{a}.attention.head_count"] = lambda: w.add_uint32(f"{a}.attention.head_count", heads)
    keys[f"{a}.attention.head_count_kv"] = lambda: w.add_uint32(f"{a}.attention.head_count_kv", kv)
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    keys[f"{a}.rope.freq_base"] = lambda: w.add_float32(f"{a}.rope.freq_base", float(theta))
    keys[f"{a}.attention.layer_norm_rms_epsilon"] = lambda: w.add_float32(
        f"{a}.attention.layer_norm_rms_epsilon", float(cfg["rms_norm_eps"]))
    if cfg.get("head_dim"):
        keys[f"{a}.attention.key_length"] = lambda: w.add_uint32(f"{a}.attention.key_length", cfg["head_dim"])
        keys[f"{a}.attention.value_length"] = lambda: w.add_uint32(f"{a}.attention.value_length", cfg["head_dim"])
    keys[f"{a}.vocab_size"] = lambda: w.add_uint32(f"{a}.vocab_size", cfg["vocab_size"])

    # Tokenizer: ids 0..n-1 from tokenizer.json (added tokens included), padded to the model's vocab.
    vocab = dict(tok["model"]["vocab"])
    for t in tok["added_tokens"]:
        vocab[t["content"]] = t["id"]
    n = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    special = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    keys["tokenizer.ggml.model"] = lambda: w.add_tokenizer_model("gpt2")
    keys["tokenizer.ggml.pre"] = lambda: w.add_tokenizer_pre("default")
    keys["tokenizer.ggml.tokens"] = lambda: w.add_token_list(tokens)
    keys["tokenizer.ggml.token_type"] = lambda: w.add_token_types(types)
    keys["tokenizer.ggml.merges"] = lambda: w.add_token_merges(merges)
    keys["tokenizer.ggml.eos_token_id"] = lambda: w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    keys["tokenizer.ggml.padding_token_id"] = lambda: w.add_pad_token_id(ids["<|endoftext|>"])
    keys["tokenizer.ggml.add_bos_token"] = lambda: w.add_add_bos_token(False)
    if tok_cfg.get("chat_template"):
        keys["tokenizer.chat_template"] = lambda: w.add_chat_template(tok_cfg["chat_template"])
    for k, add in keys.items():
        if k not in skip_keys:
            add()
    if metadata_hook is not None:
        metadata_hook(w)

    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items() if "rotary" not in k}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    for hf, arr in state.items():
        name = gguf_name(hf)
        if family == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = permute_rows(arr, heads)
        elif family == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = permute_rows(arr, kv)
        q = (tensor_qtypes or {}).get(name, qtype if arr.ndim == 2 else "F32")
        if q in _K_SCALES:
            qt = gguf.GGMLQuantizationType[q]
            w.add_tensor(name, random_kquant(arr.shape[0], arr.shape[1], q, seed=len(name)), raw_dtype=qt)
        elif q in ("F32", "F16"):
            data = arr.astype(np.float32 if q == "F32" else np.float16)
            w.add_tensor(name, data)
        else:
            qt = gguf.GGMLQuantizationType[q]
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
