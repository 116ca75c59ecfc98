"""Verification policies (static, plain, fixed:K, threshold:P, confidence): what each verifies, the
stopping-time property that keeps them lossless, Algorithm 1 against a brute-force search, and
lossless decoding with every policy in the batched engine (greedy identity with mixed ℓ and requests
joining and leaving; chi-square on sampled output)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dspark import LLM, SamplingParams
from dspark.config import EngineConfig, VerifyPolicy, parse_policies
from dspark.engine import Engine
from dspark.schedule import (ConfidenceRule, DraftGate, ScheduleError, StepCostTable, ThresholdRule, policy_rule,
                             schedule_prefix)
from helpers import sampled_pairs_pvalue, untrained_dspark

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "models" / "dspark-demo-target"
DEMO_DRAFTER = REPO / "models" / "dspark-demo-drafter"

POLICIES = ["static", "plain", "fixed:1", "fixed:3", "threshold:0", "threshold:0.3", "threshold:0.7", "confidence"]


def linear_cost(per_token: float, n: int = 128) -> StepCostTable:
    return StepCostTable(list(range(1, n + 1)), [1.0 + per_token * (b - 1) for b in range(1, n + 1)])


# ---- parsing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("fast", "unknown verification policy 'fast'; choose one of static, plain, fixed:K"),
    ("fixed", "needs a value: fixed:K"), ("fixed:0", "integer K >= 1"), ("fixed:2.5", "integer K >= 1"),
    ("threshold:1", r"P in \[0, 1\)"), ("threshold:-0.1", r"P in \[0, 1\)"), ("threshold:x", "'x' is not a number"),
    ("confidence:3", "takes no value"),
])
def test_bad_policies_are_named(text, match):
    with pytest.raises(ScheduleError, match=match):
        VerifyPolicy.parse(text)


def test_policies_round_trip_and_lists():
    assert [str(p) for p in parse_policies("plain, fixed:1,threshold:0.25,confidence")] == \
        ["plain", "fixed:1", "threshold:0.25", "confidence"]
    with pytest.raises(ScheduleError, match="lists fixed:3 twice"):
        parse_policies("fixed:3,fixed:3.0")


# ---- the rules ------------------------------------------------------------------------------------------

def test_rules_cut_as_documented():
    surv = [[0.9, 0.6, 0.3, 0.1], [0.5, 0.2], []]
    caps = [4, 2, 0]
    assert policy_rule("static").draft_caps(caps) == [4, 2, 0]
    assert policy_rule("fixed:3").draft_caps(caps) == [3, 2, 0]
    assert policy_rule("plain").draft_caps(caps) == [0, 0, 0]
    assert policy_rule("threshold:0.25").lengths(surv, caps) == [3, 1, 0]
    assert policy_rule("threshold:0").lengths(surv, caps) == [4, 2, 0]
    with pytest.raises(ScheduleError, match="needs a step-cost table"):
        policy_rule("confidence")


rows = st.lists(st.lists(st.floats(0.05, 1.0), min_size=0, max_size=6), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(conf=rows, p=st.floats(0.0, 0.99), data=st.data())
def test_threshold_never_looks_at_the_draft_it_decides_on(conf, p, data):
    """[ℓ_r ≥ j] under threshold:P is a function of a_{r,1..j}: any other continuation after j
    (survivals that depend on draft j and later) leaves it unchanged; a settled threshold schedule
    equals the full one."""
    surv = [torch.cumprod(torch.tensor(c, dtype=torch.float64), 0).tolist() if c else [] for c in conf]
    caps = [len(r) for r in surv]
    rule = ThresholdRule(p)
    ells = rule.lengths(surv, caps)
    r = data.draw(st.integers(0, len(surv) - 1))
    if surv[r]:
        j = data.draw(st.integers(1, len(surv[r])))
        tail = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(surv[r]) - j, max_size=len(surv[r]) - j))
        changed = [list(x) for x in surv]
        level = surv[r][j - 1]
        for i, f in enumerate(tail):
            level *= f
            changed[r][j + i] = level
        assert (rule.lengths(changed, caps)[r] >= j) == (ells[r] >= j)
    k = data.draw(st.integers(0, 6))
    settled = rule.settled([row[:k] for row in surv], caps)
    if settled is not None:
        assert settled == ells


def _theta(surv, ells, cost) -> float:
    tau = sum(1 + sum(row[:e]) for row, e in zip(surv, ells))
    return tau * cost.sps(sum(1 + e for e in ells))


@settings(max_examples=300, deadline=None)
@given(conf=st.lists(st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4), min_size=1, max_size=3),
       per_token=st.floats(0.0, 1.5), curve=st.floats(0.5, 2.0))
def test_prefix_schedule_equals_brute_force_when_unimodal(conf, per_token, curve):
    """Admitting candidates in decreasing survival gives, for every B, the largest τ any schedule of
    B tokens can have; so when Θ is unimodal along that path, stopping at its first drop is the
    global maximum over all (ℓ_1..ℓ_R)."""
    surv = [torch.cumprod(torch.tensor(c, dtype=torch.float64), 0).tolist() for c in conf]
    caps = [len(r) for r in surv]
    n = sum(caps) + len(caps)
    cost = StepCostTable(list(range(1, n + 1)), [1.0 + per_token * (b - 1) ** curve for b in range(1, n + 1)])
    path = sorted(((-a, j, r) for r, row in enumerate(surv) for j, a in enumerate(row)))
    thetas, ells = [_theta(surv, [0] * len(caps), cost)], [0] * len(caps)
    for _, j, r in path:
        ells[r] = j + 1
        thetas.append(_theta(surv, ells, cost))
    peak = max(range(len(thetas)), key=lambda i: (thetas[i], -i))
    unimodal = all(b > a for a, b in zip(thetas[:peak], thetas[1:peak + 1])) and \
        all(b <= a for a, b in zip(thetas[peak:], thetas[peak + 1:]))
    assume(unimodal)
    best = max(_theta(surv, list(e), cost) for e in itertools.product(*(range(c + 1) for c in caps)))
    got = schedule_prefix(surv, caps, cost)
    assert _theta(surv, got, cost) == pytest.approx(best, rel=1e-12)
    assert sum(got) == peak


@settings(max_examples=200, deadline=None)
@given(conf=st.lists(st.lists(st.floats(0.05, 0.99), max_size=6), min_size=1, max_size=4),
       per_token_s=st.floats(0.01, 10.0))
def test_all_zeros_when_no_draft_pays(conf, per_token_s):
    # Verified tokens per second constant in B (each token costs the same): a draft token adds less
    # than a bonus token does (a < 1), so no candidate ever raises Θ.
    surv = [torch.cumprod(torch.tensor(c, dtype=torch.float64), 0).tolist() if c else [] for c in conf]
    cost = StepCostTable(list(range(1, 40)), [per_token_s * b for b in range(1, 40)])
    assert schedule_prefix(surv, [len(r) for r in surv], cost) == [0] * len(surv)


# ---- lossless decoding with every policy ------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_target():
    from dspark.models import load_target

    return load_target(DEMO_TARGET)


DEMO_PROMPTS = ["def binary_search(items, target):", "class Stack:\n    def __init__(self):",
                "import os\nimport sys\n\n\ndef main(argv):", "for key, value in sorted(d.items()):",
                "def read_lines(path):\n    with open(path) as f:", "    raise ValueError(\""]
MAX_TOKENS = [24, 9, 17, 30, 5, 21]   # requests leave at different steps
GAMMAS = [7, 2, 5, None, 1, 4]        # mixed ℓ in one batch (None: the drafter's block)


@pytest.fixture(scope="module")
def demo_plain(demo_target):
    eng = Engine(demo_target, max_num_seqs=6)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return [o.token_ids for o in eng.run(DEMO_PROMPTS, params)]


def _join_leave(engine: Engine) -> dict[int, list[int]]:
    """Three requests start; the others join one per step while earlier ones finish (3 slots)."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, num_speculative_tokens=g)
              for m, g in zip(MAX_TOKENS, GAMMAS)]
    ids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(zip(DEMO_PROMPTS[:3], params[:3]))}
    pending = list(range(3, len(DEMO_PROMPTS)))
    done: dict[int, list[int]] = {}
    while engine.has_unfinished() or pending:
        if pending:
            i = pending.pop(0)
            ids[engine.add_request(DEMO_PROMPTS[i], params[i])] = i
        for o in engine.step():
            if o.finished:
                assert o.finish_reason == "length", o.error
                done[ids[o.request_id]] = o.output.token_ids
    return done


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_greedy_exact_with_join_and_leave(demo_target, demo_plain, policy):
    from dspark.drafters import load_drafter

    drafter = load_drafter(DEMO_DRAFTER, demo_target, max_seqs=3, max_len=demo_target.context_length)
    seen: list = []
    engine = Engine(demo_target, EngineConfig(max_num_seqs=3, policy=policy), drafter=drafter,
                    step_cost=linear_cost(0.15))
    engine.round_observers.append(seen.append)
    done = _join_leave(engine)
    assert [done[i] for i in range(len(DEMO_PROMPTS))] == demo_plain
    verified = [e for rec in seen for e in rec.num_verified]
    if policy == "plain":
        assert engine.drafter is None and not seen
        return
    assert seen and sum(rec.num_accepted[i] for rec in seen for i in range(len(rec.request_ids))) > 0
    for rec in seen:  # never more verified than drafted, and never more accepted than verified
        assert all(a <= v <= d for a, v, d in zip(rec.num_accepted, rec.num_verified, rec.num_drafted))
    if policy.startswith("fixed:"):
        assert max(verified) == int(policy.split(":")[1])
    if policy in ("threshold:0.7", "confidence"):
        assert min(verified) < max(verified)  # the policy chose different ℓ from round to round
    if policy == "threshold:0":
        assert max(verified) == 7  # survival is always > 0: verify everything drafted


