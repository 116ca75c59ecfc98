"""Confidence-scheduled verification: how many draft tokens each request sends to the target.

    cost, path, cached = StepCostTable.cached(target, max_tokens=64)   # once, at engine start-up (on disk)
    ells = schedule_prefix(survival, caps, cost)                        # every round (Algorithm 1)
    rule = policy_rule(VerifyPolicy.parse("threshold:0.3"), cost)       # any policy: rule.lengths(...)
    temps = sequential_temperature_scaling(logits, accepted)            # STS, on held-out rounds

Verification policies (`dspark.config.VerifyPolicy`): `static` verifies every draft, `plain` drafts
nothing, `fixed:K` the first K, `threshold:P` while the survival stays above P, `confidence`
Algorithm 1. Each is a `PolicyRule` in the `POLICY_RULES` registry.

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

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dspark.config import ScheduleError, VerifyPolicy  # noqa: F401 (ScheduleError re-exported)

STEP_COST_DIR = "step-cost"  # under the DSpark cache directory ($DSPARK_CACHE_DIR)

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
        a grid up to `max_tokens` (every B up to 16, then ~1.5x apart); the fastest of `repeats` passes
        over the whole grid (passes, not sizes, outermost: a shared machine that slows down for a while
        slows every size alike, so the ratios Algorithm 1 reads stay right)."""
        grid = list(range(1, min(max_tokens, 16) + 1))
        while grid[-1] < max_tokens:
            grid.append(min(max_tokens, int(grid[-1] * 1.5)))
        cache = target.new_cache(1, context + max_tokens)
        slot = cache.allocate()
        filler = 5 % target.vocab_size
        target.forward(cache, [slot], [[filler] * context], all_logits=False)
        seconds = [float("inf")] * len(grid)
        for rep in range(repeats + 1):  # the first pass warms allocator caches and is not timed
            for i, b in enumerate(grid):
                t0 = time.perf_counter()
                target.forward(cache, [slot], [[filler] * b], hidden_layer_ids=hidden_layer_ids)
                if rep:
                    seconds[i] = min(seconds[i], time.perf_counter() - t0)
                cache.truncate(slot, context)
        # Timing noise can make a larger B look cheaper; the cost of verifying more is never less.
        for i in range(1, len(seconds)):
            seconds[i] = max(seconds[i], seconds[i - 1])
        return cls(grid, seconds)

    @classmethod
    def cached(cls, target, max_tokens: int, hidden_layer_ids: Sequence[int] = (), reprofile: bool = False,
               progress: bool = False) -> tuple["StepCostTable", Path, bool]:
        """The table for this target on this machine, from the cache when one covers `max_tokens`
        (else profiled and stored). Keyed by the model's files, dtype and CPU GEMM, the torch thread
        count, the taps read and the machine (`step_cost_key`). Returns (table, cache file, from cache)."""
        from dspark.train.checkpoint import atomic_write_text

        key = step_cost_key(target, hidden_layer_ids)
        path = step_cost_path(target, key)
        if not reprofile and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                table = cls.from_json(raw["table"], str(path))
                if raw.get("key") == key and table.tokens[-1] >= max_tokens:
                    return table, path, True
            except (OSError, ValueError, KeyError, TypeError, ScheduleError):
                pass  # a damaged or stale entry is measured again and replaced
        if progress:
            print(f"profiling target step cost up to {max_tokens} verified tokens (cached in {path})", flush=True)
        table = cls.profile(target, max_tokens, hidden_layer_ids=hidden_layer_ids)
        atomic_write_text(path, json.dumps({"key": key, "table": table.to_json()}, indent=1) + "\n")
        return table, path, False

    def rows(self) -> list[dict[str, float]]:
        """One row per measured B: ms per step, steps/s and verified tokens/s (B · SPS(B))."""
        return [{"tokens": b, "ms_per_step": 1e3 * s, "steps_per_s": 1.0 / s, "tokens_per_s": b / s}
                for b, s in zip(self.tokens, self.seconds)]


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"node": platform.node(), "arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count()}


