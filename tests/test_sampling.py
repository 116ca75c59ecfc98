"""Tests for dspark.sampling: parameter validation and the logits -> probs -> token path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.errors import DSparkError
from dspark.sampling import (
    GREEDY_TEMPERATURE_EPS,
    SamplingParams,
    SamplingParamsError,
    SamplingTensors,
    logits_to_probs,
    make_generator,
    sample_from_probs,
    sample_inverse_cdf,
)

# ---------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_normalised():
    p = SamplingParams()
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.max_tokens == 64
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None
    assert p.num_speculative_tokens is None and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 1.5),
        ("num_speculative_tokens", 0),
        ("num_speculative_tokens", 65),
        ("num_speculative_tokens", -1),
        ("seed", "abc"),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_field_raises_naming_field_and_value(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert field in msg
    assert repr(value) in msg or str(value) in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, DSparkError)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_k=-1),
        dict(top_k=0),
        dict(top_k=50),
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(temperature=0.0),
        dict(max_tokens=1),
        dict(num_speculative_tokens=1),
        dict(num_speculative_tokens=64),
        dict(seed=0),
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE_EPS / 2).greedy
    assert not SamplingParams(temperature=1e-3).greedy


# ---------------------------------------------------------------------------------------------
# logits_to_probs
# ---------------------------------------------------------------------------------------------


def _ref_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Straightforward float64 reference for one row."""
    v = len(logits)
    if temperature < GREEDY_TEMPERATURE_EPS:
        out = np.zeros(v)
        out[int(np.argmax(logits))] = 1.0
        return out
    z = logits.astype(np.float64) / temperature
    keep = np.ones(v, dtype=bool)
    if 0 < top_k < v:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        # smallest n such that the top-n mass reaches top_p
        n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
        nucleus = np.zeros(v, dtype=bool)
        nucleus[order[:n]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def test_plain_softmax_when_filters_off():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    for k, p in [(0, 1.0), (-1, 1.0), (11, 1.0), (100, 1.0)]:
        torch.testing.assert_close(logits_to_probs(logits, 1.0, k, p), torch.softmax(logits, -1))
    torch.testing.assert_close(logits_to_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_top_k_keeps_exactly_k(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 10, generator=gen)  # continuous: no ties
    probs = logits_to_probs(logits, 0.8, k, 1.0)
    assert ((probs > 0).sum(-1) == k).all()
    top = logits.topk(k, dim=-1).indices
    assert (probs.gather(-1, top) > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))


def test_top_p_keeps_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # 0.5 < 0.7 <= 0.5 + 0.3 -> exactly two tokens
    out = logits_to_probs(logits, 1.0, 0, 0.7)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]]))
    # top token alone covers 0.4 -> only it is kept
    assert logits_to_probs(logits, 1.0, 0, 0.4).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    # tiny top_p still keeps the top token
    assert logits_to_probs(logits, 1.0, 0, 1e-9).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_matches_reference_on_random_rows():
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = int(rng.integers(2, 40))
        logits = rng.normal(size=v) * rng.uniform(0.1, 4)
        t = float(rng.choice([0.0, 0.3, 1.0, 1.7]))
        k = int(rng.choice([0, -1, 1, 3, 7, 50]))
        p = float(rng.choice([1.0, 0.2, 0.5, 0.9, 0.99]))
        ref = _ref_probs(logits, t, k, p)
        got = logits_to_probs(torch.tensor(logits, dtype=torch.float32), t, k, p).double().numpy()
        assert ((got > 0) == (ref > 0)).all(), (t, k, p)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_greedy_is_one_hot_on_lowest_argmax():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]])
    probs = logits_to_probs(logits, 0.0, 2, 0.5)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    # per-row tensor path agrees
    probs_t = logits_to_probs(logits, torch.zeros(2), torch.tensor([0, 3]), torch.tensor([1.0, 0.2]))
    assert probs_t.tolist() == probs.tolist()


def test_rows_with_different_params_equal_each_row_alone():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen) * 3
    temps = [0.0, 0.7, 1.0, 1.3, 0.5, 2.0]
    ks = [0, 5, 0, 20, -1, 1]
    ps = [1.0, 1.0, 0.8, 0.5, 0.95, 0.3]
    batch = logits_to_probs(logits, torch.tensor(temps), torch.tensor(ks), torch.tensor(ps))
    for i in range(6):
        alone = logits_to_probs(logits[i : i + 1], temps[i], ks[i], ps[i])
        assert torch.equal(batch[i : i + 1], alone), i
    # a batch that has only top-k rows goes through the partial-top-k branch; same answer
    batch_k = logits_to_probs(logits[:2], torch.tensor([0.7, 0.7]), torch.tensor([5, 0]), 1.0)
    assert torch.equal(batch_k[0], logits_to_probs(logits[0], 0.7, 5, 1.0))
    assert torch.equal(batch_k[1], logits_to_probs(logits[1], 0.7, 0, 1.0))


def test_per_request_params_broadcast_over_positions():
    # verification logits are [batch, gamma + 1, vocab] with one set of params per request
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 30, generator=gen)
    temps, ks, ps = [0.5, 0.0, 1.2], [3, 0, 0], [1.0, 1.0, 0.6]
    probs = logits_to_probs(logits, torch.tensor(temps), torch.tensor(ks), torch.tensor(ps))
    assert probs.shape == logits.shape
    for r in range(3):
        assert torch.equal(probs[r], logits_to_probs(logits[r], temps[r], ks[r], ps[r]))
    with pytest.raises(ValueError):
        logits_to_probs(logits, torch.ones(4))