@pytest.mark.parametrize("policy", ["fixed:2", "threshold:0.2"])
def test_sampled_output_follows_the_target_under_policy(qwen3_ckpt, plain, policy):
    llm = LLM(model=qwen3_ckpt.path, drafter=untrained_dspark(plain.target, 8), max_num_seqs=8,
              num_speculative_tokens=3, policy=policy)
    pvalue, _ = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model, n=1500, top_k=4, gammas=[1, 3])
    assert pvalue > 1e-3, pvalue


# ---- the drafting gate: confidence drafts only in rounds where drafting is expected to pay ----------

def _table(ms_per_token: float = 1.0, base_ms: float = 20.0) -> StepCostTable:
    return StepCostTable(list(range(1, 65)), [(base_ms + ms_per_token * (b - 1)) / 1000 for b in range(1, 65)])


def _play(gate: DraftGate, num_reqs: int, rounds: int, accepted_at: dict, seconds_at: dict) -> list:
    """`rounds` rounds of `num_reqs` requests; a round under cap c accepts accepted_at[c] drafts in all
    and takes seconds_at[c]. Returns the caps the gate chose."""
    caps = []
    for _ in range(rounds):
        c = gate.cap(num_reqs)
        caps.append(c)
        gate.observe(num_reqs, c != 0, 0 if c == 0 else num_reqs, accepted_at[c], seconds_at[c])
    return caps


