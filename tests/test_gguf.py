"""GGUF loading: parity with transformers loading the same file, the tokenizer, the cache, bad files.

Small GGUF files are written with `gguf`'s writer from tiny random transformers checkpoints
(tests/gguf_files.py); transformers reads the same file with `from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_checkpoint
from gguf_files import write_gguf

from dspark import LLM, SamplingParams
from dspark.errors import CheckpointError
from dspark.models import load_target
from dspark.models.gguf import cache_dir_for, gguf_to_hf_dir

IDS = [5, 17, 33, 40, 2, 99, 120, 7, 64, 250, 3, 18]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # One cache per test module run, never the user's own.
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gguf-cache"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny llama, qwen3 and qwen2 checkpoints (qwen3 with head_dim 128, which transformers' GGUF
    config mapping assumes)."""
    root = tmp_path_factory.mktemp("gguf-src")
    return {
        "llama": build_checkpoint(root / "llama", "llama", seed=11),
        "qwen3": build_checkpoint(root / "qwen3", "qwen3", seed=12, head_dim=128),
        "qwen2": build_checkpoint(root / "qwen2", "qwen2", seed=13, num_layers=2),
        "llama-tied": build_checkpoint(root / "llama-tied", "llama", seed=14, tie=True),
    }


def _hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits(target, ids):
    cache = target.new_cache(1, 64)
    slot = cache.allocate()
    return target.forward(cache, [slot], [ids]).logits[0]


@pytest.mark.parametrize("family,qtype", [
    ("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("llama", "Q4_0"),
    ("qwen3", "F32"), ("qwen3", "Q8_0"), ("qwen3", "Q4_1"),
    ("qwen2", "F32"), ("qwen2", "Q8_0"), ("llama-tied", "F16"), ("llama-tied", "BF16"),
])
def test_logits_and_greedy_match_transformers(ckpts, tmp_path, family, qtype):
    ck = ckpts[family]
    path = write_gguf(ck.path, tmp_path / f"{family}-{qtype}.gguf", qtype=qtype, hf_model=ck.hf_model)
    hf = _hf_from_gguf(path)
    # cpu_gemm="fp16": the file's weights dequantized exactly (the default runs 4-bit codes on the int4
    # GEMM, a model of its own: see test_int4).
    target = load_target(path, dtype="float32", cpu_gemm="fp16")
    assert target.source == path and target.config.model_type == family.split("-")[0]
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float()
    assert (_logits(target, IDS) - ref).abs().max().item() < 1e-4
    if qtype == "F32":  # an unquantized file is the checkpoint itself
        with torch.no_grad():
            orig = ck.hf_model(torch.tensor([IDS])).logits[0].float()
        assert (_logits(target, IDS) - orig).abs().max().item() < 1e-4
    llm = LLM(model=path, dtype="float32", max_num_seqs=2, cpu_gemm="fp16")
    prompts = [IDS[:5], IDS[3:]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert o.token_ids == g[0, len(p):].tolist()


def test_k_quants_match_transformers(tmp_path):
    """Q4_K, Q5_K and Q6_K blocks (random, with sane scales) dequantize as transformers does."""
    ck = build_checkpoint(tmp_path / "k", "llama", seed=15, hidden_size=256, intermediate_size=256,
                          num_layers=1, num_attention_heads=4, num_key_value_heads=2)
    types = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_K", "blk.0.attn_v.weight": "Q6_K",
             "blk.0.attn_output.weight": "Q4_K", "blk.0.ffn_gate.weight": "Q5_K",
             "blk.0.ffn_up.weight": "Q6_K", "blk.0.ffn_down.weight": "Q4_K"}
    path = write_gguf(ck.path, tmp_path / "k.gguf", qtype="Q8_0", hf_model=ck.hf_model, tensor_qtypes=types)
    hf = _hf_from_gguf(path)
    # cpu_gemm="fp16": the dequantized weights (by default the Q8_0 LM head runs on 8-bit activations)
    target = load_target(path, dtype="float32", cpu_gemm="fp16")
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].float()
    assert (_logits(target, IDS) - ref).abs().max().item() < 1e-4