def step_cost_key(target, hidden_layer_ids: Sequence[int] = ()) -> dict[str, Any]:
    """What a step-cost table depends on: the model (files, dtype, CPU GEMM), the whole-layer C call,
    torch's thread count, the hidden-state taps read, the device and the machine."""
    from dspark.eval.acceptance import target_identity

    dev = torch.device(target.device)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    key = {"model": target_identity(target), "threads": torch.get_num_threads(),
           "hidden_layer_ids": [int(i) for i in hidden_layer_ids], "device": device, "machine": _machine()}
    # The whole-layer C call gives the bits of the two-part path (so it is not in the model's identity)
    # but not its speed; named only when on, so other tables keep their keys.
    whole = getattr(getattr(target, "transformer", None), "num_whole_layers", 0)
    if whole:
        key["whole_layers"] = whole
    if getattr(getattr(target, "transformer", None), "layer_table", None) is not None:
        key["one_call"] = True  # every layer in one C call: the same bits again, faster
    return json.loads(json.dumps(key, default=str))  # as it reads back from the cache file


def step_cost_path(target, key: dict[str, Any]) -> Path:
    from dspark.bundled import target_label
    from dspark.models.gguf import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / STEP_COST_DIR / f"{target_label(target)}-{digest}.json"


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


# ---------------------------------------------------------------------------------------------------
# Verification policies: one rule per `VerifyPolicy` kind


class PolicyRule(Protocol):
    """How a verification policy turns a round's caps (and survivals) into ℓ per request.

    `draft_caps`: how many tokens the drafter is asked for. Policies that read confidences then cut
    each row with `lengths`, and may let the drafter stop early through `settled` (None: not settled
    yet; else the ℓ per request, which longer rows could not change)."""

    needs_confidence: bool

    def draft_caps(self, caps: list[int]) -> list[int]: ...

    def lengths(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int]: ...

    def settled(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int] | None: ...


@dataclass
class _CapRule:
    """static / fixed:K / plain: ℓ fixed before drafting, no confidences read."""

    most: int | None  # None: every draft (static)
    needs_confidence = False

    def draft_caps(self, caps: list[int]) -> list[int]:
        return list(caps) if self.most is None else [min(self.most, c) for c in caps]

    def lengths(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int]:
        return self.draft_caps(list(caps))

    def settled(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int] | None:
        return self.lengths(survival, caps)


@dataclass
class ThresholdRule:
    """threshold:P: ℓ_r = the number of leading drafts whose survival a_{r,j} exceeds P. Whether j is
    verified depends on a_{r,1..j} only (drafts < j), as for Algorithm 1."""

    p: float
    needs_confidence = True

    def draft_caps(self, caps: list[int]) -> list[int]:
        return list(caps)

    def lengths(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int]:
        out = []
        for row, cap in zip(survival, caps):
            n, prev = 0, 1.0
            for a in row[:cap]:
                prev = min(prev, float(a))  # survival never rises along a row (float noise clipped)
                if not prev > self.p:
                    break
                n += 1
            out.append(n)
        return out

    def settled(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int] | None:
        ells = self.lengths(survival, caps)
        # A row is settled once it is complete or has dropped to P (later survivals are no higher).
        if all(e < len(row) or len(row) >= cap for e, row, cap in zip(ells, survival, caps)):
            return ells
        return None


_NO_ROUND = object()  # DraftGate._arm between rounds: nothing to attribute a measurement to


