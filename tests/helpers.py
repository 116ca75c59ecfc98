"""Helpers shared by several test modules (fixtures live in conftest.py).

    from helpers import PROMPTS, check_greedy_lossless, sampled_pairs_pvalue, untrained_dspark
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from dspark import LLM, SamplingParams
from dspark.drafters import DSparkConfig, DSparkDrafter, DSparkModel

# 20 prompts with repetition, so prompt lookup finds matches and both accept and reject paths run.
PROMPTS = [f"{w} {w} the quick brown fox {i} jumps over {w}" for i, w in
           zip(range(20), itertools.cycle(["def", "add", "Hello", "world", "Numbers", "0 1 2 3"]))]

# Prompt sets for `dspark eval` / `dspark bench`: repetitive, so prompt lookup accepts something; the
# long one exceeds the tiny context (256).
CODE = ["def add(a, b):\n    return a + b\ndef add(a, b):\n", "Hello world! Hello world! Hello",
        "The quick brown fox jumps over the lazy dog. The quick brown fox"]
MATH = ["1 2 3 4 5 6 7 8 9 10 1 2 3 4", "Numbers 0 1 2 3 4 5 6 7 8 9 " * 30, "100 1000 100 1000 100"]


def write_sets(d: Path) -> Path:
    """`humaneval.jsonl` (CODE) and `gsm8k.jsonl` (MATH) in `d`, two turns per prompt."""
    d.mkdir(parents=True, exist_ok=True)
    for name, turns in (("humaneval", CODE), ("gsm8k", MATH)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"turns": [t, "second turn"]}) + "\n" for t in turns))
    return d


def untrained_dspark(target, max_seqs: int, max_len: int | None = None, *, kind: str = "dspark", seed: int = 0,
                     block_size: int = 8, **overrides) -> DSparkDrafter:
    """A randomly initialised drafter: its proposals are mostly rejected, so every rollback path runs."""
    cfg = DSparkConfig.for_target(target.config, target.tokenizer.mask_token_id, block_size=block_size,
                                  num_hidden_layers=1, markov_rank=0 if kind == "dflash" else 16,
                                  drafter_type=kind, **overrides)
    return DSparkDrafter(DSparkModel.from_target(cfg, target, seed=seed), max_seqs,
                         max_len if max_len is not None else target.context_length)


def eval_dspark(target, max_seqs: int, max_len: int) -> DSparkDrafter:
    """The drafter factory the eval / bench tests pass: block size 6, so γ=8 is skipped with a note."""
    return untrained_dspark(target, max_seqs, max_len, block_size=6)


def check_greedy_lossless(ckpt_path, drafter, plain_greedy, gamma: int, batch: int) -> int:
    """Speculative greedy output == plain greedy output; returns the number of accepted drafts."""
    spec = LLM(model=ckpt_path, drafter=drafter, max_num_seqs=batch, num_speculative_tokens=gamma)
    outs = spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain_greedy
    for o in outs:
        m = o.metrics
        assert m.accepted_length == pytest.approx((m.accepted_drafts + m.rounds) / m.rounds)
        assert len(m.tried_by_position) <= gamma
        assert all(a <= t for a, t in zip(m.accepted_by_position, m.tried_by_position))
    assert spec.drafter._slots == {}  # every finished sequence was freed
    return sum(o.metrics.accepted_drafts for o in outs)


def exact_joint(hf_model, prompt_ids: list[int], top_k: int) -> dict[tuple[int, int], float]:
    """P(x1, x2 | prompt) under the target with top-k sampling at temperature 1, computed exactly."""
    from dspark.sampling import logits_to_probs

    with torch.no_grad():
        p1 = logits_to_probs(hf_model(torch.tensor([prompt_ids])).logits[0, -1].float(), 1.0, top_k, 1.0)
        firsts = p1.nonzero().flatten().tolist()
        seqs = torch.tensor([prompt_ids + [x] for x in firsts])
        p2 = logits_to_probs(hf_model(seqs).logits[:, -1].float(), 1.0, top_k, 1.0)
    return {(x1, x2): float(p1[x1] * p2[i, x2]) for i, x1 in enumerate(firsts)
            for x2 in p2[i].nonzero().flatten().tolist()}


def sampled_pairs_pvalue(llm: LLM, hf_model, n: int = 1000, top_k: int = 4, max_tokens: int = 3,
                         gammas: list[int] | None = None, text: str = "the quick brown") -> tuple[float, int]:
    """Sample (x1, x2) n times through `llm` (γ from the LLM) and chi-square them against the exact
    target distribution; returns (p-value, accepted drafts).

    The prompt ends in the target's own greedy continuation, so drafts carry real target mass and
    both the acceptance and the residual branches of verification run. `gammas`: request i asks for
    γ = gammas[i % len(gammas)] (mixed ℓ in one batch); `max_tokens` > 3 lets the first round verify
    more than one draft. `text`: the prompt's start."""
    base = llm.tokenizer.encode(text)
    greedy = llm.generate([base], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), speculative=False)
    prompt = base + greedy[0].token_ids
    exact = exact_joint(hf_model, prompt, top_k)
    params = [SamplingParams(temperature=1.0, top_k=top_k, max_tokens=max_tokens, seed=s, ignore_eos=True,
                             num_speculative_tokens=gammas[s % len(gammas)] if gammas else None) for s in range(n)]
    outs = llm.generate([prompt] * n, params)
    return pairs_pvalue(outs, exact), sum(o.metrics.accepted_drafts for o in outs)


def pairs_pvalue(outs, exact: dict[tuple[int, int], float]) -> float:
    """Chi-square p-value of the outputs' first two tokens against the exact joint distribution
    (pairs of expected count < 5 merged into one bin, as the test requires)."""
    n = len(outs)
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        key = (o.token_ids[0], o.token_ids[1])
        assert key in exact, f"sampled a pair the target gives zero probability: {key}"
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(exact)
    obs = [counts.get(k, 0) for k in keys]
    exp = [exact[k] * n for k in keys]
    small = [i for i, e in enumerate(exp) if e < 5]
    big = [i for i in range(len(keys)) if i not in small]
    obs_b = [obs[i] for i in big] + ([sum(obs[i] for i in small)] if small else [])
    exp_b = [exp[i] for i in big] + ([sum(exp[i] for i in small)] if small else [])
    scale = sum(obs_b) / sum(exp_b)
    return float(chisquare(obs_b, [e * scale for e in exp_b]).pvalue)
