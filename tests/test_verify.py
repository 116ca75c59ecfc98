"""Tests for dspark.verify: speculative sampling must reproduce the target distribution exactly.

Test model: a tiny "language" over V tokens whose next-token distributions depend on the absolute
position j and the previous token: target T[j][prev] and draft D[j][prev], each [V] (tables of
shape [positions, V, V]). A generation starts after a fixed anchor token A; position 0 is the
first generated token. The target's joint law of the first two tokens is T[0][A][a] * T[1][a][b].
A verification round starting at position s with anchor a drafts x_1 ~ D[s][a],
x_k ~ D[s+k-1][x_{k-1}], and is verified against target rows T[s][a], T[s+1][x_1], ...,
T[s+γ][x_γ]. If a round emits only one token, the second token comes from the next round.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.sampling import logits_to_probs, make_generator
from dspark.verify import (
    PAD_TOKEN_ID,
    VerifyResult,
    acceptance_probs,
    draw_verify_uniforms,
    residual_probs,
    verify_batch,
    verify_batch_tensors,
    verify_chain,
    verify_chain_greedy,
)

ANCHOR = 0

# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def make_tables(rng: np.random.Generator, positions: int, vocab: int, kind: str) -> np.ndarray:
    """[positions, V, V] float64 conditional tables, rows summing to 1.

    dense: Dirichlet(1); sparse: about half the entries zeroed (like a top-k/top-p target);
    one_hot: a deterministic proposal per (position, prev), like an n-gram drafter.
    """
    if kind == "one_hot":
        choice = rng.integers(0, vocab, size=(positions, vocab))
        return np.eye(vocab)[choice]
    tables = rng.dirichlet(np.ones(vocab), size=(positions, vocab))
    if kind == "sparse":
        mask = rng.random(tables.shape) < 0.5
        mask[..., 0] = False  # keep every row non-empty
        best = tables.argmax(-1)[..., None]
        np.put_along_axis(mask, best, False, axis=-1)
        tables = np.where(mask, 0.0, tables)
        tables /= tables.sum(-1, keepdims=True)
    return tables


def target_joint(T: np.ndarray) -> np.ndarray:
    """P(first token = a, second = b) under the target, [V, V]."""
    return T[0][ANCHOR][:, None] * T[1]


# ---------------------------------------------------------------------------------------------
# exact calculator, independent of dspark.verify
# ---------------------------------------------------------------------------------------------


def exact_round(
    D: np.ndarray, T: np.ndarray, start: int, anchor: int, gamma: int, naive: bool = False
) -> dict:
    """P(emitted sequence) of one round, following the algorithm analytically.

    Sums over every draft path (weighted by its draft probability) and every number of accepted
    tokens (weighted by the product of acceptance probabilities min(1, p_t/p_d)). ``naive``
    resamples corrections from p_t (a known bug) to show the check can fail.
    """
    vocab = D.shape[-1]
    out: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(vocab), repeat=gamma):
        prev = (anchor,) + path
        draft_rows = [D[start + k][prev[k]] for k in range(gamma)]
        target_rows = [T[start + k][prev[k]] for k in range(gamma + 1)]
        weight = np.prod([draft_rows[k][path[k]] for k in range(gamma)])
        if weight == 0:
            continue
        reach = weight  # P(path drafted and first k tokens accepted)
        for k in range(gamma):
            pt, pd = target_rows[k][path[k]], draft_rows[k][path[k]]
            alpha = min(1.0, pt / pd)
            reject = reach * (1 - alpha)
            if reject > 0:
                resid = np.maximum(target_rows[k] - draft_rows[k], 0)
                resid = resid / resid.sum() if resid.sum() > 1e-12 else target_rows[k]
                if naive:
                    resid = target_rows[k]
                for v in np.flatnonzero(resid):
                    seq = path[:k] + (int(v),)
                    out[seq] = out.get(seq, 0.0) + reject * resid[v]
            reach *= alpha
        for v in np.flatnonzero(target_rows[gamma]):
            seq = path + (int(v),)
            out[seq] = out.get(seq, 0.0) + reach * target_rows[gamma][v]
    return out


def first_two_joint(round_fn, vocab: int) -> np.ndarray:
    """Joint of the first two emitted tokens; a 1-token first round continues with a second round."""
    joint = np.zeros((vocab, vocab))
    second_round_first = {}
    for seq, p in round_fn(0, ANCHOR).items():
        if len(seq) >= 2:
            joint[seq[0], seq[1]] += p
            continue
        a = seq[0]
        if a not in second_round_first:
            marg = np.zeros(vocab)
            for seq2, p2 in round_fn(1, a).items():
                marg[seq2[0]] += p2
            second_round_first[a] = marg
        joint[a] += p * second_round_first[a]
    return joint


TABLE_KINDS = [
    ("dense", "dense"),
    ("one_hot", "dense"),  # deterministic drafter (n-gram / prompt lookup)
    ("dense", "sparse"),  # target after top-k / top-p: zeros the draft may still propose
    ("sparse", "sparse"),
    ("one_hot", "sparse"),
    ("dense", "one_hot"),  # greedy target
    ("same", "dense"),  # draft == target: everything accepted
]


def tables_for(kind: tuple[str, str], seed: int, gamma: int, vocab: int):
    rng = np.random.default_rng(seed)
    positions = gamma + 2  # the second round starts at position 1
    T = make_tables(rng, positions, vocab, kind[1])
    D = T.copy() if kind[0] == "same" else make_tables(rng, positions, vocab, kind[0])
    return D, T


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("kind", TABLE_KINDS, ids=lambda k: f"{k[0]}-draft-{k[1]}-target")
def test_exact_algorithm_preserves_first_two_tokens(kind, gamma):
    vocab = 5
    for seed in range(3):
        D, T = tables_for(kind, seed, gamma, vocab)
        joint = first_two_joint(lambda s, a: exact_round(D, T, s, a, gamma), vocab)
        np.testing.assert_allclose(joint.sum(1), T[0][ANCHOR], atol=1e-9)
        np.testing.assert_allclose(joint, target_joint(T), atol=1e-9)


def test_exact_calculator_can_fail():
    # guards against a vacuous check: resampling the correction from p_t instead of the residual
    # max(0, p_t - p_d) is a classic bug; it is not lossless and the same comparison catches it.
    vocab, gamma = 4, 2
    D, T = tables_for(("dense", "dense"), 0, gamma, vocab)
    naive = first_two_joint(lambda s, a: exact_round(D, T, s, a, gamma, naive=True), vocab)
    assert np.abs(naive - target_joint(T)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# exact enumeration through the code
# ---------------------------------------------------------------------------------------------


def code_round(D: np.ndarray, T: np.ndarray, start: int, anchor: int, gamma: int) -> dict:
    """P(emitted sequence) of one round as computed by verify_batch_tensors, exactly.

    The code's outcome is a piecewise-constant function of its uniforms: draft k is accepted iff
    u_k lies below min(1, p_t/p_d), and the bonus is token v iff u_bonus falls in v's interval of
    the bonus distribution's CDF. So one representative uniform per piece (its midpoint),
    weighted by the piece's length, integrates the code exactly. Pieces are found from the
    analytic distributions; if the code used other ones, the representatives would land on other
    tokens and the distribution would come out wrong.
    """
    vocab = D.shape[-1]
    rows_ids, rows_d, rows_t, rows_u, weights = [], [], [], [], []
    for path in itertools.product(range(vocab), repeat=gamma):
        prev = (anchor,) + path
        draft_rows = np.stack([D[start + k][prev[k]] for k in range(gamma)])
        target_rows = np.stack([T[start + k][prev[k]] for k in range(gamma + 1)])
        weight = np.prod([draft_rows[k][path[k]] for k in range(gamma)])
        if weight == 0:
            continue
        alpha = [min(1.0, target_rows[k][path[k]] / draft_rows[k][path[k]]) for k in range(gamma)]
        for pattern in itertools.product([True, False], repeat=gamma):  # u_k in accept region?
            w = weight * np.prod([a if acc else 1 - a for a, acc in zip(alpha, pattern)])
            if w == 0:
                continue
            u_acc = [a / 2 if acc else (1 + a) / 2 for a, acc in zip(alpha, pattern)]
            n = next((k for k, acc in enumerate(pattern) if not acc), gamma)
            if n < gamma:
                q = np.maximum(target_rows[n] - draft_rows[n], 0)
                q = q / q.sum() if q.sum() > 1e-12 else target_rows[n]
            else:
                q = target_rows[gamma]
            cdf = np.cumsum(q)
            for v in np.flatnonzero(q):
                rows_ids.append(path)
                rows_d.append(draft_rows)
                rows_t.append(target_rows)
                rows_u.append(u_acc + [cdf[v] - q[v] / 2])
                weights.append(w * q[v])
    out = verify_batch_tensors(
        torch.tensor(rows_ids).reshape(len(rows_ids), gamma),
        torch.tensor(np.array(rows_d)).reshape(len(rows_ids), gamma, vocab),
        torch.tensor(np.array(rows_t)),
        torch.full((len(rows_ids),), gamma),
        torch.tensor(rows_u, dtype=torch.float64),
    )
    dist: dict[tuple[int, ...], float] = {}
    for w, r in zip(weights, out.to_results()):
        dist[tuple(r.emitted)] = dist.get(tuple(r.emitted), 0.0) + w
    return dist


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("kind", TABLE_KINDS, ids=lambda k: f"{k[0]}-draft-{k[1]}-target")
def test_exact_enumeration_of_code_preserves_first_two_tokens(kind, gamma):
    vocab = 5 if gamma < 3 else 4
    for seed in range(2):
        D, T = tables_for(kind, 100 + seed, gamma, vocab)
        joint = first_two_joint(lambda s, a: code_round(D, T, s, a, gamma), vocab)
        np.testing.assert_allclose(joint.sum(1), T[0][ANCHOR], atol=1e-6)
        np.testing.assert_allclose(joint, target_joint(T), atol=1e-6)
        # the code's per-round law equals the analytic one, not just its first two tokens
        a = code_round(D, T, 0, ANCHOR, gamma)
        b = exact_round(D, T, 0, ANCHOR, gamma)
        for seq in set(a) | set(b):
            assert abs(a.get(seq, 0.0) - b.get(seq, 0.0)) < 1e-9, seq


def test_residual_and_acceptance_helpers():
    rng = np.random.default_rng(0)
    pt = torch.tensor(rng.dirichlet(np.ones(6)))
    pd = torch.tensor(rng.dirichlet(np.ones(6)))
    expected = (pt - pd).clamp(min=0)
    torch.testing.assert_close(residual_probs(pt, pd), expected / expected.sum())
    # one-hot draft (n-gram): residual is p_t without the proposed token, renormalised
    onehot = torch.zeros(6, dtype=torch.float64)
    onehot[2] = 1.0
    expected = pt.clone()
    expected[2] = 0
    torch.testing.assert_close(residual_probs(pt, onehot), expected / expected.sum())
    # identical distributions: no residual mass -> fall back to p_t
    torch.testing.assert_close(residual_probs(pt, pt), pt)
    # acceptance probabilities min(1, p_t/p_d)
    ids = torch.tensor([2, 4])
    acc = acceptance_probs(ids, torch.stack([onehot, pd]), torch.stack([pt, pt, pt]))
    torch.testing.assert_close(acc, torch.stack([pt[2], (pt[4] / pd[4]).clamp(max=1)]))


def test_acceptance_boundary_is_u_below_ratio():
    # p_t(x)=0.3, p_d(x)=0.6 -> accepted iff u < 0.5
    vocab = 3
    draft = torch.tensor([[0.6, 0.2, 0.2]], dtype=torch.float64)
    target = torch.tensor([[0.3, 0.5, 0.2], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    for u0, accepted in [(0.0, True), (0.4999999, True), (0.5, False), (0.9999999, False)]:
        out = verify_batch_tensors(
            torch.tensor([[0]]),
            draft[None],
            target[None],
            torch.tensor([1]),
            torch.tensor([[u0, 0.1]], dtype=torch.float64),
        )
        assert int(out.num_accepted[0]) == int(accepted), u0
        if not accepted:  # residual = [0, 0.3, 0] -> token 1 whatever u_bonus
            assert out.emitted[0].tolist() == [1, PAD_TOKEN_ID]
    assert vocab == target.shape[-1]


# ---------------------------------------------------------------------------------------------
# Monte-Carlo through the vectorised path
# ---------------------------------------------------------------------------------------------


def simulate_first_two(D: np.ndarray, T: np.ndarray, gamma: int, n: int, seed: int) -> np.ndarray:
    """Run the sampler n times (vectorised); return counts of the first two emitted tokens."""
    gen = torch.Generator().manual_seed(seed)
    Dt, Tt = torch.tensor(D), torch.tensor(T)
    vocab = D.shape[-1]

    def run_round(start: int, anchors: torch.Tensor):
        num = anchors.shape[0]
        prev, ids, draft_rows, target_rows = anchors, [], [], [Tt[start][anchors]]
        for k in range(gamma):
            d = Dt[start + k][prev]  # [num, V]
            x = torch.multinomial(d, 1, generator=gen).squeeze(1)
            ids.append(x)
            draft_rows.append(d)
            target_rows.append(Tt[start + k + 1][x])
            prev = x
        uniforms = torch.rand(num, gamma + 1, generator=gen, dtype=torch.float64)
        return verify_batch_tensors(
            torch.stack(ids, 1),
            torch.stack(draft_rows, 1),
            torch.stack(target_rows, 1),
            torch.full((num,), gamma),
            uniforms,
        )

    first = run_round(0, torch.full((n,), ANCHOR))
    tok1 = first.emitted[:, 0]
    tok2 = first.emitted[:, 1].clone()
    short = first.num_accepted == 0  # only the correction was emitted
    second = run_round(1, tok1[short])
    tok2[short] = second.emitted[:, 0]
    return np.bincount((tok1 * vocab + tok2).numpy(), minlength=vocab * vocab).reshape(vocab, vocab)


def chisquare_p(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    assert counts[~support].sum() == 0, "emitted a pair the target gives probability 0"
    expected = probs[support] / probs[support].sum() * counts.sum()
    return float(stats.chisquare(counts[support], expected).pvalue)


@pytest.mark.parametrize(
    "kind", [("dense", "dense"), ("one_hot", "dense"), ("dense", "sparse"), ("one_hot", "sparse")]
)
def test_monte_carlo_first_two_tokens_follow_target(kind):
    gamma, vocab, n = 3, 5, 100_000
    D, T = tables_for(kind, 7, gamma, vocab)
    counts = simulate_first_two(D, T, gamma, n, seed=11)
    assert chisquare_p(counts, target_joint(T)) > 1e-3


def test_monte_carlo_detects_a_biased_sampler():
    # the same test rejects the draft's own law, so it has power at this sample size
    gamma, vocab, n = 3, 5, 100_000
    D, T = tables_for(("dense", "dense"), 7, gamma, vocab)
    counts = simulate_first_two(D, D, gamma, n, seed=11)  # "target" = draft: output follows D
    assert chisquare_p(counts, target_joint(T)) < 1e-6


# ---------------------------------------------------------------------------------------------
# batch == chain, greedy, reproducibility
# ---------------------------------------------------------------------------------------------


def random_requests(seed: int, num: int, vocab: int, gamma_max: int):
    """Padded batch of requests with various ℓ, drafted from their own draft distributions."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(0, gamma_max + 1, (num,), generator=gen)]
    lengths[0] = gamma_max
    draft_logits = torch.randn(num, gamma_max, vocab, generator=gen) * 2
    draft_probs = logits_to_probs(draft_logits, 1.0, 0, 1.0)
    one_hot_rows = torch.rand(num, generator=gen) < 0.3  # some requests use an n-gram drafter
    ids = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=gen).reshape(num, gamma_max)
    draft_probs[one_hot_rows] = torch.nn.functional.one_hot(ids[one_hot_rows], vocab).float()
    # target close to the draft so that acceptance lengths vary
    target_logits = torch.cat([draft_logits, torch.randn(num, 1, vocab, generator=gen)], 1)
    target_logits = target_logits + torch.randn(num, gamma_max + 1, vocab, generator=gen)
    temps = torch.rand(num, generator=gen) + 0.3
    top_k = torch.tensor([0, 5] * (num // 2) + [0] * (num % 2))
    top_p = torch.tensor([1.0, 0.9, 0.95] * num)[:num]
    target_probs = logits_to_probs(target_logits, temps, top_k, top_p)
    for r, ell in enumerate(lengths):  # padding is garbage the code must never use
        if r % 2:
            ids[r, ell:] = PAD_TOKEN_ID
            draft_probs[r, ell:] = float("nan")
            target_probs[r, ell + 1 :] = float("nan")
        else:  # garbage that would likely be "accepted" if the code ignored ℓ
            likely = target_probs[r, ell].argmax()
            ids[r, ell:] = likely
            draft_probs[r, ell:] = torch.nn.functional.one_hot(likely, vocab).float()
            target_probs[r, ell + 1 :] = torch.nn.functional.one_hot(likely, vocab).float()
    return ids, draft_probs, target_probs, target_logits, lengths


def test_verify_batch_equals_verify_chain_per_request():
    vocab, gamma_max, num = 40, 6, 24
    ids, dp, tp, tl, lengths = random_requests(0, num, vocab, gamma_max)
    greedy = [r % 5 == 4 for r in range(num)]
    saw_partial = saw_full = False
    for round_idx in range(5):  # several rounds: generators advance identically in both paths
        if round_idx == 0:
            gens_batch = [make_generator(100 + r) for r in range(num)]
            gens_chain = [make_generator(100 + r) for r in range(num)]
        batch = verify_batch(ids, dp, tp, lengths, gens_batch, greedy)
        for r, ell in enumerate(lengths):
            if greedy[r]:
                alone = verify_chain_greedy(ids[r, :ell], tl[r, : ell + 1])
            else:
                alone = verify_chain(ids[r, :ell], dp[r, :ell], tp[r, : ell + 1], gens_chain[r])
            assert batch[r] == alone, (round_idx, r)
            assert len(alone.emitted) == alone.num_accepted + 1
            saw_partial |= 0 < alone.num_accepted < ell
            saw_full |= alone.num_accepted == ell > 0
    assert saw_partial and saw_full  # the fixture exercises both outcomes


def test_verify_batch_tensors_padding_layout():
    ids, dp, tp, _, lengths = random_requests(1, 6, 20, 4)
    uniforms = draw_verify_uniforms(lengths, [make_generator(r) for r in range(6)])
    out = verify_batch_tensors(ids, dp, tp, torch.tensor(lengths), uniforms)
    assert out.emitted.shape == (6, 5)
    for r in range(6):
        n = int(out.num_accepted[r])
        assert 0 <= n <= lengths[r]
        assert (out.emitted[r, n + 1 :] == PAD_TOKEN_ID).all()
        assert out.emitted[r, :n].tolist() == ids[r, :n].tolist()


def test_empty_chain_samples_the_bonus_from_the_target():
    target = torch.tensor([[0.0, 0.25, 0.75]])
    res = verify_chain(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), target, make_generator(0))
    assert res.num_accepted == 0 and res.emitted[0] in (1, 2)
    assert verify_chain_greedy(torch.zeros(0, dtype=torch.long), target) == VerifyResult(0, [2])


def test_greedy_verification_follows_target_argmax_chain():
    gen = torch.Generator().manual_seed(5)
    vocab, gamma = 30, 6
    logits = torch.randn(gamma + 1, vocab, generator=gen)
    best = logits.argmax(-1)
    for mismatch in range(gamma + 1):  # first mismatching position (gamma = none)
        drafts = best[:gamma].clone()
        if mismatch < gamma:
            drafts[mismatch] = (best[mismatch] + 1) % vocab
        res = verify_chain_greedy(drafts, logits)
        assert res.num_accepted == mismatch
        assert res.emitted == best[: mismatch + 1].tolist()
        # probabilities from logits_to_probs (greedy one-hot) give the same answer
        assert verify_chain_greedy(drafts, logits_to_probs(logits, 0.0)) == res
        # and the stochastic rule on one-hot targets agrees with it, whatever the draft probs
        draft_probs = torch.softmax(torch.randn(gamma, vocab, generator=gen), -1)
        stochastic = verify_chain(drafts, draft_probs, logits_to_probs(logits, 0.0), make_generator(0))
        assert stochastic == res


def test_greedy_ties_resolve_to_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    assert verify_chain_greedy(torch.tensor([2]), logits) == VerifyResult(0, [1])
    assert verify_chain_greedy(torch.tensor([1]), logits) == VerifyResult(1, [1, 0])


def test_greedy_rows_consume_no_randomness_and_need_no_draft_probs():
    ids, _, _, tl, lengths = random_requests(2, 4, 20, 3)
    gens = [make_generator(r) for r in range(4)]
    results = verify_batch(ids.clamp(min=0), None, tl, lengths, gens, [True] * 4)
    for r, res in enumerate(results):
        assert res == verify_chain_greedy(ids[r, : lengths[r]], tl[r, : lengths[r] + 1])
        assert torch.equal(torch.rand(3, generator=gens[r]), torch.rand(3, generator=make_generator(r)))
    with pytest.raises(ValueError):
        verify_batch(ids, None, tl, lengths, gens, [True, False, True, True])


def test_seeded_verification_is_reproducible():
    ids, dp, tp, _, lengths = random_requests(3, 8, 30, 5)

    def run(seed_base: int) -> list[VerifyResult]:
        gens = [make_generator(seed_base + r) for r in range(8)]
        return [res for _ in range(4) for res in verify_batch(ids, dp, tp, lengths, gens)]

    assert run(0) == run(0)
    assert run(0) != run(1000)
    r = 0
    a = [verify_chain(ids[r], dp[r], tp[r], make_generator(9)) for _ in range(3)]
    assert a == [verify_chain(ids[r], dp[r], tp[r], make_generator(9)) for _ in range(3)]


def test_shape_errors():
    with pytest.raises(ValueError):
        verify_chain(torch.tensor([1, 2]), torch.rand(2, 5), torch.rand(2, 5))
    with pytest.raises(ValueError):
        verify_chain_greedy(torch.tensor([1, 2]), torch.rand(2, 5))
    with pytest.raises(ValueError):
        verify_batch_tensors(
            torch.zeros(2, 3, dtype=torch.long),
            torch.rand(2, 3, 5),
            torch.rand(2, 3, 5),
            torch.tensor([3, 3]),
            torch.rand(2, 4, dtype=torch.float64),
        )
