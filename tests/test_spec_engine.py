"""Speculative decoding in the engine is lossless: greedy output equals plain greedy output token for
token, and sampled output follows the target distribution (chi-square on the first two tokens)."""

from __future__ import annotations

import pytest
import torch

from dspark import LLM, SamplingParams
from dspark.drafters.ngram import NgramDrafter
from dspark.engine import RequestError
from dspark.sampling import SamplingTensors
from helpers import PROMPTS, sampled_pairs_pvalue, untrained_dspark


DRAFTER_KINDS = ["ngram", "dspark", "dflash"]


def make_drafter(kind: str, target, max_seqs: int):
    if kind == "ngram":
        return NgramDrafter(target.vocab_size, block_size=8)
    return untrained_dspark(target, max_seqs, kind=kind)


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


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("policy", ["static", "confidence"])
def test_context_extensions_follow_the_engines_commits(qwen3_ckpt, plain, plain_greedy, batch, policy):
    """block_context + context_next_token keep state across rounds (each sequence's last taps, and its last
    position waiting for the token after it): under the engine's real order of prompts, proposals, commits
    and rounds without drafts, every block must equal the one a fresh drafter drafts from the whole history."""
    from dspark.drafters import DSparkDrafter

    drafter = untrained_dspark(plain.target, batch, block_context=True, context_next_token=True)
    history: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    add, commit, draft = drafter.add_sequence, drafter.commit_batch, drafter.draft_block
    checked, commits = [], [0]

    def add_sequence(slot, prompt_ids, target_hidden):
        history[slot] = (list(prompt_ids), [target_hidden.clone()])
        add(slot, prompt_ids, target_hidden)

    def commit_batch(b):
        for i, (slot, ids) in enumerate(zip(b.slots, b.token_ids)):
            history[slot][0].extend(ids)
            history[slot][1].append(b.hidden_of(i).clone())
        commits[0] += 1
        commit(b)

    def draft_block(slots, anchors, num_draft_tokens, sampling, generators, stop=None):
        out = draft(slots, anchors, num_draft_tokens, sampling, generators, stop=stop)
        for row, (slot, anchor) in enumerate(zip(slots, anchors)):
            ids, taps = history[slot]
            assert drafter.context_length(slot) == len(ids)
            fresh = DSparkDrafter(drafter.model, 1, drafter.cache.max_len)
            fresh.add_sequence(0, ids, torch.cat(taps))
            want = fresh.draft_block([0], [anchor], out.base_logits.shape[1], SamplingTensors.from_params(
                [SamplingParams(temperature=0)]), [None])
            assert torch.allclose(out.base_logits[row], want.base_logits[0], atol=1e-4)
            checked.append(slot)
        return out

    drafter.add_sequence, drafter.commit_batch, drafter.draft_block = add_sequence, commit_batch, draft_block
    spec = LLM(model=qwen3_ckpt.path, drafter=drafter, max_num_seqs=batch, num_speculative_tokens=4, policy=policy)
    outs = spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain_greedy
    assert len(checked) >= (len(PROMPTS) if policy == "static" else 5)
    if policy == "confidence":  # its gate kept some rounds from drafting: commits completed the waiting position
        assert commits[0] > len(checked) / batch


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


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_sampled_speculative_output_follows_target(qwen3_ckpt, plain, kind):
    llm = LLM(model=qwen3_ckpt.path, drafter=make_drafter(kind, plain.target, 8), max_num_seqs=8,
              num_speculative_tokens=3)
    n = 2000
    pvalue, accepted = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model, n=n, top_k=4)
    if kind == "ngram":
        assert accepted > 0.05 * n  # drafts were accepted often enough to matter
    assert pvalue > 1e-3, pvalue


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_seeded_speculative_sampling_is_reproducible_and_batch_independent(qwen3_ckpt, plain, kind):
    def run(prompts, seeds, batch):
        llm = LLM(model=qwen3_ckpt.path, drafter=make_drafter(kind, plain.target, batch), max_num_seqs=batch,
                  num_speculative_tokens=4)
        params = [SamplingParams(temperature=1.0, top_k=8, max_tokens=16, seed=s, ignore_eos=True) for s in seeds]
        return [o.token_ids for o in llm.generate(prompts, params)]

    together = run(PROMPTS[:4], [5, 6, 7, 8], batch=4)
    assert together == run(PROMPTS[:4], [5, 6, 7, 8], batch=4)  # same seeds, same tokens
    for i in range(4):  # each request alone gives what it gave inside the batch
        assert run([PROMPTS[i]], [5 + i], batch=1)[0] == together[i]
    assert run(PROMPTS[:1], [99], batch=1)[0] != together[0]  # a different seed samples differently


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain_on_packed_fp16_weights(qwen3_bf16_ckpt, tmp_path, batch):
    """Verification (k tokens) and plain decoding (1 token) on the packed fp16-weight GEMM, with a
    loaded drafter whose own (inexact) weights are packed too."""
    plain = LLM(model=qwen3_bf16_ckpt.path, max_num_seqs=batch)
    assert plain.target.cpu_gemm == "fp16-weights"
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in plain.generate(PROMPTS, params)]
    drafter_dir = make_drafter("dspark", plain.target, batch).save_pretrained(tmp_path / "drafter")
    for drafter in ("ngram", str(drafter_dir)):
        spec = LLM(model=qwen3_bf16_ckpt.path, drafter=drafter, max_num_seqs=batch, num_speculative_tokens=7)
        if drafter != "ngram":
            model = spec.drafter.model
            packed = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]
            assert model.markov_head.markov_w2 in packed and model.fc in packed
        assert [o.token_ids for o in spec.generate(PROMPTS, params)] == ref, drafter


def test_sampled_speculative_with_packed_weights_follows_target(qwen3_bf16_ckpt, tmp_path):
    """Sampling through a loaded drafter with packed (fp16-rounded) weights on a packed target."""
    target = LLM(model=qwen3_bf16_ckpt.path, max_num_seqs=8).target
    drafter_dir = make_drafter("dspark", target, 8).save_pretrained(tmp_path / "drafter")
    llm = LLM(model=qwen3_bf16_ckpt.path, drafter=str(drafter_dir), max_num_seqs=8, num_speculative_tokens=3)
    assert llm.target.cpu_gemm == "fp16-weights" and "forward" in vars(llm.drafter.model.fc)
    pvalue, _ = sampled_pairs_pvalue(llm, qwen3_bf16_ckpt.hf_model, n=2000, top_k=4)
    assert pvalue > 1e-3, pvalue
