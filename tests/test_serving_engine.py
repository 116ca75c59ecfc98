"""The engine shaped for serving: ragged verification equals the reference chain rule, requests
join and leave mid-run with mixed ℓ in one batch and stay lossless (greedy identity, chi-square,
seeded batch independence), abort frees both caches, chunked prefill never stalls decoding, step
outputs add up, and one LLM is safe to use from several threads."""

from __future__ import annotations

import threading

import pytest
import torch

from dspark import LLM, SamplingParams
from dspark.drafters.ngram import NgramDrafter
from dspark.engine import Engine, EngineConfig
from dspark.sampling import make_generator
from dspark.verify import (SpecDecodeMetadata, draw_ragged_uniforms, verify_chain, verify_chain_greedy,
                           verify_ragged)
from helpers import PROMPTS, sampled_pairs_pvalue, untrained_dspark


def test_verify_ragged_equals_the_chain_reference():
    torch.manual_seed(0)
    V = 11
    for trial in range(30):
        R = 1 + trial % 5
        ells = [int(x) for x in torch.randint(0, 6, (R,))]
        greedy = [bool(x) for x in torch.rand(R) < 0.3]
        drafts, dprobs, tprobs = [], [], []
        for ell in ells:
            dp = torch.softmax(torch.randn(ell, V) * 2, -1)
            tp = torch.softmax(torch.randn(ell + 1, V) * 2, -1)
            # Drafts often equal the target's argmax so acceptance paths run too.
            d = torch.where(torch.rand(ell) < 0.5, tp[:ell].argmax(-1), torch.multinomial(dp, 1).squeeze(-1)) \
                if ell else torch.zeros(0, dtype=torch.long)
            drafts.append(d.tolist()), dprobs.append(dp), tprobs.append(tp)
        meta = SpecDecodeMetadata.build(drafts, max(ells) + 1)
        seeds = [100 * trial + r for r in range(R)]
        u = draw_ragged_uniforms(ells, [make_generator(s) for s in seeds], greedy)
        got = verify_ragged(meta, torch.cat(dprobs), torch.cat(tprobs), u, torch.tensor(greedy)).to_results(meta)
        for r in range(R):
            d = torch.tensor(drafts[r], dtype=torch.long)
            want = verify_chain_greedy(d, tprobs[r]) if greedy[r] else \
                verify_chain(d, dprobs[r], tprobs[r], make_generator(seeds[r]))
            assert got[r] == want, (trial, r, ells)


def _mixed_engine(qwen3_ckpt, plain, kind: str, max_num_seqs: int = 3) -> Engine:
    target = plain.target
    drafter = NgramDrafter(target.vocab_size, block_size=8) if kind == "ngram" else \
        untrained_dspark(target, max_num_seqs, kind=kind)
    return Engine(target, EngineConfig(max_num_seqs=max_num_seqs, num_speculative_tokens=4), drafter=drafter)


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_join_leave_mid_run_with_mixed_gamma_is_greedy_lossless(qwen3_ckpt, plain, plain_greedy, kind):
    eng = _mixed_engine(qwen3_ckpt, plain, kind)
    outs, aborted, ells_seen = {}, None, set()
    pending = list(range(len(PROMPTS)))
    ids = {}
    step = 0
    while pending or eng.has_unfinished():
        # Requests join two at a time every other step, each with its own γ (1..7): mixed ℓ per batch.
        if pending and step % 2 == 0:
            for i in pending[:2]:
                ids[eng.add_request(PROMPTS[i], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                               num_speculative_tokens=1 + i % 7))] = i
            pending = pending[2:]
        if step == 3:  # one request leaves early
            aborted = next(iter(ids))
            eng.abort(aborted)
        step_ells = set()
        for o in eng.step():
            step_ells.add(o.num_draft_tokens)
            if o.finished:
                outs[ids[o.request_id]] = o
        if len(step_ells - {0}) > 1:
            ells_seen.add(frozenset(step_ells))
        step += 1
    assert ells_seen, "no step verified different ℓ for different requests"
    assert outs[ids[aborted]].finish_reason == "abort"
    for i, o in outs.items():
        if o.request_id != aborted:
            assert o.output.token_ids == plain_greedy[i], i
    assert eng.cache.num_free == eng.max_num_seqs
    if kind != "ngram":
        assert eng.drafter._slots == {}


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_sampled_with_mixed_gamma_follows_target(qwen3_ckpt, plain, kind):
    # 2000 requests through 8 slots: requests join and leave every step, with γ 1..4 mixed.
    drafter = NgramDrafter(plain.target.vocab_size, block_size=8) if kind == "ngram" else \
        untrained_dspark(plain.target, 8)
    llm = LLM(model=qwen3_ckpt.path, drafter=drafter, max_num_seqs=8, num_speculative_tokens=4)
    pvalue, accepted = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model, n=2000, top_k=4, max_tokens=6,
                                            gammas=[1, 2, 3, 4])
    assert pvalue > 1e-3, pvalue


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_seeded_request_is_independent_of_joining_requests(qwen3_ckpt, plain, kind):
    p = SamplingParams(temperature=1.0, top_k=8, max_tokens=16, seed=5, ignore_eos=True, num_speculative_tokens=3)
    alone_eng = _mixed_engine(qwen3_ckpt, plain, kind)
    alone = alone_eng.run([PROMPTS[0]], [p])[0].token_ids
    eng = _mixed_engine(qwen3_ckpt, plain, kind)
    rid = eng.add_request(PROMPTS[0], p)
    got = None
    for step in range(200):
        if step in (1, 3):  # others join mid-run, with other γ and their own randomness
            eng.add_request(PROMPTS[step], SamplingParams(temperature=0.9, max_tokens=9, num_speculative_tokens=6,
                                                          ignore_eos=True))
        for o in eng.step():
            if o.request_id == rid and o.finished:
                got = o.output.token_ids
        if not eng.has_unfinished():
            break
    assert got == alone