def test_gate_starts_plain_and_climbs_while_each_deeper_cap_pays():
    """Each batch size starts with no drafting; every probe_every rounds the gate probes a neighbour of
    its best arm (one cap up or down) for probe_rounds rounds, the first of them not measured, and
    plays the arm with the highest measured rate."""
    gate = DraftGate(probe_every=4, probe_rounds=3)
    accepted = {0: 0, 1: 0.6, 2: 0.8, None: 1.0}
    seconds = {0: 0.020, 1: 0.024, 2: 0.030, None: 0.060}  # rates 50, 66.7, 60, 33.3 tokens/s
    caps = _play(gate, 1, 4 + 3 + 4 + 3 + 8 + 3, accepted, seconds)
    assert caps == [0] * 4 + [1] * 3 + [1] * 4 + [2] * 3 + [1] * 8 + [0] * 3
    assert gate.stats[1][1] == pytest.approx([1.6, 0.024]) and gate.probe_every == 16
    assert gate.skipped == 0  # (counted by ConfidenceRule)
    # batch sizes are measured apart (drafting for 8 costs otherwise): a new one starts plain
    assert gate.cap(8) == 0 and gate.stats[8] == {}


def test_gate_stays_plain_when_drafting_does_not_pay():
    gate = DraftGate(probe_every=4, probe_rounds=3)
    accepted = {0: 0, 1: 0.2, 2: 0.3, None: 0.4}
    seconds = {0: 0.020, 1: 0.030, 2: 0.035, None: 0.060}
    caps = _play(gate, 2, 4 + 3 + 8 + 3 + 16, accepted, seconds)
    assert caps == [0] * 4 + [1] * 3 + [0] * 8 + [1] * 3 + [0] * 16  # probes back off: 4, 8, 16
    assert gate.probe_every == 16 and 2 not in gate.stats[2] and None not in gate.stats[2]


