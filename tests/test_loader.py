"""Checkpoint loading errors, config parsing, tokenizer wrapper and incremental detokenisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SPECIAL_TOKENS, TOKENIZER_VOCAB, TinyCheckpoint
from dspark.errors import CheckpointError, DSparkError, TokenizerError
from dspark.models import ModelConfig, load_target, supported_architectures
from dspark.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture()
def ckpt_copy(qwen3_ckpt: TinyCheckpoint, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(qwen3_ckpt.path, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- checkpoint errors -------------------------------------------------------------------------------


def test_missing_config(ckpt_copy: Path) -> None:
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as info:
        load_target(ckpt_copy)
    assert str(ckpt_copy) in str(info.value)


def test_missing_safetensors(ckpt_copy: Path) -> None:
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors") as info:
        load_target(ckpt_copy)
    assert str(ckpt_copy) in str(info.value)


def test_missing_shard(tmp_path: Path) -> None:
    from conftest import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "sh", "qwen3", num_layers=2, max_shard_size="40KB")
    shard = sorted(ckpt.path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_target(ckpt.path)


def test_unknown_architecture(ckpt_copy: Path) -> None:
    edit_json(ckpt_copy / "config.json", architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(CheckpointError, match="GPTNeoXForCausalLM") as info:
        load_target(ckpt_copy)
    msg = str(info.value)
    assert "config.json" in msg and "Qwen3ForCausalLM" in msg and "LlamaForCausalLM" in msg


def test_model_type_fallback(ckpt_copy: Path) -> None:
    edit_json(ckpt_copy / "config.json", architectures=None)  # some exports omit architectures
    assert load_target(ckpt_copy).config.qk_norm


def test_missing_tensor(ckpt_copy: Path) -> None:
    f = ckpt_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as info:
        load_target(ckpt_copy)
    assert "model.safetensors" in str(info.value)


def test_misshaped_tensor(ckpt_copy: Path) -> None:
    f = ckpt_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight") as info:
        load_target(ckpt_copy)
    msg = str(info.value)
    assert "[16, 64]" in msg and "[32, 64]" in msg and "model.safetensors" in msg


def test_tokenizer_bigger_than_model_vocab(ckpt_copy: Path) -> None:
    edit_json(ckpt_copy / "config.json", vocab_size=TOKENIZER_VOCAB - 10)
    with pytest.raises(CheckpointError, match="tokenizer.json") as info:
        load_target(ckpt_copy)
    assert f"vocab_size={TOKENIZER_VOCAB - 10}" in str(info.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_malformed_json(ckpt_copy: Path, name: str) -> None:
    (ckpt_copy / name).write_text('{"vocab_size": 300,')
    with pytest.raises(CheckpointError, match=name) as info:
        load_target(ckpt_copy)
    assert "malformed JSON" in str(info.value)


def test_missing_tokenizer(ckpt_copy: Path) -> None:
    (ckpt_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_target(ckpt_copy)
    assert load_target(ckpt_copy, load_tokenizer=False).tokenizer is None


def test_errors_share_a_base() -> None:
    assert issubclass(CheckpointError, DSparkError) and issubclass(CheckpointError, ValueError)


def test_unknown_dtype(qwen3_ckpt: TinyCheckpoint) -> None:
    with pytest.raises(ValueError, match="float8"):
        load_target(qwen3_ckpt.path, dtype="float8")


# ---- config parsing ----------------------------------------------------------------------------------

BASE = dict(
    architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
    num_hidden_layers=1, num_attention_heads=2,
)


def test_config_legacy_rope_keys_and_eos_forms() -> None:
    cfg = ModelConfig.from_hf(
        {**BASE, "rope_theta": 500000.0, "eos_token_id": 7,
         "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}
    )
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert cfg.eos_token_id == [7] and cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert ModelConfig.from_hf({**BASE, "eos_token_id": [1, 2]}).eos_token_id == [1, 2]


def test_family_switches() -> None:
    q2 = ModelConfig.from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert (q2.qkv_bias, q2.o_bias, q2.mlp_bias, q2.qk_norm) == (True, False, False, False)
    q3 = ModelConfig.from_hf({**BASE, "architectures": ["Qwen3ForCausalLM"], "attention_bias": True})
    assert (q3.qkv_bias, q3.o_bias, q3.qk_norm) == (True, True, True)
    assert "Qwen2ForCausalLM" in supported_architectures()


def test_config_errors_name_key() -> None:
    with pytest.raises(CheckpointError, match="hidden_size"):
        ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError, match="yarn"):
        ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_scaling=scaling, rope_theta=500000.0)
    ours = ModelConfig.from_hf(json.loads(hf.to_json_string()) | {"architectures": ["LlamaForCausalLM"]})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    assert torch.allclose(ours.rope_inv_freq(), ref, rtol=1e-6, atol=0)
    assert not torch.allclose(ModelConfig.from_hf({**BASE, "hidden_size": 128}).rope_inv_freq(), ref)


# ---- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert tok.vocab_size == TOKENIZER_VOCAB
    assert tok.eos_token_ids == [ids["<|im_end|>"], ids["<|endoftext|>"]]  # config eos + generation_config
    assert tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.mask_token_id == ids["<|mask|>"]
    assert tok.bos_token_id is None


def test_mask_token_absent(tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    del cfg["mask_token"]
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path / "t").mask_token_id is None


def test_encode_decode_roundtrip(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    text = "Hello world! 你好 héllo <|im_end|> done"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert "<|im_end|>" not in tok.decode(ids)  # special tokens skipped by default
    assert tok.token_to_id("<|im_end|>") in ids  # the special token is one id, not split


def test_chat_template(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    assert tok.has_chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_chat_template_is_sandboxed_and_errors_are_clear(tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    edit_json(cfg_path, chat_template="{{ messages.__class__.__mro__ }}")
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        Tokenizer.from_dir(tmp_path / "t").apply_chat_template([{"role": "user", "content": "x"}])
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_added_tokens_decoder_mismatch(tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"]["7"] = {"content": "<|im_end|>", "special": True}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="added_tokens_decoder"):
        Tokenizer.from_dir(tmp_path / "t")


def test_added_tokens_decoder_adds_missing_token(tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tokenizer_dir, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"][str(TOKENIZER_VOCAB)] = {"content": "<think>", "special": False}
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.token_to_id("<think>") == TOKENIZER_VOCAB and tok.encode("<think>") == [TOKENIZER_VOCAB]


def test_incremental_detokenizer_holds_back_partial_utf8(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    text = "Hi 世界 ñ 🙂 done. " * 3  # the emoji is not in the tiny vocab, so it spans several byte tokens
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test exercises partial characters
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    # Chunks of several ids at a time give the same text.
    detok2 = IncrementalDetokenizer(tok)
    out = "".join(detok2.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok2.flush()
    assert out == text and detok2.text == text


def test_incremental_detokenizer_flushes_truncated_char(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = tok.encode("a🙂")
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:-1]) == "a"  # the emoji's last byte is missing: held back
    assert detok.flush() == tok.decode(ids[1:-1])  # flush gives up and emits the replacement chars