class DraftGate:
    """How many drafts a round may verify at most: the part of the decision Algorithm 1 cannot make.

    Algorithm 1 weighs each verified draft against the target's step cost, but only after the drafter
    ran: drafting itself (and the round's bookkeeping) is a cost it never sees, and on a CPU it decides
    whether speculation pays, and how deep: drafting all γ positions costs more than settling at one.
    So before each round the gate picks a cap on every request's ℓ from a few arms (`arms`: 0 = do
    not draft, then 1, 2 drafts, None = the request's own γ), by the rates measured in past rounds
    with the same number R of requests decoding under each arm:

        rate(arm) = R * (1 + accepted drafts per request) / wall seconds of the round

    (EMAs over those rounds: a long one for the tokens, which vary from round to round but drift
    slowly, a short one for the seconds, which drift with the machine's load). Within the cap,
    Algorithm 1 on the calibrated confidences still chooses each request's ℓ (with its early stop).
    Each R starts at the first arm (no drafting: plain decoding, measured in this engine, so the policy
    can always fall back to it) and plays the best arm measured, a drafting arm only when it measures
    `margin` (5%) faster than not drafting. Every `probe_every` rounds it probes a neighbour of that
    arm (one cap up or down, in turn) for `probe_rounds` rounds, re-timing it from scratch, so it climbs
    to deeper caps only while each step up pays and the estimates follow the text and the load; a
    probe that does not win doubles that interval (up to `max_probe_every`), one that wins resets it.
    The first round after a change of arm is not measured. An arm's first tokens estimate at a new R
    starts from that arm's average over every R (`pooled`, the same long EMA), not from its first few
    rounds alone: how often drafts are accepted hardly depends on R, and a probe's handful of rounds
    at a new batch size would otherwise let one lucky round switch it to drafting. Lossless: the
    decision reads only rounds already verified, never the drafts of the round it decides.
    """

    ARMS: tuple[int | None, ...] = (0, 1, 2, None)

    def __init__(self, probe_every: int = 16, decay: float = 0.8, max_probe_every: int = 256,
                 arms: Sequence[int | None] = ARMS, probe_rounds: int = 4, token_decay: float = 0.95,
                 margin: float = 0.05) -> None:
        if not arms or len(set(arms)) != len(arms) or any(a is not None and a < 0 for a in arms):
            raise ValueError(f"gate arms must be distinct caps >= 0 or None, got {list(arms)}")
        if probe_rounds < 2:
            raise ValueError(f"probe_rounds must be >= 2 (a probe's first round is not measured), got {probe_rounds}")
        self.arms = tuple(arms)
        self.min_probe_every = self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.probe_rounds = probe_rounds
        self.margin = margin  # how much faster than not drafting a drafting arm must measure
        self.decay = decay              # EMA weight of the old value: a round's wall seconds
        self.token_decay = token_decay  # and its tokens per request
        self.stats: dict[int, dict[int | None, list[float]]] = {}  # R -> arm -> [tokens/request, seconds]
        self.pooled: dict[int | None, float] = {}  # arm -> tokens/request over rounds of every R
        self.idle = 0                # rounds since the last probe
        self.skipped = 0             # rounds the gate kept from drafting (all time)
        self.chosen: dict[int | None, int] = {}  # rounds per arm (all time)
        self._probe: tuple[Any, int, bool] | None = None  # while a probe runs: see cap
        self._turn: dict[int, int] = {}  # R -> the next probe's place among the best arm's neighbours
        self._arm: Any = _NO_ROUND   # the arm of the round in flight
        self._prev: Any = _NO_ROUND  # the arm of the round before

    def rate(self, num_reqs: int, arm: int | None) -> float:
        tokens, seconds = self.stats[num_reqs][arm]
        return num_reqs * tokens / seconds

    def best(self, num_reqs: int) -> int | None:
        """The measured arm with the highest rate at this batch size (the first arm before any), a
        drafting arm's rate counted `margin` lower: drafting must beat not drafting clearly, since
        where the two are level the noise in the estimates would otherwise settle it, and a drafter
        that only breaks even is not worth the risk of running below plain decoding."""
        st = self.stats.get(num_reqs)
        if not st:
            return self.arms[0]
        return max(st, key=lambda a: self.rate(num_reqs, a) / (1.0 if a == 0 else 1.0 + self.margin))

    def cap(self, num_reqs: int) -> int | None:
        """The cap on ℓ for the next round of `num_reqs` requests (0: do not draft; None: no cap)."""
        self.stats.setdefault(num_reqs, {})
        if self._probe is not None:
            arm = self._probe[0]
        else:
            arm = self.best(num_reqs)  # the first arm (no drafting) until another is measured faster
            if self.idle >= self.probe_every and len(self.arms) > 1:
                # probe a neighbour of the best arm (one cap up or down), in turn
                i = self.arms.index(arm)
                near = [self.arms[j] for j in (i - 1, i + 1) if 0 <= j < len(self.arms)]
                turn = self._turn.get(num_reqs, 0)
                self._turn[num_reqs] = turn + 1
                arm = near[turn % len(near)]
                self._probe = (arm, self.probe_rounds, True)  # (arm, rounds left, not measured yet)
        self._arm = arm
        self.chosen[arm] = self.chosen.get(arm, 0) + 1
        return arm

    @staticmethod
    def _ema(old: float, new: float, decay: float) -> float:
        return decay * old + (1 - decay) * new

    def observe(self, num_reqs: int, drafted: bool, verified: int, accepted: int, seconds: float) -> None:
        """A finished round of `num_reqs` requests (accepted drafts in all, its wall seconds), credited
        to the arm `cap` chose for it; a round the gate was not asked about is not counted, nor is the
        first round after a change of arm (its caches are cold: measured here, a lone round that
        drafts one token after plain rounds takes ~10% longer than the same round in a run of them)."""
        arm, self._arm = self._arm, _NO_ROUND
        if arm is _NO_ROUND or num_reqs < 1:
            return
        switched, self._prev = arm != self._prev, arm
        if not switched:
            st = self.stats.setdefault(num_reqs, {})
            new = [1 + accepted / num_reqs, seconds]
            old = st.get(arm)
            prior = self.pooled.get(arm)
            self.pooled[arm] = new[0] if prior is None else self._ema(prior, new[0], self.token_decay)
            if old is None:
                st[arm] = new if prior is None else [self._ema(prior, new[0], self.token_decay), seconds]
            else:
                if self._probe is not None and self._probe[2]:  # a probe re-times its arm: the old
                    old = [old[0], new[1]]                      # time is probe_every rounds stale
                    self._probe = (self._probe[0], self._probe[1], False)
                # the tokens a round yields vary a lot from round to round but drift slowly (the
                # text): a long average; its wall time varies little but drifts with the machine's
                # load: a short one
                st[arm] = [self._ema(old[0], new[0], self.token_decay), self._ema(old[1], new[1], self.decay)]
        self.idle += 1
        if self._probe is not None:
            left = self._probe[1] - 1
            self._probe = (arm, left, self._probe[2]) if left > 0 else None
            if left == 0:  # back off while probes keep finding the best arm unbeaten
                self.idle = 0
                st = self.stats.get(num_reqs, {})
                won = arm in st and self.best(num_reqs) == arm
                self.probe_every = self.min_probe_every if won else min(2 * self.probe_every, self.max_probe_every)