def test_gate_follows_the_text():
    gate = DraftGate(probe_every=4, probe_rounds=3, token_decay=0.5)  # a short token average, for the test
    accepted = {0: 0, 1: 0.2, 2: 0.2, None: 0.2}
    seconds = {0: 0.020, 1: 0.030, 2: 0.035, None: 0.060}
    caps = _play(gate, 1, 4 + 3 + 8 + 3, accepted, seconds)
    assert caps == [0] * 4 + [1] * 3 + [0] * 8 + [1] * 3 and gate.probe_every == 16
    # the text got easy: the probe re-measures cap 1 (its stale estimate dropped), which now wins and
    # is played; probes go back to every 4 rounds, to cap 1's neighbours
    easy = {**accepted, 1: 1.5}
    caps = _play(gate, 1, 16 + 3 + 4, easy, seconds)
    assert caps[:16] == [0] * 16 and caps[16:19] == [1, 1, 1] and caps[19:] == [1] * 4 and gate.probe_every == 4
    assert gate.cap(1) in (0, 2)


def test_gate_keeps_a_long_token_average_and_a_short_time_average():
    """One lucky probe round does not make drafting look paying (tokens: weight 0.05 on the newest
    round), while a probe re-times its arm from scratch (the machine's load drifts)."""
    gate = DraftGate(probe_every=4, probe_rounds=3)
    accepted = {0: 0, 1: 0.2, 2: 0.2, None: 0.2}
    seconds = {0: 0.020, 1: 0.030, 2: 0.035, None: 0.060}
    _play(gate, 1, 4 + 3, accepted, seconds)
    assert gate.stats[1][1] == pytest.approx([1.2, 0.030])
    caps = _play(gate, 1, 8 + 3, {**accepted, 1: 1.0}, {**seconds, 1: 0.027})  # two lucky rounds
    assert caps[8:] == [1, 1, 1] and gate.best(1) == 0  # 1.2 -> 1.28 tokens: 1.28 / 27 ms < 1 / 20 ms
    assert gate.stats[1][1] == pytest.approx([0.95 * (0.95 * 1.2 + 0.1) + 0.1, 0.027])


def test_gate_starts_a_new_batch_size_from_the_tokens_measured_at_others():
    """Acceptance hardly depends on the batch size: a first probe at a new R starts from the arm's
    tokens over every R, so two lucky rounds there do not switch it to drafting (they would alone)."""
    accepted = {0: 0, 1: 0.2, 2: 0.2, None: 0.2}
    seconds = {0: 0.020, 1: 0.030, 2: 0.035, None: 0.060}
    lucky = {**accepted, 1: 3.0}  # 3 of 3 drafts accepted at R = 3: 2.0 tokens a request
    for known in (True, False):
        gate = DraftGate(probe_every=4, probe_rounds=3)
        if known:
            _play(gate, 1, 4 + 3 + 8 + 3, accepted, seconds)  # R = 1: cap 1 yields 1.2 tokens
            assert gate.pooled[1] == pytest.approx(1.2)
        wait = gate.probe_every  # rounds to the next probe (backed off to 16 at R = 1)
        caps = _play(gate, 3, wait + 3, lucky, seconds)
        assert caps == [0] * wait + [1] * 3
        if known:  # 1.2 -> 1.2 + 0.05 * 0.8 + ...: 3 * 1.28 / 30 ms < 3 / 20 ms
            assert gate.stats[3][1][0] == pytest.approx(0.95 * (0.95 * 1.2 + 0.1) + 0.1) and gate.best(3) == 0
        else:  # the lucky rounds alone: 3 * 2.0 / 30 ms > 3 / 20 ms
            assert gate.stats[3][1][0] == pytest.approx(2.0) and gate.best(3) == 1


