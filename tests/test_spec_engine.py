"""Speculative decoding in the engine is lossless: greedy output equals plain greedy output token for
token, and sampled output follows the target distribution (chi-square on the first two tokens)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from dspark import LLM, SamplingParams
from dspark.drafters import DSparkConfig, DSparkDrafter, DSparkModel
from dspark.drafters.ngram import NgramDrafter
from dspark.engine import RequestError

# 20 prompts with repetition, so prompt lookup finds matches and both accept and reject paths run.
PROMPTS = [f"{w} {w} the quick brown fox {i} jumps over {w}" for i, w in
           zip(range(20), itertools.cycle(["def", "add", "Hello", "world", "Numbers", "0 1 2 3"]))]


@pytest.fixture(scope="module")
def plain(qwen3_ckpt) -> LLM:
    return LLM(model=qwen3_ckpt.path, max_num_seqs=4)


@pytest.fixture(scope="module")
def plain_greedy(plain) -> list[list[int]]:
    outs = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    return [o.token_ids for o in outs]


def untrained_dspark(target, max_seqs: int, kind: str = "dspark", seed: int = 0) -> DSparkDrafter:
    """A randomly initialised drafter: its proposals are mostly rejected, so every rollback path runs."""
    cfg = DSparkConfig.for_target(target.config, target.tokenizer.mask_token_id, block_size=8,
                                  num_hidden_layers=1, markov_rank=0 if kind == "dflash" else 16,
                                  drafter_type=kind)
    return DSparkDrafter(DSparkModel.from_target(cfg, target, seed=seed), max_seqs, target.context_length)


DRAFTER_KINDS = ["ngram", "dspark", "dflash"]


def make_drafter(kind: str, target, max_seqs: int):
    if kind == "ngram":
        return NgramDrafter(target.vocab_size, block_size=8)
    return untrained_dspark(target, max_seqs, kind)


@pytest.mark.parametrize("kind", DRAFTER_KINDS)
@pytest.mark.parametrize("gamma", [1, 4, 7])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain(qwen3_ckpt, plain, plain_greedy, kind, gamma, batch):
    drafter = make_drafter(kind, plain.target, batch)
    spec = LLM(model=qwen3_ckpt.path, drafter=drafter, max_num_seqs=batch, num_speculative_tokens=gamma)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = spec.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == plain_greedy
    rounds = sum(o.metrics.rounds for o in outs)
    if kind == "ngram":
        assert rounds < 20 * 19  # prompt lookup finds the repetitions: speculation saved forwards
        assert sum(o.metrics.accepted_drafts for o in outs) > 0
    for o in outs:
        m = o.metrics
        assert m.accepted_length == pytest.approx((m.accepted_drafts + m.rounds) / m.rounds)
        assert len(m.tried_by_position) <= gamma
        assert all(a <= t for a, t in zip(m.accepted_by_position, m.tried_by_position))
        # Position 1 is tried every round that verified at least one draft.
        assert m.tried_by_position[0] <= m.rounds


def test_stop_conditions_with_speculation(qwen3_ckpt, plain):
    drafter = NgramDrafter(plain.target.vocab_size, block_size=8)
    spec = LLM(model=qwen3_ckpt.path, drafter=drafter, max_num_seqs=2, num_speculative_tokens=6)
    for mt in (1, 2, 5, 13):
        p = SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True)
        assert spec.generate(PROMPTS[:3], p)[1].token_ids == plain.generate(PROMPTS[:3], p)[1].token_ids
    full = plain.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_tok = full.token_ids[7]
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok])
    assert spec.generate(PROMPTS[0], p)[0].token_ids == plain.generate(PROMPTS[0], p)[0].token_ids
    with pytest.raises(RequestError, match="exceeds the ngram drafter's block_size 8"):
        spec.generate(PROMPTS[0], SamplingParams(num_speculative_tokens=9))


def _exact_joint(hf_model, prompt_ids: list[int], top_k: int) -> dict[tuple[int, int], float]:
    """P(x1, x2 | prompt) under the target with top-k sampling at temperature 1, computed exactly."""
    from dspark.sampling import logits_to_probs

    with torch.no_grad():
        p1 = logits_to_probs(hf_model(torch.tensor([prompt_ids])).logits[0, -1].float(), 1.0, top_k, 1.0)
        firsts = p1.nonzero().flatten().tolist()
        seqs = torch.tensor([prompt_ids + [x] for x in firsts])
        p2 = logits_to_probs(hf_model(seqs).logits[:, -1].float(), 1.0, top_k, 1.0)
    return {(x1, x2): float(p1[x1] * p2[i, x2]) for i, x1 in enumerate(firsts)
            for x2 in p2[i].nonzero().flatten().tolist()}


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_sampled_speculative_output_follows_target(qwen3_ckpt, plain, kind):
    # The prompt ends in the target's own greedy continuation, so prompt lookup proposes tokens
    # that carry real target mass and both the acceptance and the residual branches run.
    top_k = 4
    llm = LLM(model=qwen3_ckpt.path, drafter=make_drafter(kind, plain.target, 8), max_num_seqs=8,
              num_speculative_tokens=3)
    base = llm.tokenizer.encode("the quick brown")
    greedy = LLM(model=qwen3_ckpt.path).generate([base], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    prompt_ids = base + greedy[0].token_ids
    prompt = prompt_ids
    exact = _exact_joint(qwen3_ckpt.hf_model, prompt_ids, top_k)
    n = 2000
    params = [SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, seed=s, ignore_eos=True) for s in range(n)]
    outs = llm.generate([prompt] * n, params)
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        key = (o.token_ids[0], o.token_ids[1])
        assert key in exact, f"sampled a pair the target gives zero probability: {key}"
        counts[key] = counts.get(key, 0) + 1
    accepted = sum(o.metrics.accepted_drafts for o in outs)
    if kind == "ngram":
        assert accepted > 0.05 * n  # drafts were accepted often enough to matter
    keys = sorted(exact)
    obs = [counts.get(k, 0) for k in keys]
    exp = [exact[k] * n for k in keys]
    # Merge cells with small expectations into one bin, as the chi-square test requires.
    small = [i for i, e in enumerate(exp) if e < 5]
    big = [i for i in range(len(keys)) if i not in small]
    obs_b = [obs[i] for i in big] + ([sum(obs[i] for i in small)] if small else [])
    exp_b = [exp[i] for i in big] + ([sum(exp[i] for i in small)] if small else [])
    scale = sum(obs_b) / sum(exp_b)
    stat = chisquare(obs_b, [e * scale for e in exp_b])
    assert stat.pvalue > 1e-3, (stat, list(zip(obs_b, exp_b)))
