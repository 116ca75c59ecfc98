"""Lossless chain verification: pure functions from (draft, target) distributions to tokens.

Usage::

    # one request, ℓ draft tokens, target probabilities from sampling.logits_to_probs
    result = verify_chain(draft_token_ids, draft_probs, target_probs, generator)
    result.num_accepted, result.emitted   # emitted = accepted draft tokens + the bonus

    # many requests with different ℓ, padded to a common width (same result as verify_chain)
    results = verify_batch(draft_token_ids, draft_probs, target_probs, num_draft_tokens, generators)

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x_k, sampled from
p_d[k], is accepted with probability min(1, p_t[k](x_k) / p_d[k](x_k)); at the first rejection the
bonus (a correction) is sampled from normalise(max(0, p_t[k] - p_d[k])); after full acceptance the
bonus is sampled from p_t[ℓ]. Every emitted token is then distributed exactly as the target.

This holds for any draft distribution, including deterministic drafters (n-gram / prompt lookup)
whose p_d is one-hot on the proposal: x is accepted with probability p_t(x), and the residual is
p_t with x removed, renormalised.

Greedy requests use :func:`verify_chain_greedy` (or ``greedy=True`` rows of :func:`verify_batch`):
accept while the draft equals the target argmax; no randomness is consumed and no draft
probabilities are needed. The stochastic rule would give the same tokens on one-hot targets, but
would burn uniforms and need p_d.

Randomness contract (what makes verify_batch equal to verify_chain): a stochastic request with ℓ
draft tokens draws exactly ``ℓ + 1`` float64 uniforms from its generator in one call; uniform k < ℓ
decides draft token k (accept iff ``u_k * p_d(x_k) < p_t(x_k)``, i.e. with probability
min(1, p_t/p_d), without dividing by p_d), and uniform ℓ samples the bonus.

Symbols: γ (gamma) draft tokens per chain, padded to ``gamma_max`` in a batch; ℓ_r the number of
draft tokens of request r; V the vocabulary size; R the number of requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.sampling import draw_uniforms, sample_inverse_cdf

# A residual whose total mass is at or below this is rounding noise (p_t and p_d agree up to
# float error); sampling from it would amplify that noise, so the bonus comes from p_t instead.
RESIDUAL_ZERO_TOL = 1e-12

PAD_TOKEN_ID = -1


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one chain: ``emitted`` = accepted draft tokens + one bonus token."""

    num_accepted: int
    emitted: list[int]  # len = num_accepted + 1 (τ, the accepted length in the paper's sense)

    @property
    def bonus_token_id(self) -> int:
        return self.emitted[-1]


