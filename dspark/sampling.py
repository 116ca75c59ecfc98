"""Sampling parameters and the single logits -> probabilities -> token path.

Plain decoding and speculative verification must draw from the *same* distribution, otherwise
"lossless" speculation would be lossless with respect to the wrong target. So both go through
:func:`logits_to_probs` (temperature, then top-k, then top-p) and both turn probabilities into
tokens with :func:`sample_inverse_cdf`, driven by uniforms drawn from per-request generators.

Usage::

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
    gen = make_generator(params.seed)
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p)  # [1, vocab]
    token = sample_from_probs(probs, [gen])                                          # [1]

Symbols: ``batch`` rows of independent requests, ``vocab`` = V the vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.errors import DSparkError

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows, and users
# (and the OpenAI API) use temperature=0 to mean argmax.
GREEDY_TEMPERATURE_EPS = 1e-5

# Upper bound on γ a request may ask for; larger blocks never pay off and would let one request
# blow up the verification batch.
MAX_NUM_SPECULATIVE_TOKENS = 64


class SamplingParamsError(DSparkError, ValueError):
    """A SamplingParams field is out of range. The message names the field, value and range."""


@dataclass
class SamplingParams:
    """Per-request sampling options, shaped like vLLM's ``SamplingParams``.

    ``top_k`` 0 or -1 disables top-k; ``top_p`` 1.0 disables top-p; ``temperature`` below
    ``GREEDY_TEMPERATURE_EPS`` means greedy (argmax). ``stop`` is normalised to a list of strings
    and ``stop_token_ids`` to a list of ints. ``num_speculative_tokens`` is this request's γ
    (None = engine default).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        def fail(field: str, value: object, allowed: str) -> None:
            raise SamplingParamsError(f"SamplingParams.{field}={value!r} is invalid: {allowed}")

        def is_int(v: object) -> bool:
            # bool is an int subclass, but True as max_tokens is surely a mistake.
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_real(self.temperature) or math.isnan(self.temperature) or self.temperature < 0:
            fail("temperature", self.temperature, "must be a number >= 0 (0 = greedy)")
        if math.isinf(self.temperature):
            fail("temperature", self.temperature, "must be finite")
        if not is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):  # also rejects nan
            fail("top_p", self.top_p, "must be in (0, 1] (1 = disabled)")
        if not is_int(self.top_k) or self.top_k < -1:
            fail("top_k", self.top_k, "must be an int >= -1 (0 or -1 = disabled)")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", self.max_tokens, "must be an int >= 1")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", self.seed, "must be an int or None")
        if self.num_speculative_tokens is not None and (
            not is_int(self.num_speculative_tokens)
            or not (1 <= self.num_speculative_tokens <= MAX_NUM_SPECULATIVE_TOKENS)
        ):
            fail(
                "num_speculative_tokens",
                self.num_speculative_tokens,
                f"must be an int in [1, {MAX_NUM_SPECULATIVE_TOKENS}] or None (engine default)",
            )

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", self.stop, "must be a non-empty string or a list of non-empty strings")

        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", self.stop_token_ids, "must be a list of ints >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters of a batch, ready for :func:`logits_to_probs`."""

    temperature: torch.Tensor  # [batch] float32
    top_k: torch.Tensor  # [batch] int64, 0 = disabled
    top_p: torch.Tensor  # [batch] float32, 1.0 = disabled
    greedy: list[bool]  # [batch] kept on the host so sampling needs no device sync

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> SamplingTensors:
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            greedy=[p.greedy for p in params],
        )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded for one request, or None (use torch's global RNG) when unseeded."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------------------------------------
# logits -> probabilities
# ---------------------------------------------------------------------------------------------

Param = float | int | torch.Tensor


def logits_to_probs(
    logits: torch.Tensor,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
) -> torch.Tensor:
    """Turn logits ``[..., vocab]`` into the sampling distribution ``[..., vocab]`` (float32).

    Order: temperature scaling, top-k, top-p (nucleus on the top-k-renormalised distribution),
    renormalise. Each parameter is a Python scalar (same for all rows) or a tensor whose shape is
    a prefix of ``logits.shape[:-1]`` (e.g. ``[batch]`` for logits ``[batch, gamma+1, vocab]``),
    broadcast over the remaining leading dims.

    - greedy rows (temperature < GREEDY_TEMPERATURE_EPS) give a one-hot on ``argmax`` (ties: the
      lowest index, as ``torch.argmax``);
    - top-k keeps tokens whose logit is >= the k-th largest (like HF/vLLM, ties at the k-th value
      are all kept); 0, -1 or >= vocab disables it;
    - top-p keeps the smallest prefix of the sorted distribution whose mass reaches ``top_p``; the
      most likely token is always kept; 1.0 disables it.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    scalar = not any(isinstance(p, torch.Tensor) for p in (temperature, top_k, top_p))

    if scalar:
        # Fast path for the common batch-1 / uniform-params case: no per-row tensors, and the
        # top-k / top-p work is skipped entirely when disabled.
        if temperature < GREEDY_TEMPERATURE_EPS:
            return _one_hot_argmax(logits)
        scaled = logits if temperature == 1.0 else logits / temperature
        k_on = 0 < top_k < vocab
        p_on = top_p < 1.0
        if not (k_on or p_on):
            return torch.softmax(scaled, dim=-1)
        flat = scaled.reshape(-1, vocab)  # [rows, vocab]
        rows = flat.shape[0]
        k = torch.full((rows,), top_k, dtype=torch.int64, device=flat.device) if k_on else None
        p = torch.full((rows,), top_p, dtype=torch.float32, device=flat.device) if p_on else None
        return torch.softmax(_mask_top_k_top_p(flat, k, p), dim=-1).reshape(logits.shape)

    flat = logits.reshape(-1, vocab)  # [rows, vocab]
    temp = _per_row(temperature, lead, torch.float32, flat.device)  # [rows]
    k = _per_row(top_k, lead, torch.int64, flat.device)  # [rows]
    p = _per_row(top_p, lead, torch.float32, flat.device)  # [rows]

    greedy = temp < GREEDY_TEMPERATURE_EPS  # [rows]
    scaled = flat / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    k_on = (k > 0) & (k < vocab)
    p_on = p < 1.0
    k_any, p_any = bool(k_on.any()), bool(p_on.any())
    if k_any or p_any:
        scaled = _mask_top_k_top_p(
            scaled,
            torch.where(k_on, k, 0) if k_any else None,
            torch.where(p_on, p, 1.0) if p_any else None,
        )
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        probs = torch.where(greedy[:, None], _one_hot_argmax(flat), probs)
    return probs.reshape(logits.shape)