@dataclass
class ConfidenceRule:
    """confidence: Algorithm 1 (`schedule_prefix`) over the step-cost table on the calibrated
    confidences, within the cap on ℓ that the `DraftGate` sets for the round (0: no drafting).

    Algorithm 1 weighs a round's expected tokens against the target's step time at B verified
    tokens. A round that drafted also spends the drafter's time (its proposal and its commit), the
    same whatever ℓ is chosen once it has drafted, so the round's rate is τ / (T(B) + D): with
    D > 0 a draft pays at a lower survival than T(B+1)/T(B) − 1 alone would ask (e.g. 0.18 instead of
    0.24 for the first draft at batch 1 with T(1) = 4.6 ms, T(2) = 5.7 ms and D = 1.5 ms). D is measured here per number of requests R,
    an EMA of the drafter's seconds in past rounds that drafted (`observe`), never the round being
    decided; with no measurement yet it is 0, the paper's Algorithm 1."""

    cost: StepCostTable | Callable[[int], float]
    needs_confidence = True
    gate: DraftGate | None = None
    overhead_decay: float = 0.8  # EMA weight of the old value of D
    count_drafter_time: bool = True  # False: the paper's Algorithm 1 on the table alone (timing-free)

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = DraftGate()
        self.overhead: dict[int, float] = {}  # R -> D, seconds of drafting a round

    def round_cost(self, num_reqs: int) -> StepCostTable | Callable[[int], float]:
        """Rounds per second at B verified tokens for `num_reqs` requests: 1 / (T(B) + D_R)."""
        d = self.overhead.get(num_reqs, 0.0) if self.count_drafter_time else 0.0
        if d <= 0.0:
            return self.cost
        cost = self.cost
        seconds = cost.seconds_at if isinstance(cost, StepCostTable) else (lambda b: 1.0 / cost(b))
        return lambda b: 1.0 / (seconds(b) + d)

    def draft_caps(self, caps: list[int]) -> list[int]:
        if not any(caps):  # nothing to draft: the gate is not asked (nor is the round counted)
            return list(caps)
        cap = self.gate.cap(len(caps))
        if cap == 0:
            self.gate.skipped += 1
            return [0] * len(caps)
        return list(caps) if cap is None else [min(c, cap) for c in caps]

    def observe(self, num_reqs: int, drafted: bool, verified: int, accepted: int, seconds: float,
                drafter_seconds: float | None = None) -> None:
        self.gate.observe(num_reqs, drafted, verified, accepted, seconds)
        if drafted and drafter_seconds is not None and num_reqs >= 1 and drafter_seconds >= 0.0:
            old = self.overhead.get(num_reqs)
            self.overhead[num_reqs] = drafter_seconds if old is None else \
                self.overhead_decay * old + (1 - self.overhead_decay) * drafter_seconds

    def lengths(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int]:
        return schedule_prefix(survival, caps, self.round_cost(len(caps)))

    def settled(self, survival: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int] | None:
        return settled_schedule(survival, caps, self.round_cost(len(caps)))