def test_gate_drafts_only_when_clearly_faster_than_plain():
    """A drafting arm must measure `margin` (5%) faster than not drafting: level arms stay plain."""
    for faster, want in ((1.03, 0), (1.08, 1)):
        gate = DraftGate(probe_every=4, probe_rounds=3, arms=(0, 1))
        caps = _play(gate, 1, 4 + 3 + 2, {0: 0, 1: faster - 1}, {0: 0.020, 1: 0.020})
        assert caps[:7] == [0] * 4 + [1] * 3 and caps[7:] == [want] * 2


def test_gate_rejects_bad_arms():
    with pytest.raises(ValueError, match="arms"):
        DraftGate(arms=(0, 1, 1))
    with pytest.raises(ValueError, match="probe_rounds"):
        DraftGate(probe_rounds=1)


def test_confidence_rule_caps_drafting_as_the_gate_says():
    rule = ConfidenceRule(_table())
    rule.gate = DraftGate(arms=(0, 2), probe_every=2)
    assert rule.draft_caps([7, 3, 0]) == [0, 0, 0] and rule.gate.skipped == 1  # arm 0 first
    rule.observe(3, False, verified=0, accepted=0, seconds=0.022)
    assert rule.draft_caps([7, 3, 0]) == [0, 0, 0] and rule.gate.skipped == 2
    rule.observe(3, False, verified=0, accepted=0, seconds=0.022)
    assert rule.draft_caps([7, 3, 0]) == [2, 2, 0]  # a probe of cap 2, never above a request's own ℓ
    rule.observe(3, True, verified=4, accepted=0, seconds=0.040)
    assert 2 not in rule.gate.stats[3]  # the first round after a change of arm is not measured
    assert rule.draft_caps([0, 0, 0]) == [0, 0, 0] and rule.gate.skipped == 2  # nothing to draft: not asked
    rule.observe(3, False, verified=0, accepted=0, seconds=0.022)  # (so this round is not counted)
    assert rule.draft_caps([7, 3, 0]) == [2, 2, 0]
    rule.observe(3, True, verified=4, accepted=1, seconds=0.040)
    assert rule.gate.stats[3][2] == [pytest.approx(4 / 3), 0.040] and rule.gate.stats[3][0] == [1.0, 0.022]


