"""The LLM API and plain decoding engine: parity with transformers' greedy generate(), batching,
sampling reproducibility, stop conditions, streaming and bad input."""

from __future__ import annotations

import pytest
import torch

from dspark import LLM, SamplingParams
from dspark.engine import RequestError
from dspark.sampling import SamplingParamsError

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):\n",
    "Hello world! Bonjour",
    "Numbers 0 1 2 3",
    "Speculative decoding drafts a block of tokens and the target verifies",
]


def hf_greedy(hf_model, prompt_ids: list[int], max_new: int) -> list[int]:
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(x, max_new_tokens=max_new, do_sample=False, attention_mask=torch.ones_like(x))
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ckpt(request):
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(model=ckpt.path, max_num_seqs=4)


def test_greedy_equals_transformers_generate(ckpt, llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        expected = hf_greedy(ckpt.hf_model, ids, 24)
        # transformers pads a finished row with pad/eos; compare up to our own length.
        assert out.token_ids == expected[:len(out.token_ids)]
        if out.finish_reason == "length":
            assert len(out.token_ids) == 24
        else:
            assert out.token_ids[-1] in llm.target.eos_token_ids


def test_batched_equals_alone(llm):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = llm.generate(PROMPTS, params)  # 5 prompts, 4 slots: also exercises admission
    for prompt, out in zip(PROMPTS, together):
        alone = llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert len(out.token_ids) == 16 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    batch = llm.generate(PROMPTS[:3], params)
    for prompt, p, out in zip(PROMPTS, params, batch):
        assert llm.generate(prompt, p)[0].token_ids == out.token_ids
    # Different seeds give different samples (a fixed output would not be sampling at all).
    a = llm.generate(PROMPTS[0], SamplingParams(temperature=1.5, max_tokens=12, seed=10, ignore_eos=True))[0]
    b = llm.generate(PROMPTS[0], SamplingParams(temperature=1.5, max_tokens=12, seed=11, ignore_eos=True))[0]
    assert a.token_ids != b.token_ids


def test_metrics_and_text(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    m = out.metrics
    assert m.num_tokens == len(out.token_ids) == 10
    assert m.seconds > 0 and m.tokens_per_s == pytest.approx(10 / m.seconds)
    assert m.num_prompt_tokens == len(out.prompt_token_ids)
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_string_truncates(llm):
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text


def test_stop_token_ids(llm):
    full = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    tok = full.token_ids[5]
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[tok]))[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(tok) + 1]
    assert out.finish_reason == "stop"


def test_streaming_deltas_add_up(llm):
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    deltas = list(llm.generate_stream(PROMPTS[2], params))
    full = llm.generate(PROMPTS[2], params)[0]
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == full.text
    assert sum((d.token_ids for d in deltas), []) == full.token_ids
    assert deltas[-1].finished and deltas[-1].output.token_ids == full.token_ids
    assert not any(d.finished for d in deltas[:-1])


def test_context_limit_finishes_with_length(ckpt, llm):
    prompt_ids = llm.tokenizer.encode(PROMPTS[0])
    short = LLM(model=ckpt.path, max_num_seqs=1, max_model_len=len(prompt_ids) + 7)
    out = short.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(prompt_ids) + len(out.token_ids) == len(prompt_ids) + 7


def test_bad_input(ckpt, llm):
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate("", SamplingParams())
    long = "word " * 400  # the tiny model's context is 256 tokens
    with pytest.raises(RequestError, match=r"prompt has \d+ tokens; the model's context is 256"):
        llm.generate(long, SamplingParams())
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(SamplingParamsError, match="temperature"):
        SamplingParams(temperature=-0.5)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(SamplingParamsError, match="top_p"):
            SamplingParams(top_p=bad)
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(PROMPTS[:3], [SamplingParams(), SamplingParams()])
    # A failed request leaves the engine usable.
    assert llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3))[0].token_ids