POLICY_RULES: dict[str, Callable[[VerifyPolicy, Any], PolicyRule]] = {
    "static": lambda p, cost: _CapRule(None),
    "plain": lambda p, cost: _CapRule(0),
    "fixed": lambda p, cost: _CapRule(int(p.value)),
    "threshold": lambda p, cost: ThresholdRule(float(p.value)),
    "confidence": lambda p, cost: ConfidenceRule(cost),
}


def policy_rule(policy: VerifyPolicy | str, cost: StepCostTable | Callable[[int], float] | None = None) -> PolicyRule:
    """The rule of a policy; `cost` is needed by `confidence` only."""
    policy = VerifyPolicy.parse(policy)
    if policy.kind == "confidence" and cost is None:
        raise ScheduleError("policy 'confidence' needs a step-cost table")
    return POLICY_RULES[policy.kind](policy, cost)


# ---------------------------------------------------------------------------------------------------
# Sequential Temperature Scaling (paper §3.2.1)

ECE_BINS = 15
# Candidate temperatures: 0.05 .. 20, geometric, plus 1 (no change); searched nearest-to-1 first so
# that ties keep the smallest correction.
_GRID = sorted({1.0, *torch.logspace(math.log10(0.05), math.log10(20.0), 241, dtype=torch.float64).tolist()},
               key=lambda t: abs(math.log(t)))


