"""Drafter training losses (paper §3.3) and the expected-accepted-length metric; pure functions.

    terms = loss_terms(out.logits, target_logits, out.labels, out.label_mask, out.confidence_logits,
                       decay=7.0)
    loss = total_loss(terms, LossWeights(), denominator=terms.weight_sum)

Every term is a per-position weighted sum, weights w_k = exp(−(k−1)/γ_decay) on supervised positions
only, divided by the sum of those weights. The sums and the denominator are returned separately so
data-parallel training can divide each rank's sums by the *global* denominator and get exactly the
loss of one process on the whole batch.

Symbols: ``...`` leading dims (e.g. [B, A]), G block size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossWeights:
    """α coefficients of the total loss (paper eq. 12 defaults)."""

    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0
    # Not in the paper (0 there): forward KL(p_t ‖ p_d), the soft-label cross-entropy knowledge
    # distillation uses. Its gradient does not vanish where the draft is far from the target, where
    # the L1 distance's is a sign pattern (on SmolLM2 it did not raise held-out τ̂: README).
    kl: float = 0.0


@dataclass
class LossTerms:
    """Weighted sums over supervised positions (divide by a denominator to get means)."""

    ce: Tensor  # scalar: Σ w_k · −log p_d,k(x*_k)
    tv: Tensor  # scalar: Σ w_k · ‖p_d,k − p_t,k‖₁
    conf: Tensor  # scalar: Σ w_k · BCE(c_k, c*_k); 0 without a confidence head
    kl: Tensor  # scalar: Σ w_k · Σ_v p_t,k(v) (log p_t,k(v) − log p_d,k(v)), v over the draft vocabulary
    weight_sum: Tensor  # scalar: Σ w_k, the natural denominator
    tau_sum: Tensor  # scalar, no grad: Σ over blocks of τ̂ (expected accepted length)
    num_blocks: Tensor  # scalar, no grad: blocks with at least one supervised position


def position_weights(block_size: int, decay: float | None, device: torch.device | str = "cpu") -> Tensor:
    """w_k = exp(−(k−1)/decay) for k = 1..G -> [G]; decay None or <= 0 gives uniform weights."""
    k = torch.arange(block_size, dtype=torch.float32, device=device)
    if decay is None or decay <= 0:
        return torch.ones_like(k)
    return torch.exp(-k / float(decay))


def l1_distance(p: Tensor, q: Tensor) -> Tensor:
    """‖p − q‖₁ over the last dim: [..., V] x2 -> [...]; 0 for equal, 2 for disjoint distributions.

    (Paper eq. 10 calls this the TV loss; the total variation distance proper is half of it.)"""
    return (p - q).abs().sum(dim=-1)


def acceptance_rate(draft_probs: Tensor, target_probs: Tensor) -> Tensor:
    """c* = 1 − ½‖p_d − p_t‖₁ = Σ min(p_d, p_t): the probability speculative sampling accepts a draft
    token drawn from p_d when the target distribution is p_t (paper eq. 8). [..., V] -> [...]."""
    return (1.0 - 0.5 * l1_distance(draft_probs, target_probs)).clamp(0.0, 1.0)


def expected_accepted_length(accept: Tensor, mask: Tensor | None = None) -> Tensor:
    """τ̂ = 1 + Σ_k Π_{i≤k} a_i per block: accept [..., G] -> [...]. The bonus token counts as 1, as
    for τ. Masked positions (past the end of the data) contribute nothing and stop the product."""
    if mask is not None:
        accept = accept * mask.to(accept.dtype)
    return 1.0 + accept.cumprod(dim=-1).sum(dim=-1)


def confidence_bce(confidence_logits: Tensor, target: Tensor) -> Tensor:
    """BCE(σ(logit), c*) elementwise, computed from logits for stability; minimal at σ(logit) = c*."""
    return F.binary_cross_entropy_with_logits(confidence_logits.float(), target, reduction="none")


def loss_terms(
    draft_logits: Tensor,  # [..., G, Vd] logits of the draft distribution (sequential bias included)
    target_logits: Tensor,  # [..., G, V] the target's logits for the same positions
    labels: Tensor,  # [..., G] long ground-truth tokens (target ids)
    mask: Tensor,  # [..., G] bool, True = supervised
    confidence_logits: Tensor | None = None,  # [..., G]
    decay: float | None = 7.0,
    draft_ids: Tensor | None = None,  # [Vd] long: target id of each draft id (reduced vocabulary)
    target_in_draft_vocab: bool = False,  # target_logits is [..., G, Vd]: log p_t of the draft ids only
) -> LossTerms:
    """CE, TV and confidence-BCE sums for a batch of blocks (target distributions at temperature 1).

    With a reduced draft vocabulary the draft distribution is zero outside `draft_ids`, so the L1
    distance is exact: Σ_{v in D} |p_d(v) − p_t(v)| + p_t(outside D); CE is taken only where the
    label is in D (elsewhere no draft could match it). `target_in_draft_vocab`: the caller passes
    log p_t(v) for v in D only (normalised over the whole vocabulary, e.g. from a stored log-normaliser),
    which is all the exact distance needs."""
    G = draft_logits.shape[-2]
    w = position_weights(G, decay, draft_logits.device) * mask.float()  # [..., G]
    log_pd = torch.log_softmax(draft_logits.float(), dim=-1)
    p_d = log_pd.exp()
    if target_in_draft_vocab:
        if draft_ids is None or target_logits.shape[-1] != draft_ids.numel():
            raise ValueError("target_in_draft_vocab needs draft_ids and target log-probs over them")
        log_pt = target_logits.float().detach()  # [..., G, Vd]
    else:
        log_pt = torch.log_softmax(target_logits.float(), dim=-1).detach()
    p_t = log_pt.exp()
    if draft_ids is None:
        ce = -log_pd.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [..., G]
        l1 = l1_distance(p_d, p_t)  # [..., G]
        kl = (p_t * (log_pt - log_pd)).sum(dim=-1)  # [..., G]
    else:
        V = max(int(labels.max()) + 1 if labels.numel() else 0, int(draft_ids.max()) + 1,
                0 if target_in_draft_vocab else p_t.shape[-1])
        t2d = torch.full((V,), -1, dtype=torch.long, device=labels.device)
        t2d[draft_ids] = torch.arange(draft_ids.numel(), device=labels.device)
        lab = t2d[labels]  # [..., G] draft id of the label, -1 outside
        ce = -log_pd.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (lab >= 0).float()
        p_t_in = p_t if target_in_draft_vocab else p_t[..., draft_ids]  # [..., G, Vd]
        log_pt_in = log_pt if target_in_draft_vocab else log_pt[..., draft_ids]
        l1 = l1_distance(p_d, p_t_in) + (1.0 - p_t_in.sum(dim=-1)).clamp_min(0.0)
        # The target's mass outside the draft vocabulary no draft can match: it adds a constant.
        kl = (p_t_in * (log_pt_in - log_pd)).sum(dim=-1)
    accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()  # c*_k, the confidence target
    zero = draft_logits.new_zeros((), dtype=torch.float32)
    conf = zero
    if confidence_logits is not None:
        conf = (confidence_bce(confidence_logits, accept) * w).sum()
    with torch.no_grad():
        has = mask.any(dim=-1)
        tau = expected_accepted_length(accept, mask)
        tau_sum = (tau * has.float()).sum()
        num_blocks = has.float().sum()
    return LossTerms(ce=(ce * w).sum(), tv=(l1 * w).sum(), conf=conf, kl=(kl * w).sum(), weight_sum=w.sum(),
                     tau_sum=tau_sum, num_blocks=num_blocks)


def total_loss(terms: LossTerms, weights: LossWeights, denominator: Tensor | float | None = None) -> Tensor:
    """α_ce·CE + α_tv·TV + α_conf·BCE (+ α_kl·KL), each a weighted mean over `denominator` (default: this batch's
    own weight sum; pass the all-reduced sum for data-parallel training)."""
    den = terms.weight_sum if denominator is None else denominator
    den = torch.as_tensor(den, dtype=torch.float32).clamp_min(1e-6)
    total = weights.ce * terms.ce + weights.tv * terms.tv + weights.conf * terms.conf
    if weights.kl:
        total = total + weights.kl * terms.kl
    return total / den