def test_abort_frees_the_slot_in_both_caches(qwen3_ckpt, plain):
    eng = _mixed_engine(qwen3_ckpt, plain, "dspark", max_num_seqs=2)
    a = eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    b = eng.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.cache.num_free == 0 and len(eng.drafter._slots) == 2
    eng.abort(a)  # no step running: freed now
    assert eng.cache.num_free == 1 and len(eng.drafter._slots) == 1
    outs = eng.step()
    assert [o.finish_reason for o in outs if o.request_id == a] == ["abort"]
    assert any(o.request_id == b and o.new_token_ids for o in outs)
    eng.abort(b)
    eng.abort("no-such-id")  # ignored
    eng.step()
    assert eng.cache.num_free == 2 and eng.drafter._slots == {} and not eng.has_unfinished()


def test_chunked_prefill_never_stalls_decoding(plain):
    target = plain.target
    eng = Engine(target, EngineConfig(max_num_seqs=2, max_num_batched_tokens=8))
    a = eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eng.step()  # a's prompt (< 8 tokens... or its first chunk)
    while not any(r.prefilled for r in eng.running):
        eng.step()
    long_prompt = " ".join(PROMPTS[:2])
    n_long = len(target.tokenizer.encode(long_prompt))
    assert n_long > 40
    b = eng.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    prefill_steps = 0
    b_out = None
    while eng.has_unfinished():
        outs = {o.request_id: o for o in eng.step()}
        if b in outs and outs[b].finished:
            b_out = outs[b].output
        if eng.last_step.num_prefill_tokens:
            prefill_steps += 1
            assert eng.last_step.num_prefill_tokens <= 7  # the budget minus a's decode token
            if a in outs and not outs[a].finished:
                assert len(outs[a].new_token_ids) == 1  # a decoded in the same step
    assert prefill_steps >= n_long // 7
    want = plain.generate(long_prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert b_out.token_ids == want.token_ids  # chunked prefill computes the same thing


def test_prefill_groups_pad_little():
    from dspark.engine import PrefillChunk, _prefill_groups

    def groups(lengths):
        chunks = [PrefillChunk(request=None, num_tokens=n) for n in lengths]
        return [[c.num_tokens for c in g] for g in _prefill_groups(chunks)]

    assert groups([20, 22, 18, 21]) == [[20, 22, 18, 21]]  # similar lengths: one forward
    assert groups([5]) == [[5]]
    # A 500-token prompt is not padded onto ten short ones (which stay together, in scheduler order).
    assert groups([30, 500, 28, 31]) == [[30, 28, 31], [500]]
    got = groups([3, 400, 7, 390, 5])
    assert sorted(map(sorted, got)) == [[3, 5, 7], [390, 400]]
    for g in got:  # every forward's padding stays within the slack
        assert max(g) * len(g) <= 1.25 * sum(g) + 16
    # The CPU setting (no slack beyond 16 rows): the benchmark's chat prompts (37-53 tokens) are not all
    # padded to the longest; lengths within a few tokens still share a forward.
    tight = [[c.num_tokens for c in g] for g in _prefill_groups(
        [PrefillChunk(request=None, num_tokens=n) for n in [41, 45, 53, 38, 37, 38, 43, 43]], 0.0)]
    assert len(tight) > 1 and sorted(n for g in tight for n in g) == [37, 38, 38, 41, 43, 43, 45, 53]
    for g in tight:
        assert max(g) * len(g) <= sum(g) + 16
    assert [[c.num_tokens for c in g] for g in _prefill_groups(
        [PrefillChunk(request=None, num_tokens=n) for n in [20, 22, 18, 21]], 0.0)] == [[20, 22, 18, 21]]


@pytest.mark.parametrize("kind", ["plain", "dspark"])
def test_prompts_admitted_together_share_one_prefill_forward(qwen3_ckpt, plain, kind):
    target = plain.target
    drafter = untrained_dspark(target, 4) if kind == "dspark" else None
    eng = Engine(target, EngineConfig(max_num_seqs=4, num_speculative_tokens=3), drafter=drafter)
    calls = []
    real = target.forward

    def counting(cache, slots, tokens, *a, **kw):
        if kw.get("all_logits") is False:  # a prefill forward (decoding and verification score every token)
            calls.append([len(t) for t in tokens])
        return real(cache, slots, tokens, *a, **kw)

    target.forward = counting
    try:
        ids = {eng.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)): i
               for i, p in enumerate(PROMPTS[:4])}
        outs = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[ids[o.request_id]] = o.output
    finally:
        target.forward = real
    lengths = sorted(len(target.tokenizer.encode(p)) for p in PROMPTS[:4])
    assert len(calls) < 4  # fewer forwards than prompts
    assert sorted(n for c in calls for n in c) == lengths
    for i in range(4):  # and the same tokens as each prompt alone
        alone = plain.generate(PROMPTS[i], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        assert outs[i].token_ids == alone.token_ids, i


def test_a_failing_prompt_in_a_shared_prefill_fails_alone(plain):
    target = plain.target
    eng = Engine(target, EngineConfig(max_num_seqs=3))
    bad = PROMPTS[1]
    bad_ids = target.tokenizer.encode(bad)
    real = target.forward

    def failing(cache, slots, tokens, *a, **kw):
        if any(list(t) == list(bad_ids) for t in tokens):
            raise RuntimeError("injected prefill failure")
        return real(cache, slots, tokens, *a, **kw)

    target.forward = failing
    try:
        ids = {eng.add_request(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)): p
               for p in (PROMPTS[0], bad, PROMPTS[2])}
        outs = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[ids[o.request_id]] = o
    finally:
        target.forward = real
    assert outs[bad].error is not None and "injected prefill failure" in outs[bad].error
    for p in (PROMPTS[0], PROMPTS[2]):
        assert outs[p].error is None
        want = plain.generate(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
        assert outs[p].output.token_ids == want.token_ids
    assert eng.cache.num_free == 3


def test_step_outputs_add_up(plain):
    eng = plain.plain_engine()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    rid = eng.add_request(PROMPTS[2], params)
    text, ids, final = "", [], None
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid
            text += o.text_delta
            ids += o.new_token_ids
            if o.finished:
                final = o
    assert final.finish_reason == "length" and final.output.token_ids == ids and final.output.text == text
    assert final.metrics.time_to_first_token is not None and final.metrics.num_tokens == 12


def test_engine_config_is_validated(plain):
    with pytest.raises(ValueError, match="unknown verification policy 'fast'"):
        EngineConfig(policy="fast")
    with pytest.raises(ValueError, match=r"policy fixed:9 verifies more drafts than γ = 8"):
        Engine(plain.target, EngineConfig(policy="fixed:9"), drafter=NgramDrafter(plain.target.vocab_size, block_size=8))
    with pytest.raises(ValueError, match=r"policy threshold:0.5 needs a drafter with a confidence head"):
        Engine(plain.target, EngineConfig(policy="threshold:0.5"),
               drafter=NgramDrafter(plain.target.vocab_size, block_size=8))
    with pytest.raises(ValueError, match=r"policy fixed:2 needs a drafter"):
        Engine(plain.target, EngineConfig(policy="fixed:2"))
    with pytest.raises(ValueError, match="max_num_batched_tokens=4 must exceed"):
        Engine(plain.target, EngineConfig(max_num_seqs=2, max_num_batched_tokens=4),
               drafter=NgramDrafter(plain.target.vocab_size, block_size=8))


# ---- one LLM from several threads (issue 14) ------------------------------------------------------------

def test_concurrent_generate_on_one_llm(qwen3_ckpt):
    llm = LLM(model=qwen3_ckpt.path, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS[:8], params)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            results[t] = [o.token_ids for o in llm.generate(PROMPTS[2 * t:2 * t + 2], params)]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for t in range(4):
        assert results[t] == want[2 * t:2 * t + 2]
        assert all(len(ids) == 12 for ids in results[t])
    assert llm.engine.cache.num_free == 4


def test_closing_one_stream_leaves_the_others_running(qwen3_ckpt):
    llm = LLM(model=qwen3_ckpt.path, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = llm.generate(PROMPTS[1], params)[0]
    s1 = llm.generate_stream(PROMPTS[0], params)
    s2 = llm.generate_stream(PROMPTS[1], params)
    next(s1), next(s2)
    s1.close()  # aborts PROMPTS[0] only
    deltas = list(s2)
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finished and deltas[-1].output.token_ids == want.token_ids
    assert want.text.endswith(text) and llm.engine.cache.num_free == 4


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_drafters_follow_the_protocol_and_draw_only_their_own_ell(plain, kind):
    """Per-request ℓ (0 allowed) in one call: row r draws exactly ℓ_r uniforms from its generator."""
    from dspark.drafters import Drafter
    from dspark.sampling import SamplingTensors

    target = plain.target
    if kind == "ngram":
        d = NgramDrafter(target.vocab_size, block_size=8)
    else:
        d = untrained_dspark(target, 3)
    assert isinstance(d, Drafter) and isinstance(d.has_confidence, bool)
    for slot in range(3):
        ids = target.tokenizer.encode(PROMPTS[slot])
        cache = target.new_cache(1, 64)
        s = cache.allocate()
        hidden = target.forward(cache, [s], [ids], hidden_layer_ids=d.target_layer_ids).hidden
        d.add_sequence(slot, ids, None if hidden is None else hidden[0])
    params = [SamplingParams(temperature=1.0, seed=10 + i) for i in range(3)]
    gens = [make_generator(p.seed) for p in params]
    ells = [0, 3, 5]
    prop = d.propose([0, 1, 2], [5, 6, 7], ells, SamplingTensors.from_params(params), gens)
    assert prop.token_ids.shape == (3, 5) and prop.lengths(ells) == ells
    for ell, gen, p in zip(ells, gens, params):
        ref = make_generator(p.seed)
        drawn = ell if kind != "ngram" else 0  # prompt lookup samples nothing
        for _ in range(drawn):
            torch.rand(1, generator=ref, dtype=torch.float64)
        assert torch.equal(gen.get_state(), ref.get_state()), (ell, kind)
    # One batched commit for every sequence of the round.
    from dspark.drafters import DraftCommit
    hidden = None if not d.target_layer_ids else torch.zeros(3, 4, len(d.target_layer_ids), target.config.hidden_size)
    d.commit_batch(DraftCommit([0, 1, 2], [[5], [6, int(prop.token_ids[1, 0])], [7, 1, 2, 3]], hidden))
    if kind != "ngram":
        assert [d.context_length(s) for s in range(3)] == [len(target.tokenizer.encode(PROMPTS[s])) + n
                                                          for s, n in zip(range(3), (1, 2, 4))]
    for slot in range(3):
        d.free(slot)
