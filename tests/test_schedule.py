"""Confidence-scheduled verification (paper Algorithm 1): the step-cost table, the prefix scheduler's
choices and its stopping-time property (what keeps it lossless), and lossless decoding with it on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark import LLM, SamplingParams
from dspark.drafters.ngram import NgramDrafter
from dspark.schedule import (DraftGate, ScheduleError, StepCostTable, schedule_prefix, settled_schedule,
                             survival_from_confidence)
from helpers import PROMPTS, sampled_pairs_pvalue, untrained_dspark


def linear_cost(per_token: float, n: int = 64) -> StepCostTable:
    """A verify forward costs 1 + per_token·(B − 1) time units."""
    return StepCostTable(list(range(1, n + 1)), [1.0 + per_token * (b - 1) for b in range(1, n + 1)])


# ---- the step-cost table ----------------------------------------------------------------------------

def test_step_cost_interpolates_and_extrapolates():
    t = StepCostTable([1, 2, 4], [1.0, 1.5, 2.5])
    assert t.seconds_at(1) == 1.0 and t.seconds_at(3) == pytest.approx(2.0)
    assert t.seconds_at(6) == pytest.approx(3.5)  # along the last segment
    assert t.sps(2) == pytest.approx(1 / 1.5)
    assert StepCostTable.from_json(t.to_json()) == t


@pytest.mark.parametrize("tokens, seconds, match", [
    ([], [], "one time per token count"), ([2, 1], [1.0, 1.0], "increasing"), ([1, 2], [1.0, 0.0], "positive"),
])
def test_step_cost_rejects_bad_tables(tokens, seconds, match):
    with pytest.raises(ScheduleError, match=match):
        StepCostTable(tokens, seconds)


def test_step_cost_load_names_the_file(tmp_path):
    bad = tmp_path / "cost.json"
    bad.write_text('{"tokens": [1, 2]}')
    with pytest.raises(ScheduleError, match="cost.json.*'seconds'"):
        StepCostTable.load(bad)


def test_profile_measures_a_nondecreasing_table(plain):
    t = StepCostTable.profile(plain.target, max_tokens=24, context=8, repeats=1)
    assert t.tokens[:16] == list(range(1, 17)) and t.tokens[-1] == 24
    assert all(b >= a for a, b in zip(t.seconds, t.seconds[1:]))


# ---- Algorithm 1 ----------------------------------------------------------------------------------------

def test_free_verification_admits_every_draft_and_costly_admits_none():
    surv = [[0.9, 0.5, 0.1], [0.3, 0.2, 0.0]]
    assert schedule_prefix(surv, [3, 2], lambda b: 1.0) == [3, 2]  # caps bound ℓ
    assert schedule_prefix(surv, [3, 3], lambda b: 1.0 / 2 ** b) == [0, 0]


def test_batch_one_stops_at_the_first_local_maximum():
    # Θ(ℓ) = (1 + Σ_{j≤ℓ} a_j) / (1 + 0.25 ℓ): 1, 1.44, 1.6, 1.63, 1.58 -> ℓ = 3
    surv = [[0.8, 0.6, 0.45, 0.3, 0.2]]
    assert schedule_prefix(surv, [5], linear_cost(0.25)) == [3]


def test_batch_prefers_the_most_confident_request():
    # Request 1 is far more likely to be accepted: it gets the verification budget first.
    assert schedule_prefix([[0.2, 0.05], [0.95, 0.9]], [2, 2], linear_cost(0.3)) == [0, 2]


def test_survival_is_the_cumulative_product():
    s = survival_from_confidence(torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.2, 0.5]]))
    assert s[0] == pytest.approx([0.5, 0.25, 0.25]) and s[1] == pytest.approx([1.0, 0.2, 0.1])


rows = st.lists(st.lists(st.floats(0.3, 1.0), min_size=0, max_size=6), min_size=1, max_size=4)


# Step costs that rise by arbitrary steps, cliffs included (a concave curve would hide the bias:
# there the first drop is also the global maximum).
cost_steps = st.lists(st.sampled_from([0.0, 0.05, 0.2, 1.0]), min_size=25, max_size=25)


@settings(max_examples=400, deadline=None)
@given(conf=rows, steps=cost_steps, data=st.data())
def test_whether_draft_j_is_verified_never_depends_on_later_drafts(conf, steps, data):
    """The stopping-time property behind losslessness: [ℓ_r ≥ j] is a function of a_{r,1..j} (and of
    other requests) only. Changing a_{r,j+1..} (which depend on draft j and later) must not change it."""
    surv = [torch.cumprod(torch.tensor(c, dtype=torch.float64), 0).tolist() if c else [] for c in conf]
    caps = [len(r) for r in surv]
    seconds = torch.cumsum(torch.tensor([1.0] + steps, dtype=torch.float64), 0).tolist()
    cost = StepCostTable(list(range(1, len(seconds) + 1)), seconds)
    ells = schedule_prefix(surv, caps, cost)
    assert all(0 <= e <= c for e, c in zip(ells, caps))
    r = data.draw(st.integers(0, len(surv) - 1))
    if not surv[r]:
        return
    j = data.draw(st.integers(1, len(surv[r])))
    new_tail = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(surv[r]) - j, max_size=len(surv[r]) - j))
    changed = [list(x) for x in surv]
    level = surv[r][j - 1]
    for i, f in enumerate(new_tail):  # any non-increasing continuation below a_{r,j}
        level *= f
        changed[r][j + i] = level
    assert (schedule_prefix(changed, caps, cost)[r] >= j) == (ells[r] >= j)


@settings(max_examples=400, deadline=None)
@given(conf=rows, steps=cost_steps, k=st.integers(0, 6))
def test_a_settled_schedule_does_not_change_with_more_drafts(conf, steps, k):
    """What lets a drafter stop early: once `settled_schedule` on the first k positions returns a
    schedule, the schedule over all positions equals it."""
    surv = [torch.cumprod(torch.tensor(c, dtype=torch.float64), 0).tolist() if c else [] for c in conf]
    caps = [len(r) for r in surv]
    seconds = torch.cumsum(torch.tensor([1.0] + steps, dtype=torch.float64), 0).tolist()
    cost = StepCostTable(list(range(1, len(seconds) + 1)), seconds)
    known = [r[:k] for r in surv]
    settled = settled_schedule(known, caps, cost)
    if settled is not None:
        assert settled == schedule_prefix(known, caps, cost)
        assert schedule_prefix(surv, caps, cost) == settled
    # Everything known: always settled.
    assert settled_schedule(surv, caps, cost) == schedule_prefix(surv, caps, cost)


def test_the_papers_counterexample_verifies_nothing():
    # Appendix A: SPS(1..3) = 1, 0.5, 0.45 and a_1 = 0.8; Θ_1 = 0.9 < Θ_0 = 1 stops the search before
    # it can look at a_2 (which depends on x_1), whatever a_2 is.
    cost = StepCostTable([1, 2, 3], [1.0, 2.0, 1 / 0.45])
    assert schedule_prefix([[0.8, 0.72]], [2], cost) == [0]
    assert schedule_prefix([[0.8, 0.0]], [2], cost) == [0]


# ---- lossless decoding with the scheduler on --------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_with_confidence_scheduler_equals_plain(qwen3_ckpt, plain, plain_greedy, batch):
    drafter = untrained_dspark(plain.target, batch)
    assert drafter.has_confidence
    spec = LLM(model=qwen3_ckpt.path, drafter=drafter, max_num_seqs=batch, num_speculative_tokens=7,
               policy="confidence", step_cost=linear_cost(0.1))
    spec.engine.rule.gate = DraftGate(arms=(None,))  # Algorithm 1 uncapped in every round (the gate has its tests)
    short = []  # per propose call: were fewer tokens drafted than asked for?
    draft_block = drafter.draft_block
    drafter.draft_block = lambda *a, **k: (d := draft_block(*a, **k), short.append(d.token_ids.shape[1] < max(a[2])))[0]
    outs = spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain_greedy
    assert any(short)  # the early stop ended drafting before the asked ℓ (one ℓ group per round)
    tried = [sum(o.metrics.tried_by_position[k] for o in outs if len(o.metrics.tried_by_position) > k)
             for k in range(7)]
    rounds = sum(o.metrics.rounds for o in outs)
    # The scheduler verified a varying, shorter prefix: position 1 in most rounds, position 7 rarely.
    assert 0 < tried[0] <= rounds and tried[6] < tried[0] / 2


def test_sampled_with_confidence_scheduler_follows_target(qwen3_ckpt, plain):
    llm = LLM(model=qwen3_ckpt.path, drafter=untrained_dspark(plain.target, 8), max_num_seqs=8,
              num_speculative_tokens=3, policy="confidence", step_cost=linear_cost(0.1))
    llm.engine.rule.gate = DraftGate(arms=(None,))  # drafting in every round
    pvalue, _ = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model, n=2000, top_k=4)
    assert pvalue > 1e-3, pvalue


def test_confidence_scheduler_needs_a_confidence_head(qwen3_ckpt, plain):
    with pytest.raises(ScheduleError, match="policy confidence needs a drafter with a confidence head; the ngram"):
        LLM(model=qwen3_ckpt.path, drafter=NgramDrafter(plain.target.vocab_size, block_size=8),
            policy="confidence")
    with pytest.raises(ScheduleError, match="unknown verification policy 'fast'"):
        LLM(model=qwen3_ckpt.path, drafter=untrained_dspark(plain.target, 8), policy="fast")
