"""Typed, validated configuration shared by the engine, the CLI and the server (no torch import, so
the CLI's --help stays fast).

    from dspark.config import EngineConfig, SchedulerKind
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, scheduler=SchedulerKind.CONFIDENCE)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dspark.errors import DSparkError


class SchedulerKind(str, enum.Enum):
    """How many drafts each request verifies per round."""

    STATIC = "static"  # every drafted token
    CONFIDENCE = "confidence"  # Algorithm 1 over the drafter's confidences and a step-cost table

    def __str__(self) -> str:
        return self.value


SCHEDULERS = tuple(k.value for k in SchedulerKind)


class ScheduleError(DSparkError, ValueError):
    """A scheduler cannot run as configured (unknown name, drafter without confidence, bad table)."""


def scheduler_kind(name: str | SchedulerKind) -> SchedulerKind:
    """`name` as a SchedulerKind; ScheduleError naming the choices otherwise."""
    try:
        return SchedulerKind(name)
    except ValueError:
        raise ScheduleError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine, validated once.

    ``max_num_seqs``: requests decoded together (cache slots). ``max_model_len``: tokens per sequence
    (default: the model's context). ``max_num_batched_tokens``: the token budget of one step, prefill
    chunks included (default: 512, or enough for every slot's largest speculative round).
    ``num_speculative_tokens``: default γ (default: the drafter's block). ``scheduler``: see
    `SchedulerKind`.
    """

    max_num_seqs: int = 8
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    num_speculative_tokens: int | None = None
    scheduler: SchedulerKind | str = SchedulerKind.STATIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler", scheduler_kind(self.scheduler))
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
