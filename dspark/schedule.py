"""Confidence-scheduled verification: how many draft tokens each request sends to the target.

    cost = StepCostTable.profile(target, max_tokens=64)           # once, at engine start-up
    ells = schedule_prefix(survival, caps, cost)                   # every round

The drafter's confidence head estimates c_{r,k} = P(draft k of request r accepted | drafts < k
accepted); the survival a_{r,j} = Π_{i≤j} c_{r,i} is then the chance that draft j is accepted, and
Σ_j a_{r,j} the expected number of accepted drafts. Verifying more tokens costs more target time,
and how much more is a property of the hardware, measured once as a table of target steps per
second at B verified tokens, SPS(B). `schedule_prefix` is the paper's Algorithm 1: starting from
ℓ_r = 0 (every request still gets its bonus token), admit the (r, j) with the highest survival first
while the expected throughput Θ = τ · SPS(B) rises, with τ = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}) and
B = Σ_r (1 + ℓ_r), and **stop at the first candidate that does not raise it**.

Why the early stop keeps decoding lossless: whether draft j of request r is verified must not
depend on draft j itself (or later drafts); otherwise the choice to verify correlates with the token
and skews the emitted distribution. c_{r,k} is computed from the block features and x_{k-1}, never
x_k, so a_{r,j} depends on drafts < j only. Candidates are visited in decreasing survival (ties by
position), so (r, j) is visited before (r, j+1), and with the early stop its admission is decided by
candidates visited before it: by drafts < j of request r and by other requests. A search that
looked past the first drop could admit (r, j) because of what it saw at (r, j+1), which depends on
draft j (the paper's Appendix A gives such a counterexample).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.config import SCHEDULERS, ScheduleError, SchedulerKind, scheduler_kind  # noqa: F401 (re-exported)





@dataclass
class StepCostTable:
    """Seconds of one target forward that verifies B tokens, at measured B (ascending).

    Between measured points the cost is interpolated linearly; beyond the last point it is
    extrapolated along the last segment (never below the last measured cost)."""

    tokens: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.seconds):
            raise ScheduleError(f"a step-cost table needs one time per token count, got {len(self.tokens)} "
                                f"token counts and {len(self.seconds)} times")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:])) or self.tokens[0] < 1:
            raise ScheduleError(f"step-cost token counts must be positive and increasing, got {self.tokens}")
        if any(not s > 0 for s in self.seconds):
            raise ScheduleError(f"step-cost times must be positive, got {self.seconds}")

    def seconds_at(self, num_tokens: int) -> float:
        t, s = self.tokens, self.seconds
        if num_tokens <= t[0] or len(t) == 1:
            return s[0] if num_tokens <= t[0] else s[-1]
        for i in range(1, len(t)):
            if num_tokens <= t[i]:
                w = (num_tokens - t[i - 1]) / (t[i] - t[i - 1])
                return s[i - 1] + w * (s[i] - s[i - 1])
        slope = (s[-1] - s[-2]) / (t[-1] - t[-2])
        return max(s[-1], s[-1] + slope * (num_tokens - t[-1]))

    def sps(self, num_tokens: int) -> float:
        """Target steps per second when B = num_tokens tokens are verified in one forward."""
        return 1.0 / self.seconds_at(num_tokens)

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "seconds": list(self.seconds)}

    @classmethod
    def from_json(cls, raw: dict, source: str = "step-cost table") -> "StepCostTable":
        try:
            return cls([int(b) for b in raw["tokens"]], [float(s) for s in raw["seconds"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ScheduleError(f"{source}: needs lists 'tokens' and 'seconds' ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "StepCostTable":
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ScheduleError(f"cannot read step-cost table {p}: {e}") from None
        return cls.from_json(raw, str(p))

    @classmethod
    def profile(cls, target, max_tokens: int, hidden_layer_ids: Sequence[int] = (), context: int = 64,
                repeats: int = 3) -> "StepCostTable":
        """Time the target verifying B tokens of one sequence after `context` cached tokens, for B on
        a grid up to `max_tokens` (every B up to 16, then ~1.5x apart); the fastest of `repeats`."""
        grid = list(range(1, min(max_tokens, 16) + 1))
        while grid[-1] < max_tokens:
            grid.append(min(max_tokens, int(grid[-1] * 1.5)))
        cache = target.new_cache(1, context + max_tokens)
        slot = cache.allocate()
        filler = 5 % target.vocab_size
        target.forward(cache, [slot], [[filler] * context], all_logits=False)
        seconds = []
        for b in grid:
            best = float("inf")
            for _ in range(repeats + 1):  # the first call of each size warms allocator caches
                t0 = time.perf_counter()
                target.forward(cache, [slot], [[filler] * b], hidden_layer_ids=hidden_layer_ids)
                best = min(best, time.perf_counter() - t0)
                cache.truncate(slot, context)
            seconds.append(best)
        # Timing noise can make a larger B look cheaper; the cost of verifying more is never less.
        for i in range(1, len(seconds)):
            seconds[i] = max(seconds[i], seconds[i - 1])
        return cls(grid, seconds)


def survival_from_confidence(confidence: torch.Tensor) -> list[list[float]]:
    """confidence [num_reqs, gamma] (c_k in (0, 1)) -> survival a_{r,j} = Π_{i≤j} c_{r,i}, as lists."""
    return torch.cumprod(confidence.double().clamp(0.0, 1.0), dim=-1).tolist()


def schedule_prefix(survival: Sequence[Sequence[float]], caps: Sequence[int],
                    cost: StepCostTable | Callable[[int], float]) -> list[int]:
    """Algorithm 1: ℓ_r for every request from survivals a_{r,j} (j = 1.. along each row).

    `caps[r]` bounds ℓ_r (the drafted length, the context and max_tokens); `cost` is a step-cost
    table or a function B -> steps per second. Admits candidates in decreasing survival (ties: lower
    position, then lower request) while Θ = τ·SPS(B) rises, and stops at the first candidate that
    does not raise it."""
    return _schedule(survival, caps, cost)[0]


def settled_schedule(survival: Sequence[Sequence[float]], caps: Sequence[int],
                     cost: StepCostTable | Callable[[int], float]) -> list[int] | None:
    """`schedule_prefix` over these rows if it is settled, else None. Settled: over longer rows
    (survivals of positions not drafted yet appended, up to `caps`) it can only return the same.
    That holds once the search stops at a candidate whose survival is at least every row's last known
    one: positions not yet drafted have survival at most that (a product of probabilities), and sort
    after the stop. A drafter may then stop drafting: the verified prefix is settled without the
    drafts it did not make."""
    ells, stop_at = _schedule(survival, caps, cost)
    open_rows = [row[-1] if row else 1.0 for row, cap in zip(survival, caps) if len(row) < cap]
    if not open_rows or (stop_at is not None and all(a <= stop_at for a in open_rows)):
        return ells
    return None


def _schedule(survival: Sequence[Sequence[float]], caps: Sequence[int],
              cost: StepCostTable | Callable[[int], float]) -> tuple[list[int], float | None]:
    """(ℓ per request, survival of the candidate the search stopped at, or None if it admitted all)."""
    sps = cost.sps if isinstance(cost, StepCostTable) else cost
    if len(survival) != len(caps):
        raise ScheduleError(f"got survivals for {len(survival)} requests and caps for {len(caps)}")
    ells = [0] * len(caps)
    cands = []
    for r, (row, cap) in enumerate(zip(survival, caps)):
        prev = 1.0
        for j in range(min(cap, len(row))):
            # Survival is a product of probabilities: clip float noise so it never rises along a row.
            a = min(prev, max(0.0, float(row[j])))
            cands.append((-a, j, r))
            prev = a
    cands.sort()
    num_tokens = len(caps)  # every request verifies its anchor position (the bonus)
    tau = float(len(caps))
    theta = tau * sps(num_tokens)
    for neg_a, j, r in cands:
        assert ells[r] == j, "candidates must arrive in prefix order"
        new_theta = (tau - neg_a) * sps(num_tokens + 1)
        if new_theta <= theta:  # no gain: stop here, as Algorithm 1 does (Θ ≤ Θ_best)
            return ells, -neg_a
        ells[r] = j + 1
        tau -= neg_a
        num_tokens += 1
        theta = new_theta
    return ells, None