def _retrain_tokenizer(path: Path, vocab_size: int) -> None:
    """Replace the checkpoint's tokenizer.json by one with merges (the shared tiny one has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import _CORPUS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok.save(str(path / "tokenizer.json"))


def test_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    ck = build_checkpoint(tmp_path / "tok", "llama", seed=16, num_layers=1)
    _retrain_tokenizer(ck.path, 300)
    path = write_gguf(ck.path, tmp_path / "tok.gguf", qtype="F32", hf_model=ck.hf_model)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_target(path, dtype="float32").tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! 123"}]
    rendered = ours.apply_chat_template(messages)
    assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    texts = [rendered, "The quick brown fox 0 1 2 3 1000", "<|im_start|>user\nhéllo wörld ñ 你好<|im_end|>",
             "def add(a, b):\n    return a + b\n", "  two  spaces\tand tabs\n\n", "<|endoftext|>x<|mask|>"]
    for text in texts:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.eos_token_ids[0] == ref.eos_token_id


def test_cache_reused_and_keyed_by_file_and_dtype(ckpts, tmp_path, monkeypatch):
    import dspark.models.gguf as g

    ck = ckpts["qwen2"]
    path = write_gguf(ck.path, tmp_path / "c.gguf", qtype="Q8_0", hf_model=ck.hf_model)
    d16 = gguf_to_hf_dir(path)
    d32 = gguf_to_hf_dir(path, dtype="float32")
    assert d16 != d32 and (d16 / "source.json").is_file() and (d32 / "config.json").is_file()
    # The default dtype stores fp16 values: the CPU runtime then uses the packed fp16-weight GEMM (and
    # the int8 GEMM for the Q8_0 LM head, where it builds).
    assert load_target(path).cpu_gemm in ("fp16-weights", "fp32", "int8-head-a8+fp16-weights")
    from safetensors import safe_open
    with safe_open(str(d16 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float16
        assert f.get_tensor("model.norm.weight").dtype == torch.float32  # F32 in the file stays F32

    calls = []
    monkeypatch.setattr(g, "_convert", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    assert gguf_to_hf_dir(path) == d16 and not calls  # cached: no second conversion
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert cache_dir_for(path) != d16  # a changed file gets a fresh entry


# ---- bad files ----------------------------------------------------------------------------------


def test_truncated_file(ckpts, tmp_path):
    ck = ckpts["llama"]
    path = write_gguf(ck.path, tmp_path / "t.gguf", qtype="F32", hf_model=ck.hf_model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    with pytest.raises(CheckpointError, match=r"t\.gguf.*tensor '.*' is truncated"):
        load_target(path)
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"t\.gguf.*(damaged or truncated|truncated)"):
        load_target(path)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(CheckpointError, match=r"x\.gguf: not a GGUF file"):
        load_target(bad)
    with pytest.raises(CheckpointError, match=r"missing\.gguf"):
        load_target(tmp_path / "missing.gguf")


def test_unknown_architecture(ckpts, tmp_path):
    import gguf

    ck = ckpts["llama"]
    path = write_gguf(ck.path, tmp_path / "a.gguf", qtype="F32", hf_model=ck.hf_model)
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_uint32("mamba.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"mamba\.gguf: unknown architecture 'mamba'.*general\.architecture"):
        load_target(tmp_path / "mamba.gguf")
    assert path.is_file()


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.layer_norm_rms_epsilon",
                                 "tokenizer.ggml.model", "tokenizer.ggml.tokens"])
def test_missing_metadata_key(ckpts, tmp_path, key):
    ck = ckpts["llama"]
    path = write_gguf(ck.path, tmp_path / "m.gguf", qtype="F32", hf_model=ck.hf_model, skip_keys=(key,))
    with pytest.raises(CheckpointError, match=rf"m\.gguf: missing metadata key '{key}'"):
        load_target(path)


def test_unsupported_tensor_type(ckpts, tmp_path):
    import gguf

    ck = ckpts["llama"]

    def extra(w):
        pass

    path = write_gguf(ck.path, tmp_path / "u.gguf", qtype="F32", hf_model=ck.hf_model, metadata_hook=extra,
                      tensor_qtypes={"blk.0.ffn_up.weight": "F32"})
    # Rewrite one tensor's type as IQ4_NL (a type this loader does not take) with valid-sized data.
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), vt)
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
            data = np.zeros((rows, cols // size[0] * size[1]), dtype=np.uint8)
            w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type IQ4_NL"):
        load_target(tmp_path / "iq.gguf")


def test_cli_reports_bad_gguf_in_one_line(tmp_path, capsys):
    from dspark.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    assert main(["generate", "--model", str(bad), "--drafter", "none", "--raw", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.gguf" in err[0] and "Traceback" not in err[0]