def joint_outcomes(confidence_logits: torch.Tensor, accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, γ] raw confidence logits (NaN: not drafted) and [N, γ] outcomes (1 accepted, 0 rejected,
    anything else: not verified; positions after a row's first rejection are ignored) ->
    (valid [N, γ] bool, y [N, γ] float64): y_k = 1 iff drafts 1..k were all accepted.

    Position k of a row counts when c_1..c_k exist and its joint outcome is known: drafts 1..k were
    verified, or an earlier one was rejected (then y_k = 0 whether k was verified or not)."""
    z = torch.as_tensor(confidence_logits, dtype=torch.float64)
    a = torch.as_tensor(accepted, dtype=torch.float64)
    if z.dim() != 2 or z.shape != a.shape:
        raise ScheduleError(f"confidence_logits and accepted must both be [N, gamma], got "
                            f"{tuple(z.shape)} and {tuple(a.shape)}")
    ones, zeros = a == 1, a == 0
    all_acc = torch.cumprod(ones.double(), dim=1).bool()                  # drafts 1..k all accepted
    prior = torch.cat([torch.ones_like(all_acc[:, :1]), all_acc[:, :-1]], dim=1)  # drafts < k all accepted
    rejected_by_k = torch.cumsum((zeros & prior).double(), dim=1) > 0     # first rejection at or before k
    have_c = torch.cumprod(torch.isfinite(z).double(), dim=1).bool()
    valid = have_c & (all_acc | rejected_by_k)
    return valid, all_acc.double()


def calibrated_survival(confidence_logits: torch.Tensor, temperatures: Sequence[float] | torch.Tensor | None
                        ) -> torch.Tensor:
    """a_k = Π_{i≤k} σ(z_i / T_i): [N, γ] float64 (NaN logits give NaN)."""
    z = torch.as_tensor(confidence_logits, dtype=torch.float64)
    t = torch.ones(z.shape[1], dtype=torch.float64) if temperatures is None else \
        torch.as_tensor(temperatures, dtype=torch.float64)[:z.shape[1]]
    return torch.cumprod(torch.sigmoid(z / t), dim=1)


def expected_calibration_error(pred: torch.Tensor, outcome: torch.Tensor, num_bins: int = ECE_BINS) -> torch.Tensor:
    """ECE over equal-width bins of [0, 1]: Σ_b (n_b / n) · |mean pred_b − mean outcome_b|.
    pred: [..., n] (a batch of candidate predictions), outcome: [n]; returns [...] (NaN when n = 0)."""
    pred = pred.double()
    n = outcome.numel()
    if n == 0:
        return torch.full(pred.shape[:-1], float("nan"), dtype=torch.float64)
    idx = (pred * num_bins).long().clamp(0, num_bins - 1)
    flat = pred.reshape(-1, n)
    fidx = idx.reshape(-1, n)
    sum_p = torch.zeros(flat.shape[0], num_bins, dtype=torch.float64).scatter_add_(1, fidx, flat)
    sum_y = torch.zeros_like(sum_p).scatter_add_(1, fidx, outcome.double().expand_as(flat))
    return ((sum_p - sum_y).abs().sum(dim=1) / n).reshape(pred.shape[:-1])


def sequential_temperature_scaling(confidence_logits: torch.Tensor, accepted: torch.Tensor,
                                   num_bins: int = ECE_BINS) -> torch.Tensor:
    """Sequential Temperature Scaling: [N, γ] raw confidence logits and [N, γ] 0/1 outcomes
    (positions after a row's first rejection are masked; see `joint_outcomes`) -> [γ] temperatures.

    Position by position, left to right, a 1-D grid search picks the T_k minimising the ECE of the
    cumulative product Π_{i≤k} σ(z_i / T_i) against "drafts 1..k all accepted", with T_1..T_{k−1}
    held at the values already chosen. Temperature scaling is monotone, so the ranking of drafts is
    unchanged. A position with no usable sample keeps T = 1."""
    z = torch.as_tensor(confidence_logits, dtype=torch.float64)
    valid, y = joint_outcomes(z, accepted)
    gamma = z.shape[1]
    grid = torch.tensor(_GRID, dtype=torch.float64)  # [G]
    temps = torch.ones(gamma, dtype=torch.float64)
    prefix = torch.ones(z.shape[0], dtype=torch.float64)  # Π_{i<k} calibrated c_i, per row
    for k in range(gamma):
        rows = valid[:, k]
        if rows.any():
            zk = z[rows, k]
            preds = prefix[rows][None, :] * torch.sigmoid(zk[None, :] / grid[:, None])  # [G, n]
            temps[k] = grid[int(torch.argmin(expected_calibration_error(preds, y[rows, k], num_bins)))]
        prefix = prefix * torch.sigmoid(torch.nan_to_num(z[:, k]) / temps[k])
    return temps
