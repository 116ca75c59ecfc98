"""Drafter losses and the τ̂ metric (dspark.train.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.train.losses import (LossWeights, acceptance_rate, confidence_bce, expected_accepted_length,
                                 l1_distance, loss_terms, position_weights, total_loss)


def test_l1_of_identical_is_zero_and_of_disjoint_is_two() -> None:
    p = torch.softmax(torch.randn(3, 10), dim=-1)
    assert torch.allclose(l1_distance(p, p), torch.zeros(3))
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.25, 0.75]])
    assert torch.allclose(l1_distance(a, b), torch.tensor([2.0]))
    assert torch.allclose(acceptance_rate(a, b), torch.tensor([0.0]))
    # Acceptance = Σ min(p, q), the speculative-sampling identity.
    q = torch.softmax(torch.randn(3, 10), dim=-1)
    assert torch.allclose(acceptance_rate(p, q), torch.minimum(p, q).sum(-1), atol=1e-6)


def test_position_weights() -> None:
    w = position_weights(4, 2.0)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]))
    assert torch.equal(position_weights(3, None), torch.ones(3))


def test_bce_is_minimal_at_the_soft_label() -> None:
    target = torch.tensor([0.3])
    logits = torch.linspace(-4, 4, 801)
    losses = confidence_bce(logits, target.expand(801))
    best = torch.sigmoid(logits[losses.argmin()])
    assert abs(float(best) - 0.3) < 0.01
    # and the gradient vanishes exactly there
    x = torch.logit(target).requires_grad_(True)
    confidence_bce(x, target).sum().backward()
    assert abs(float(x.grad)) < 1e-6


def test_expected_accepted_length() -> None:
    a = torch.tensor([[0.5, 0.5, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    # 1 + 0.5 + 0.25 + 0.25; 1 + 3; 1 + 0
    assert torch.allclose(expected_accepted_length(a), torch.tensor([2.0, 4.0, 1.0]))
    mask = torch.tensor([[True, True, False]] * 3)
    assert torch.allclose(expected_accepted_length(a, mask), torch.tensor([1.75, 3.0, 1.0]))


def test_loss_terms_values_and_masking() -> None:
    torch.manual_seed(0)
    B, A, G, V = 2, 3, 4, 11
    draft = torch.randn(B, A, G, V)
    target = torch.randn(B, A, G, V)
    labels = torch.randint(0, V, (B, A, G))
    conf = torch.randn(B, A, G)
    mask = torch.ones(B, A, G, dtype=torch.bool)
    mask[0, 1, 2:] = False  # a block running past the end of its sequence
    mask[1, 2] = False  # a padding anchor
    t = loss_terms(draft, target, labels, mask, conf, decay=3.0)

    w = position_weights(G, 3.0) * mask.float()
    pd, pt = draft.softmax(-1), target.softmax(-1)
    ce = -draft.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    l1 = (pd - pt).abs().sum(-1)
    c_star = 1 - 0.5 * l1
    bce = -(c_star * torch.nn.functional.logsigmoid(conf) + (1 - c_star) * torch.nn.functional.logsigmoid(-conf))
    assert torch.allclose(t.ce, (ce * w).sum(), atol=1e-5)
    assert torch.allclose(t.tv, (l1 * w).sum(), atol=1e-5)
    assert torch.allclose(t.conf, (bce * w).sum(), atol=1e-5)
    assert torch.allclose(t.weight_sum, w.sum())
    assert float(t.num_blocks) == 5  # one of six blocks has no supervised position
    tau = 1 + (c_star * mask).cumprod(-1).sum(-1)
    assert torch.allclose(t.tau_sum, tau[mask.any(-1)].sum(), atol=1e-5)

    # Garbage at masked positions changes nothing.
    draft2, target2, labels2 = draft.clone(), target.clone(), labels.clone()
    draft2[~mask] = 1e4 * torch.randn_like(draft2[~mask])
    target2[~mask] = -7.0
    labels2[~mask] = 0
    t2 = loss_terms(draft2, target2, labels2, mask, conf, decay=3.0)
    for name in ("ce", "tv", "conf", "weight_sum", "tau_sum"):
        assert torch.allclose(getattr(t, name), getattr(t2, name), atol=1e-5), name

    total = total_loss(t, LossWeights())
    assert torch.allclose(total, (0.1 * t.ce + 0.9 * t.tv + 1.0 * t.conf) / t.weight_sum)


def test_perfect_draft_has_zero_tv_and_tau_of_full_block() -> None:
    logits = torch.randn(1, 2, 5, 7)
    labels = logits.argmax(-1)
    t = loss_terms(logits, logits, labels, torch.ones(1, 2, 5, dtype=torch.bool), None, decay=None)
    assert float(t.tv) == pytest.approx(0.0, abs=1e-5)
    assert float(t.conf) == 0.0
    assert float(t.tau_sum / t.num_blocks) == pytest.approx(6.0, abs=1e-4)


def test_tv_gradient_only_flows_into_the_draft() -> None:
    draft = torch.randn(1, 1, 3, 5, requires_grad=True)
    target = torch.randn(1, 1, 3, 5, requires_grad=True)
    conf = torch.randn(1, 1, 3, requires_grad=True)
    t = loss_terms(draft, target, torch.zeros(1, 1, 3, dtype=torch.long), torch.ones(1, 1, 3, dtype=torch.bool), conf)
    total_loss(t, LossWeights()).backward()
    assert draft.grad is not None and draft.grad.abs().sum() > 0
    assert target.grad is None  # the target is frozen
    assert conf.grad is not None


def test_kl_term_is_forward_kl_to_the_target_and_off_by_default() -> None:
    torch.manual_seed(0)
    draft = torch.randn(2, 3, 4, 11)
    target = torch.randn(2, 3, 4, 11)
    labels = torch.randint(0, 11, (2, 3, 4))
    mask = torch.rand(2, 3, 4) > 0.3
    t = loss_terms(draft, target, labels, mask, None, decay=3.0)
    w = position_weights(4, 3.0) * mask.float()
    per_pos = torch.nn.functional.kl_div(torch.log_softmax(draft, -1), torch.log_softmax(target, -1),
                                         log_target=True, reduction="none").sum(-1)
    assert torch.allclose(t.kl, (per_pos * w).sum(), atol=1e-5)
    # A perfect draft has zero KL.
    assert float(loss_terms(target, target, labels, mask, None).kl) == pytest.approx(0.0, abs=1e-5)
    # The paper's loss leaves it out; a weight adds it.
    assert torch.allclose(total_loss(t, LossWeights()), (0.1 * t.ce + 0.9 * t.tv) / t.weight_sum)
    assert torch.allclose(total_loss(t, LossWeights(kl=0.5)), (0.1 * t.ce + 0.9 * t.tv + 0.5 * t.kl) / t.weight_sum)


def test_kl_term_over_a_reduced_draft_vocabulary() -> None:
    """Over draft ids D: Σ_{v∈D} p_t(v)(log p_t(v) − log p_d(v)), the same whether the caller passes the
    target's full logits or its log-probabilities over D only; its gradient reaches the draft logits."""
    torch.manual_seed(1)
    V, ids = 12, torch.tensor([0, 3, 4, 7, 9])
    draft = torch.randn(1, 2, 3, len(ids), requires_grad=True)
    target = torch.randn(1, 2, 3, V)
    labels = ids[torch.randint(0, len(ids), (1, 2, 3))]
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    t = loss_terms(draft, target, labels, mask, None, decay=None, draft_ids=ids)
    log_pt = torch.log_softmax(target, -1)[..., ids]
    want = (log_pt.exp() * (log_pt - torch.log_softmax(draft, -1))).sum()
    assert torch.allclose(t.kl, want, atol=1e-5)
    t2 = loss_terms(draft, log_pt, labels, mask, None, decay=None, draft_ids=ids, target_in_draft_vocab=True)
    assert torch.allclose(t2.kl, t.kl, atol=1e-5)
    total_loss(t, LossWeights(ce=0, tv=0, conf=0, kl=1.0)).backward()
    assert draft.grad is not None and draft.grad.abs().sum() > 0