def test_confidence_rule_counts_the_drafting_time_of_a_round():
    """With D seconds of drafting measured (observe), Algorithm 1 maximises τ / (T(B) + D): a first draft
    of survival 0.2 does not pay against T(2)/T(1) = 1.25 alone, and pays once D = 10 ms is counted
    ((1 + 0.2) / (25 + 10) > 1 / (20 + 10)); the brute-force optimum of that objective over every
    prefix choice is what it returns."""
    table = _table(ms_per_token=5.0, base_ms=20.0)  # T(1) = 20 ms, T(2) = 25 ms, T(3) = 30 ms
    rule = ConfidenceRule(table)
    assert rule.lengths([[0.2, 0.1]], [2]) == [0] and rule.settled([[0.2]], [2]) == [0]
    rule.observe(2, True, verified=2, accepted=1, seconds=0.050, drafter_seconds=0.010)  # another R
    assert rule.lengths([[0.2, 0.1]], [2]) == [0]  # D is per number of requests
    rule.observe(1, False, verified=0, accepted=0, seconds=0.020, drafter_seconds=0.5)  # did not draft
    assert rule.lengths([[0.2, 0.1]], [2]) == [0]
    rule.observe(1, True, verified=1, accepted=1, seconds=0.040, drafter_seconds=0.010)
    assert rule.overhead[1] == pytest.approx(0.010)
    assert rule.lengths([[0.2, 0.1]], [2]) == [1]  # 0.1 more would not pay: (1.3) / 40 < 1.2 / 35
    assert rule.settled([[0.2, 0.1]], [2]) == [1]
    rule.observe(1, True, verified=1, accepted=0, seconds=0.040, drafter_seconds=0.020)  # EMA: 0.8 old
    assert rule.overhead[1] == pytest.approx(0.012)
    rule.count_drafter_time = False  # the paper's Algorithm 1: the table alone
    assert rule.lengths([[0.2, 0.1]], [2]) == [0]
    rule.count_drafter_time = True

    d = rule.overhead[1]
    for rows in ([[0.9, 0.5, 0.2]], [[0.6, 0.3], [0.25, 0.2]], [[0.15], [0.4, 0.1, 0.05]]):
        caps = [len(r) for r in rows]
        rule.observe(len(rows), True, verified=1, accepted=0, seconds=0.04, drafter_seconds=d)
        got = rule.lengths(rows, caps)

        def rate(ells):
            tau = len(rows) + sum(r[j] for r, e in zip(rows, ells) for j in range(e))
            return tau / (table.seconds_at(len(rows) + sum(ells)) + rule.overhead[len(rows)])
        best = max(itertools.product(*[range(c + 1) for c in caps]), key=rate)
        assert rate(got) == pytest.approx(rate(best)), (rows, got, best)


def test_gated_confidence_policy_stays_greedy_exact(demo_target, demo_plain):
    """Rounds that draft nothing (the gate) and rounds that do, mixed with join and leave: the same tokens."""
    from dspark.drafters import load_drafter

    class Alternating(DraftGate):
        def cap(self, num_reqs: int) -> int | None:
            self.calls = getattr(self, "calls", 0) + 1
            return None if self.calls % 3 == 0 else 0

    drafter = load_drafter(DEMO_DRAFTER, demo_target, max_seqs=3, max_len=demo_target.context_length)
    seen: list = []
    engine = Engine(demo_target, EngineConfig(max_num_seqs=3, policy="confidence"), drafter=drafter,
                    step_cost=linear_cost(0.15))
    engine.rule.gate = Alternating()
    engine.round_observers.append(seen.append)
    done = _join_leave(engine)
    assert [done[i] for i in range(len(DEMO_PROMPTS))] == demo_plain
    drafted = [sum(rec.num_drafted) for rec in seen]
    assert engine.rule.gate.skipped > 0 and any(d == 0 for d in drafted) and any(d > 0 for d in drafted)
    assert sum(a for rec in seen for a in rec.num_accepted) > 0