@dataclass(frozen=True)
class BatchVerifyOutput:
    """Tensor form of a batch verification, for engines that keep results on the device."""

    num_accepted: torch.Tensor  # [R] int64
    emitted: torch.Tensor  # [R, gamma_max + 1] int64, PAD_TOKEN_ID after the bonus

    def to_results(self) -> list[VerifyResult]:
        counts = self.num_accepted.tolist()
        rows = self.emitted.tolist()
        return [VerifyResult(n, row[: n + 1]) for n, row in zip(counts, rows)]


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p_t - p_d)) over the last dim, float64; p_t itself where that is ~0.

    target_probs, draft_probs: ``[..., V]``. The fallback only triggers when a rejection was
    (numerically) impossible, so it does not bias the output.
    """
    t = target_probs.double()
    r = (t - draft_probs.double()).clamp_(min=0.0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > RESIDUAL_ZERO_TOL, r / mass, t / t.sum(dim=-1, keepdim=True))


def acceptance_probs(
    draft_token_ids: torch.Tensor,  # [..., gamma]
    draft_probs: torch.Tensor,  # [..., gamma, V]
    target_probs: torch.Tensor,  # [..., gamma(+1), V]
) -> torch.Tensor:
    """min(1, p_t(x_k) / p_d(x_k)) per draft token, float64 ``[..., gamma]`` (for analysis/eval).

    A draft token with p_d = 0 (the drafter broke its own contract) counts as accepted iff p_t > 0,
    matching the verification rule ``u * p_d < p_t``.
    """
    gamma = draft_token_ids.shape[-1]
    ids = draft_token_ids.long().clamp(min=0)[..., None]
    pt = target_probs[..., :gamma, :].gather(-1, ids).squeeze(-1).double()
    pd = draft_probs.gather(-1, ids).squeeze(-1).double()
    safe = torch.where(pd > 0, pd, torch.ones_like(pd))
    ratio = torch.where(pd > 0, pt / safe, (pt > 0).double())
    return ratio.clamp(max=1.0)


def verify_chain(
    draft_token_ids: torch.Tensor,  # [gamma] int
    draft_probs: torch.Tensor,  # [gamma, V]: the distribution each draft token was sampled from
    target_probs: torch.Tensor,  # [gamma + 1, V]: from logits_to_probs with the request's params
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Reference (loop) implementation of speculative sampling for one chain.

    Draws ``gamma + 1`` uniforms from ``generator`` (see the module's randomness contract).
    """
    gamma = draft_token_ids.shape[0]
    _check_chain_shapes(draft_token_ids, draft_probs, target_probs)
    u = draw_uniforms(gamma + 1, generator, target_probs.device)  # [gamma + 1] float64

    accepted: list[int] = []
    for k in range(gamma):
        x = int(draft_token_ids[k])
        pt = target_probs[k, x].double()
        pd = draft_probs[k, x].double()
        if u[k] * pd < pt:
            accepted.append(x)
            continue
        residual = residual_probs(target_probs[k], draft_probs[k])  # [V] float64
        correction = sample_inverse_cdf(residual[None], u[gamma : gamma + 1])
        return VerifyResult(k, accepted + [int(correction)])
    bonus = sample_inverse_cdf(target_probs[gamma].double()[None], u[gamma : gamma + 1])
    return VerifyResult(gamma, accepted + [int(bonus)])


def verify_chain_greedy(
    draft_token_ids: torch.Tensor,  # [gamma] int
    target_logits_or_probs: torch.Tensor,  # [gamma + 1, V]: argmax is the same for either
) -> VerifyResult:
    """Greedy verification: accept while the draft equals the target argmax, then emit the argmax.

    Ties resolve to the lowest index (torch.argmax), as in greedy plain decoding.
    """
    gamma = draft_token_ids.shape[0]
    if target_logits_or_probs.shape[0] != gamma + 1:
        raise ValueError(
            f"target has {target_logits_or_probs.shape[0]} rows for {gamma} draft tokens; "
            f"expected {gamma + 1}"
        )
    best = target_logits_or_probs.argmax(dim=-1).tolist()  # [gamma + 1]
    drafts = draft_token_ids.tolist()
    n = 0
    while n < gamma and drafts[n] == best[n]:
        n += 1
    return VerifyResult(n, drafts[:n] + [best[n]])