def _per_row(value: Param, lead: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or a leading-dims-prefix tensor to one value per flattened row."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() > len(lead) or tuple(t.shape) != tuple(lead[: t.dim()]):
        raise ValueError(
            f"sampling parameter of shape {tuple(t.shape)} does not match the leading logits dims "
            f"{tuple(lead)} (expected a prefix of them, e.g. [batch])"
        )
    t = t.reshape(tuple(t.shape) + (1,) * (len(lead) - t.dim()))
    return t.expand(lead).reshape(-1)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(logits)
    return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


def _mask_top_k_top_p(
    logits: torch.Tensor,  # [rows, vocab], already temperature-scaled
    top_k: torch.Tensor | None,  # [rows] int64; 0 = off for that row; None = off for all
    top_p: torch.Tensor | None,  # [rows] float32; 1.0 = off for that row; None = off for all
) -> torch.Tensor:
    """Set logits outside the top-k set, then outside the top-p nucleus, to -inf."""
    if top_k is not None:
        logits = _mask_top_k(logits, top_k)
    if top_p is not None:
        logits = _mask_top_p(logits, top_p)
    return logits


def _mask_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    # logits [rows, vocab]; top_k [rows], 0 = off
    k_off = top_k <= 0
    k_idx = (torch.where(k_off, 1, top_k) - 1)[:, None]  # [rows, 1]
    # A partial top-k is much cheaper than sorting the whole vocabulary.
    kth = logits.topk(int(k_idx.max()) + 1, dim=-1).values.gather(-1, k_idx)  # [rows, 1]
    kth = kth.masked_fill(k_off[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


# The nucleus is usually a few dozen tokens, and sorting a 150k vocabulary costs ~20 ms on a CPU
# core. So first try the _TOP_P_CANDIDATES largest logits; fall back to a full sort only when
# they do not provably contain the nucleus.
_TOP_P_CANDIDATES = 1024
# Margin on the candidates' mass so float rounding of sum vs cumsum cannot hide a nucleus token
# outside them (rounding over 1024 float32 terms is far below this).
_TOP_P_MARGIN = 1e-4


def _mask_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # logits [rows, vocab] (top-k already applied); top_p [rows], 1.0 = off
    vocab = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # [rows, vocab]
    # Disabled rows get an infinite threshold: rounding can push the cumulative mass to 1 + eps,
    # which would otherwise trim the tail of an untouched row.
    threshold = torch.where(top_p < 1.0, top_p, float("inf"))[:, None]  # [rows, 1]

    p_off = (top_p >= 1.0)[:, None]  # [rows, 1]
    order = None
    if _TOP_P_CANDIDATES < vocab:
        cand_logits, cand_idx = logits.topk(_TOP_P_CANDIDATES, dim=-1)  # [rows, m]
        # Only candidates strictly above the smallest one are certain to be the global top set
        # (ties at the boundary may have been cut arbitrarily by topk).
        strict = cand_logits > cand_logits[:, -1:]
        strict_mass = (probs.gather(-1, cand_idx) * strict).sum(dim=-1, keepdim=True)
        if bool(((strict_mass >= threshold + _TOP_P_MARGIN) | p_off).all()):
            # Same order as the full stable sort below: by logit descending, ties by index.
            cand_idx = cand_idx.sort(dim=-1).values
            by_logit = logits.gather(-1, cand_idx).sort(dim=-1, descending=True, stable=True).indices
            order = cand_idx.gather(-1, by_logit)  # [rows, m]
    if order is None:
        # Stable sort so that tied tokens enter the nucleus lowest index first, deterministically.
        order = logits.sort(dim=-1, descending=True, stable=True).indices  # [rows, vocab]

    sorted_probs = probs.gather(-1, order)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < threshold
    keep_sorted[:, 0] = True  # the most likely token is always kept
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep_sorted) | p_off
    return logits.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------
# probabilities -> tokens
# ---------------------------------------------------------------------------------------------


def draw_uniforms(
    n: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``n`` float64 uniforms in [0, 1) from one request's generator (global RNG if None).

    Drawn on the generator's own device so a CPU generator can serve a GPU request.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
    return u.to(device)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row: the first index whose cumulative mass exceeds ``u * total``.

    probs: ``[rows, vocab]`` non-negative (need not be normalised); uniforms: ``[rows]`` in [0, 1).
    Exact up to float64 rounding: token v is returned iff u lies in [F(v-1), F(v)), so
    zero-probability tokens are never returned. This is the only place that turns a distribution
    into a token, shared by plain decoding and verification.
    """
    cdf = probs.double().cumsum(dim=-1)  # [rows, vocab]
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]  # [rows, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample_from_probs(
    probs: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
    greedy: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Sample one token per row of ``probs`` ``[batch, vocab]`` -> int64 ``[batch]``.

    Row ``i`` draws exactly one uniform from ``generators[i]`` (None: torch's global RNG), so a
    seeded request gets the same tokens whatever else is in the batch. Greedy rows take the argmax
    and consume no randomness. ``greedy`` gives those rows from the host (no device sync); when
    omitted, rows that are exactly one-hot are treated as greedy, which is harmless for
    non-greedy one-hot rows since their sample is that token anyway.
    """
    batch = probs.shape[0]
    if generators is None:
        generators = [None] * batch
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} rows")
    if greedy is None:
        greedy = (probs.amax(dim=-1) >= 1.0).tolist()

    tokens = probs.argmax(dim=-1)  # [batch]
    random_rows = [i for i in range(batch) if not greedy[i]]
    if not random_rows:
        return tokens
    if len(random_rows) == batch and all(g is None for g in generators):
        u = draw_uniforms(batch, None, probs.device)  # one call instead of a loop
    else:
        u = torch.cat([draw_uniforms(1, generators[i], probs.device) for i in random_rows])
    if len(random_rows) == batch:
        return sample_inverse_cdf(probs, u)
    rows = torch.tensor(random_rows, device=probs.device)
    tokens[rows] = sample_inverse_cdf(probs[rows], u)
    return tokens