def test_sampling_tensors_from_params():
    params = [SamplingParams(temperature=0.0, top_k=-1), SamplingParams(top_p=0.5, top_k=7)]
    st = SamplingTensors.from_params(params)
    assert st.top_k.tolist() == [0, 7] and st.greedy == [True, False]
    assert st.temperature.tolist() == [0.0, 1.0] and st.top_p.tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_inverse_cdf_never_returns_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 1e-16], dtype=torch.float64)
    assert sample_inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_sample_distribution_chi_square():
    probs = torch.tensor([[0.1, 0.0, 0.4, 0.2, 0.3]])
    gen = make_generator(123)
    n = 20_000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    tokens = sample_inverse_cdf(probs.expand(n, -1), u)
    counts = np.bincount(tokens.numpy(), minlength=5)
    assert counts[1] == 0
    keep = [0, 2, 3, 4]
    expected = probs[0, keep].double().numpy()
    expected = expected / expected.sum() * n
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3


def test_seeded_sampling_is_reproducible_and_batch_independent():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 100, generator=gen)
    temps, ks, ps = [0.9, 1.0, 0.0, 1.5], [0, 10, 0, 0], [0.9, 1.0, 1.0, 1.0]
    probs = logits_to_probs(logits, torch.tensor(temps), torch.tensor(ks), torch.tensor(ps))

    def run(rows: list[int], steps: int = 8) -> list[list[int]]:
        gens = [make_generator(1000 + r) for r in rows]
        out = []
        for _ in range(steps):
            out.append(sample_from_probs(probs[rows], gens).tolist())
        return [[step[i] for step in out] for i in range(len(rows))]

    batch = run([0, 1, 2, 3])
    assert batch == run([0, 1, 2, 3])  # reproducible
    for r in range(4):
        assert run([r])[0] == batch[r], r  # same tokens alone as inside the batch
    assert run([3, 0])[1] == batch[0]  # and in another batch order
    assert len(set(batch[0])) > 1  # actually random, not stuck


def test_greedy_rows_consume_no_randomness():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    gen = make_generator(5)
    ref = make_generator(5)
    assert sample_from_probs(probs[:1], [gen]).tolist() == [1]
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref))
    # explicit greedy flags on a non-one-hot row: argmax, still no draws
    assert sample_from_probs(probs[1:], [gen], greedy=[True]).tolist() == [2]
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref))


def test_sample_from_probs_validates_generator_count():
    with pytest.raises(ValueError):
        sample_from_probs(torch.full((2, 3), 1 / 3), [None])


def test_unseeded_rows_use_global_rng():
    probs = torch.full((3, 1000), 1e-3)
    torch.manual_seed(0)
    a = sample_from_probs(probs)
    torch.manual_seed(0)
    b = sample_from_probs(probs)
    assert torch.equal(a, b) and len(set(a.tolist())) > 1


def test_disabled_filters_skip_the_filter_work(monkeypatch):
    # batch-1 decoding calls this every step: with top-k/top-p off no filtering code may run
    import dspark.sampling as sampling

    def boom(*args, **kwargs):
        raise AssertionError("top-k/top-p work done although both are disabled")

    monkeypatch.setattr(sampling, "_mask_top_k_top_p", boom)
    logits = torch.randn(1, 1000)
    logits_to_probs(logits, 0.7, 0, 1.0)
    logits_to_probs(logits, 0.7, -1, 1.0)
    logits_to_probs(logits, torch.tensor([0.7]), torch.tensor([0]), torch.tensor([1.0]))


def test_top_p_candidate_shortcut_matches_full_sort(monkeypatch):
    import dspark.sampling as sampling

    gen = torch.Generator().manual_seed(4)
    # peaked rows (small nucleus: shortcut taken), a flat row (falls back), a disabled row, and
    # bf16-style ties that straddle the candidate boundary
    logits = torch.randn(5, 3000, generator=gen) * torch.tensor([[6.0], [6.0], [0.1], [6.0], [6.0]])
    logits[4] = logits[4].to(torch.bfloat16).float()
    temps = torch.tensor([0.7, 1.0, 1.0, 0.9, 1.0])
    ks = torch.tensor([0, 40, 0, 0, 0])
    ps = torch.tensor([0.9, 0.95, 0.5, 1.0, 0.97])
    monkeypatch.setattr(sampling, "_TOP_P_CANDIDATES", 10_000)  # > vocab: always full sort
    full = logits_to_probs(logits, temps, ks, ps)
    peaked = [0, 1, 3, 4]  # without the flat row the whole batch can take the shortcut
    for m in (8, 64, 512):
        monkeypatch.setattr(sampling, "_TOP_P_CANDIDATES", m)
        assert torch.equal(logits_to_probs(logits, temps, ks, ps), full), m
        got = logits_to_probs(logits[peaked], temps[peaked], ks[peaked], ps[peaked])
        assert torch.equal(got, full[peaked]), m
        for r in range(5):
            alone = logits_to_probs(logits[r], float(temps[r]), int(ks[r]), float(ps[r]))
            assert torch.equal(alone, full[r]), (m, r)