def draw_verify_uniforms(
    num_draft_tokens: Sequence[int],
    generators: Sequence[torch.Generator | None] | None = None,
    greedy: Sequence[bool] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniforms for :func:`verify_batch_tensors`, ``[R, gamma_max + 1]`` float64.

    Row r holds the ``ℓ_r + 1`` uniforms request r would draw in :func:`verify_chain` (one call
    on its own generator); greedy rows draw nothing and stay 0. Padding is 0 and never read.
    """
    num_reqs = len(num_draft_tokens)
    generators = [None] * num_reqs if generators is None else generators
    greedy = [False] * num_reqs if greedy is None else greedy
    if len(generators) != num_reqs or len(greedy) != num_reqs:
        raise ValueError(f"need one generator and one greedy flag per request ({num_reqs})")
    width = max(num_draft_tokens, default=0) + 1
    out = torch.zeros(num_reqs, width, dtype=torch.float64, device=device)
    for r, (n, gen, is_greedy) in enumerate(zip(num_draft_tokens, generators, greedy)):
        if not is_greedy:
            out[r, : n + 1] = draw_uniforms(n + 1, gen, device)
    return out


def verify_batch_tensors(
    draft_token_ids: torch.Tensor,  # [R, gamma_max] int, padding arbitrary (e.g. -1)
    draft_probs: torch.Tensor | None,  # [R, gamma_max, V]; None only if every row is greedy
    target_probs: torch.Tensor,  # [R, gamma_max + 1, V]; row ℓ_r is request r's bonus row
    num_draft_tokens: torch.Tensor,  # [R] int, ℓ_r <= gamma_max
    uniforms: torch.Tensor,  # [R, gamma_max + 1] float64, layout of draw_verify_uniforms
    greedy: torch.Tensor | None = None,  # [R] bool
) -> BatchVerifyOutput:
    """Vectorised verification of R padded chains, given their uniforms.

    Performs, row by row, the same float64 operations as :func:`verify_chain` and
    :func:`verify_chain_greedy`, so with uniforms from :func:`draw_verify_uniforms` the result is
    identical to verifying each request alone.
    """
    num_reqs, gamma_max = draft_token_ids.shape
    device = target_probs.device
    if target_probs.shape[:2] != (num_reqs, gamma_max + 1):
        raise ValueError(
            f"target_probs shape {tuple(target_probs.shape)} does not match draft_token_ids "
            f"{tuple(draft_token_ids.shape)}: expected [{num_reqs}, {gamma_max + 1}, V]"
        )
    num_draft = num_draft_tokens.to(device=device, dtype=torch.int64)  # [R]
    if greedy is None:
        greedy = torch.zeros(num_reqs, dtype=torch.bool, device=device)
    greedy = greedy.to(device)
    all_greedy = bool(greedy.all())
    if draft_probs is None and not all_greedy:
        raise ValueError("draft_probs is required unless every request is greedy")

    positions = torch.arange(gamma_max, device=device)  # [gamma_max]
    valid = positions[None, :] < num_draft[:, None]  # [R, gamma_max]
    ids = draft_token_ids.to(device=device, dtype=torch.int64).clamp(min=0)  # [R, gamma_max]
    target_best = target_probs.argmax(dim=-1)  # [R, gamma_max + 1]

    accept = ids == target_best[:, :gamma_max]  # greedy rule, [R, gamma_max]
    if not all_greedy:
        pt = target_probs[:, :gamma_max].gather(-1, ids[..., None]).squeeze(-1).double()
        pd = draft_probs.gather(-1, ids[..., None]).squeeze(-1).double()
        accept = torch.where(greedy[:, None], accept, uniforms[:, :gamma_max] * pd < pt)
    accept &= valid
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # [R] length of the accepted prefix

    rows = torch.arange(num_reqs, device=device)
    final = target_best[rows, num_accepted]  # [R] greedy bonus
    if not all_greedy:
        t_row = target_probs[rows, num_accepted]  # [R, V]
        rejected = num_accepted < num_draft  # [R]
        if gamma_max > 0:
            d_row = draft_probs[rows, num_accepted.clamp(max=gamma_max - 1)]  # [R, V]
            bonus_dist = torch.where(rejected[:, None], residual_probs(t_row, d_row), t_row.double())
        else:
            bonus_dist = t_row.double()
        u_bonus = uniforms.gather(1, num_draft[:, None]).squeeze(1)  # [R]
        final = torch.where(greedy, final, sample_inverse_cdf(bonus_dist, u_bonus))

    all_positions = torch.arange(gamma_max + 1, device=device)[None, :]  # [1, gamma_max + 1]
    padded_ids = torch.cat([ids, ids.new_zeros(num_reqs, 1)], dim=1)  # [R, gamma_max + 1]
    emitted = torch.where(all_positions < num_accepted[:, None], padded_ids, PAD_TOKEN_ID)
    emitted = torch.where(all_positions == num_accepted[:, None], final[:, None], emitted)
    return BatchVerifyOutput(num_accepted=num_accepted, emitted=emitted)


def verify_batch(
    draft_token_ids: torch.Tensor,  # [R, gamma_max] int, padded
    draft_probs: torch.Tensor | None,  # [R, gamma_max, V]; None only if every row is greedy
    target_probs: torch.Tensor,  # [R, gamma_max + 1, V]
    num_draft_tokens: Sequence[int],  # ℓ_r per request
    generators: Sequence[torch.Generator | None] | None = None,
    greedy: Sequence[bool] | None = None,
) -> list[VerifyResult]:
    """Verify many requests at once; equal, request by request, to verify_chain/verify_chain_greedy
    called with the same generators (each request's randomness comes only from its generator)."""
    num_reqs = len(num_draft_tokens)
    greedy = [False] * num_reqs if greedy is None else list(greedy)
    device = target_probs.device
    uniforms = draw_verify_uniforms(num_draft_tokens, generators, greedy, device)
    out = verify_batch_tensors(
        draft_token_ids,
        draft_probs,
        target_probs,
        torch.tensor(list(num_draft_tokens), dtype=torch.int64, device=device),
        uniforms,
        torch.tensor(greedy, dtype=torch.bool, device=device),
    )
    return out.to_results()


def _check_chain_shapes(
    draft_token_ids: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> None:
    gamma = draft_token_ids.shape[0]
    vocab = target_probs.shape[-1]
    if draft_probs.shape != (gamma, vocab) or target_probs.shape != (gamma + 1, vocab):
        raise ValueError(
            f"expected draft_probs [{gamma}, V] and target_probs [{gamma + 1}, V] for {gamma} draft "
            f"tokens; got {tuple(draft_probs.shape)} and {tuple(target_probs.shape)}"
        )


# ---------------------------------------------------------------------------------------------------
# The ragged layout the engine verifies on (vLLM's spec-decode metadata): no padding to γ_max, every
# tensor on the target's device. Symbols: R requests, N = Σ_r ℓ_r draft tokens; the target rows are
# N + R: request by request, its ℓ_r draft rows and then its bonus row.


@dataclass(frozen=True)
class SpecDecodeMetadata:
    """Where each request's drafts and target rows sit in the flat layout of one round."""

    num_draft_tokens: list[int]  # [R] ℓ_r, on the host
    cu_num_draft_tokens: torch.Tensor  # [R] int64: Σ_{r' <= r} ℓ_r' (end of request r's drafts)
    draft_token_ids: torch.Tensor  # [N] int64, request by request
    # [N + R] int64: for each target row, its index in the target's padded logits viewed as
    # [R * k_max, V] (row r * k_max + j = position j of request r's verified tokens [anchor, drafts]).
    target_logits_indices: torch.Tensor

    @classmethod
    def build(cls, draft_token_ids: Sequence[Sequence[int]], k_max: int,
              device: torch.device | str = "cpu") -> "SpecDecodeMetadata":
        """draft_token_ids: per request its ℓ_r drafts; k_max: the padded width of the target forward
        (>= max ℓ_r + 1)."""
        ells = [len(d) for d in draft_token_ids]
        if ells and max(ells) + 1 > k_max:
            raise ValueError(f"k_max={k_max} cannot hold {max(ells)} drafts plus the anchor")
        flat = [int(t) for d in draft_token_ids for t in d]
        idx = [r * k_max + j for r, ell in enumerate(ells) for j in range(ell + 1)]
        cu = list(itertools.accumulate(ells))
        return cls(ells, torch.tensor(cu, dtype=torch.int64, device=device),
                   torch.tensor(flat, dtype=torch.int64, device=device),
                   torch.tensor(idx, dtype=torch.int64, device=device))

    @property
    def num_reqs(self) -> int:
        return len(self.num_draft_tokens)


@dataclass(frozen=True)
class RaggedVerifyOutput:
    """num_accepted [R] int64 and bonus [R] int64 (the token after the accepted prefix), on the device."""

    num_accepted: torch.Tensor
    bonus_token_ids: torch.Tensor

    def to_results(self, meta: SpecDecodeMetadata) -> list[VerifyResult]:
        counts = self.num_accepted.tolist()
        bonus = self.bonus_token_ids.tolist()
        drafts = meta.draft_token_ids.tolist()
        out, start = [], 0
        for ell, n, b in zip(meta.num_draft_tokens, counts, bonus):
            out.append(VerifyResult(n, drafts[start:start + n] + [b]))
            start += ell
        return out


def draw_ragged_uniforms(
    num_draft_tokens: Sequence[int],
    generators: Sequence[torch.Generator | None],
    greedy: Sequence[bool],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[N + R] float64 uniforms in the target-row layout: request r's ℓ_r + 1 come from one call on
    its generator (exactly what :func:`verify_chain` draws); greedy requests draw nothing (zeros)."""
    parts = []
    for n, gen, is_greedy in zip(num_draft_tokens, generators, greedy):
        parts.append(torch.zeros(n + 1, dtype=torch.float64, device=device) if is_greedy
                     else draw_uniforms(n + 1, gen, device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def verify_ragged(
    meta: SpecDecodeMetadata,
    draft_probs: torch.Tensor | None,  # [N, V]: the distribution each draft was sampled from
    target_probs: torch.Tensor,  # [N + R, V] (logits suffice for greedy requests: only the argmax is read)
    uniforms: torch.Tensor,  # [N + R] float64, layout of draw_ragged_uniforms
    greedy: torch.Tensor,  # [R] bool
) -> RaggedVerifyOutput:
    """Verify R chains of different lengths in the flat layout, vectorised. Row by row it performs
    the float64 operations of :func:`verify_chain` / :func:`verify_chain_greedy`, so with uniforms
    from :func:`draw_ragged_uniforms` each request's result equals verifying it alone."""
    R, device = meta.num_reqs, target_probs.device
    ells = torch.tensor(meta.num_draft_tokens, dtype=torch.int64, device=device)  # [R]
    N = int(meta.draft_token_ids.numel())
    if target_probs.shape[0] != N + R:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows; {N} drafts and {R} requests need {N + R}")
    greedy = greedy.to(device)
    all_greedy = bool(greedy.all())
    if draft_probs is None and not all_greedy and N:
        raise ValueError("draft_probs is required unless every request is greedy")
    draft_start = meta.cu_num_draft_tokens.to(device) - ells  # [R]
    row_start = draft_start + torch.arange(R, device=device)  # [R] first target row of request r
    req_of = torch.repeat_interleave(torch.arange(R, device=device), ells)  # [N]
    pos = torch.arange(N, device=device) - draft_start[req_of]  # [N] position inside its chain
    trow = torch.arange(N, device=device) + req_of  # [N] target row scoring draft i
    ids = meta.draft_token_ids.to(device)
    best = target_probs.argmax(dim=-1)  # [N + R]

    accept = ids == best[trow]  # greedy rule, [N]
    if not all_greedy and N:
        pt = target_probs[trow].gather(-1, ids[:, None]).squeeze(-1).double()
        pd = draft_probs.gather(-1, ids[:, None]).squeeze(-1).double()
        accept = torch.where(greedy[req_of], accept, uniforms[trow] * pd < pt)
    # Accepted prefix length = position of the first rejection (ℓ_r when none).
    num_accepted = ells.clone()
    rejected = ~accept
    num_accepted.scatter_reduce_(0, req_of[rejected], pos[rejected], reduce="amin", include_self=True)

    bonus_row = row_start + num_accepted  # [R]
    final = best[bonus_row]
    if not all_greedy:
        t_row = target_probs[bonus_row]  # [R, V]
        bonus_dist = t_row.double()
        if N:
            d_row = draft_probs[(draft_start + num_accepted).clamp(max=N - 1)]  # [R, V]
            bonus_dist = torch.where((num_accepted < ells)[:, None], residual_probs(t_row, d_row), bonus_dist)
        u_bonus = uniforms[row_start + ells]  # [R]
        final = torch.where(greedy, final, sample_inverse_cdf(bonus_dist, u_bonus))
    return RaggedVerifyOutput(num_accepted=num_accepted, bonus_token_ids=final)