def test_deferred_commits_give_the_drafter_the_same_context(demo_target):
    """Rounds that draft nothing defer their commits to the next drafting round: the drafter then
    drafts exactly what it drafts when every round commits at once (same drafts, same acceptances,
    the same confidences to float32 rounding), in fewer drafter calls."""
    from dspark.drafters import load_drafter
    from dspark.drafters.base import DraftCommit

    class Alternating(DraftGate):
        def cap(self, num_reqs: int) -> int | None:
            self.calls = getattr(self, "calls", 0) + 1
            return None if self.calls % 4 == 0 else 0

    def run(deferred: bool):
        drafter = load_drafter(DEMO_DRAFTER, demo_target, max_seqs=3, max_len=demo_target.context_length)
        calls = []
        commit = drafter.commit_batch
        drafter.commit_batch = lambda batch: (calls.append([len(t) for t in batch.token_ids]), commit(batch))
        engine = Engine(demo_target, EngineConfig(max_num_seqs=3, policy="confidence"), drafter=drafter,
                        step_cost=linear_cost(0.15))
        engine.rule.gate = Alternating()
        engine.rule.count_drafter_time = False  # scheduling from the table alone: the two runs decide alike
        if not deferred:
            engine._defer_commit = lambda slots, kept, hidden: drafter.commit_batch(DraftCommit(slots, kept, hidden))
        seen: list = []
        engine.round_observers.append(seen.append)
        params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in range(3)]
        outs = [o.token_ids for o in engine.run(DEMO_PROMPTS[:3], params)]
        return outs, seen, calls

    outs_d, seen_d, calls_d = run(True)
    outs_i, seen_i, calls_i = run(False)
    assert outs_d == outs_i
    assert [r.num_drafted for r in seen_d] == [r.num_drafted for r in seen_i]
    assert [r.num_accepted for r in seen_d] == [r.num_accepted for r in seen_i]
    assert sum(a for r in seen_d for a in r.num_accepted) > 0
    for a, b in zip(seen_d, seen_i):
        for x, y in zip(a.confidence_logits or [], b.confidence_logits or []):
            torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), atol=1e-4, rtol=1e-4)
    # fewer drafter calls; one carries the three rounds that drafted nothing (one kept token each)
    assert len(calls_d) < len(calls_i) and max(max(c) for c in calls_d) >= 3


# ---- the step-cost table: cached per model, threads and machine ---------------------------------------

def test_step_cost_is_cached_per_threads_and_reprofiled_on_request(monkeypatch, tmp_path, plain):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    target = plain.target
    t1, path, cached = StepCostTable.cached(target, 6)
    assert not cached and path.is_file() and path.parent == tmp_path / "step-cost"
    t2, path2, cached2 = StepCostTable.cached(target, 6)
    assert cached2 and path2 == path and t2 == t1
    assert StepCostTable.cached(target, 4)[2]            # a table covering more is reused
    t3, _, cached3 = StepCostTable.cached(target, 9)      # one covering less is measured again
    assert not cached3 and t3.tokens[-1] == 9
    assert not StepCostTable.cached(target, 6, reprofile=True)[2]
    assert StepCostTable.cached(target, 6, hidden_layer_ids=[1])[1] != path  # other taps, other entry
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        assert StepCostTable.cached(target, 6)[1] != path
    finally:
        torch.set_num_threads(before)
    path.write_text("{damaged")
    assert not StepCostTable.cached(target, 6)[2]        # a damaged entry is measured again
    assert StepCostTable.cached(target, 6)[2]


def test_confidence_engine_reads_the_cached_table(monkeypatch, tmp_path, plain):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    drafter = untrained_dspark(plain.target, 2)
    e1 = Engine(plain.target, EngineConfig(max_num_seqs=2, policy="confidence"), drafter=drafter)
    e2 = Engine(plain.target, EngineConfig(max_num_seqs=2, policy="confidence"), drafter=untrained_dspark(plain.target, 2))
    assert not e1.step_cost_cached and e2.step_cost_cached and e2.step_cost == e1.step_cost
    assert e1.step_cost.tokens[-1] == 2 * (1 + drafter.block_size)
    e3 = Engine(plain.target, EngineConfig(max_num_seqs=2, policy="confidence", reprofile=True),
                drafter=untrained_dspark(plain.target, 2))
    assert not e3.step_cost_cached


def test_profile_steps_prints_the_table(monkeypatch, tmp_path, qwen3_ckpt, capsys):
    from dspark.cli import main

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    argv = ["profile-steps", "--model", str(qwen3_ckpt.path), "--drafter", "ngram", "--max-tokens", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "measured now" in out[0] and str(tmp_path / "step-cost") in out[0]
    assert out[1].split() == ["B", "ms/step", "steps/s", "tokens/s"] and len(out) == 2 + 5
    assert main(argv + ["--json"]) == 0
    data = __import__("json").loads(capsys.readouterr().out)
    assert data["cached"] and data["table"]["tokens"] == [1, 2, 3, 4, 5]
    assert main(["profile-steps", "--model", str(qwen3_ckpt.path), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dspark profile-steps: error: --max-tokens must be >= 1, got 0"
