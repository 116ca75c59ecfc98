"""The drafter interface the engine talks to, and the registry that picks a drafter class.

A drafter proposes ℓ_r tokens per running sequence r (ℓ_r may differ per sequence, and may be 0:
that sequence only decodes this round); the engine verifies them against the target and tells the
drafter, in one batched call per round, which tokens were kept. The engine never looks inside a
drafter: everything goes through the calls of `Drafter`, in this order per sequence:

    drafter = load_drafter("runs/dspark-drafter", target, max_seqs=8, max_len=4096)
    drafter.add_sequence(slot, prompt_ids, prefill.hidden[0])      # after the target's prefill
    loop:
        proposal = drafter.propose(slots, anchors, [ell_0, ell_1, ...], sampling, generators, stop=None)
        ... the target verifies [anchor, proposal.token_ids[i, :proposal.lengths(ells)[i]]] ...
        drafter.commit_batch(DraftCommit(slots, [[anchor, *accepted], ...], verify_hidden))
    drafter.free(slot)

A drafter consumes a sequence's random stream for each token it samples for it, and only for the
ℓ_r tokens it was asked for: a seeded request then gets the same tokens whatever else is batched.
`stop` (only for drafters with `has_confidence`) is the confidence scheduler's early-stop hook:
drafting may end early, and the proposal is then shorter than asked.

New drafters register themselves with `@register_drafter("name", architectures=(...))` and provide
`from_pretrained(path, target, max_seqs, max_len)`; `load_drafter` finds them by the `drafter_type`
or `architectures` key of a drafter directory's `config.json`, or by a bare registered name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from dspark.errors import CheckpointError
from dspark.sampling import SamplingTensors

if TYPE_CHECKING:
    from dspark.models import TargetModel


@dataclass
class DraftProposal:
    """One round of drafts for a batch of sequences.

    Symbols: num_reqs = sequences in the `propose` call, gamma = tokens drafted per sequence.
    """

    token_ids: Tensor  # [num_reqs, gamma] long
    # [num_reqs, gamma, vocab] float32: the exact distribution each draft token was sampled from,
    # after the request's temperature/top-k/top-p; None when every request is greedy (verification
    # then only compares tokens).
    probs: Tensor | None
    # [num_reqs, gamma], c_k in (0, 1): estimated P(token k accepted | tokens < k accepted);
    # None when the drafter has no confidence head. c_k may depend on drafts < k but never on draft
    # k itself: the confidence scheduler (dspark.schedule) decides from it whether k is verified.
    confidence: Tensor | None
    # [num_reqs, gamma]: the confidence head's raw logits z_k (before the drafter's calibration
    # temperatures, c_k = σ(z_k / T_k)), what `dspark calibrate` fits; None without a head.
    confidence_logits: Tensor | None = None

    def lengths(self, asked: Sequence[int]) -> list[int]:
        """Tokens proposed per sequence: what was asked, cut to the proposal's width (an early stop
        returns a narrower block)."""
        width = self.token_ids.shape[1]
        return [min(int(a), width) for a in asked]


# Early stop for drafters with a confidence head: called before drafting token k with the
# confidences c_1..c_k [n, k] (c_k depends on drafts < k only); returns None to go on, or m = the
# number of drafts the scheduler will verify at most, once that is settled (then drafting stops
# after max(m, tokens drafted so far) tokens).
DraftStop = Callable[[Tensor], "int | None"]


@dataclass
class DraftCommit:
    """What verification kept in one round, for every sequence of the round (one call per round).

    Symbols: num_reqs = sequences, k_max = the longest verified row (anchor + drafts) of the round.
    """

    slots: list[int]
    # Per sequence [anchor, accepted drafts...]: the tokens whose target features are now known.
    token_ids: list[list[int]]
    # [num_reqs, k_max, len(target_layer_ids), hidden]: row r is valid up to len(token_ids[r]);
    # None for drafters that read no target features.
    target_hidden: Tensor | None

    def hidden_of(self, i: int) -> Tensor | None:
        """[len(token_ids[i]), L, hidden] of sequence i."""
        return None if self.target_hidden is None else self.target_hidden[i, :len(self.token_ids[i])]


def as_num_draft_tokens(num_draft_tokens: int | Sequence[int], n: int) -> list[int]:
    """`propose`'s ℓ argument as one int per sequence (an int means the same ℓ for all)."""
    if isinstance(num_draft_tokens, int):
        return [num_draft_tokens] * n
    out = [int(x) for x in num_draft_tokens]
    if len(out) != n:
        raise ValueError(f"need one draft count per slot: {n} slots, {len(out)} counts")
    return out


@runtime_checkable
class Drafter(Protocol):
    """What the engine needs from any drafter (DSpark, DFlash, EAGLE-3, n-gram, ...)."""

    name: str  # "dspark", "dflash", ...
    block_size: int  # the largest ℓ `propose` accepts
    target_layer_ids: list[int]  # target hidden-state taps the drafter is conditioned on ([] if none)
    has_confidence: bool  # proposals carry c_k, and `propose` accepts `stop`

    def add_sequence(self, slot: int, prompt_ids: list[int], target_hidden: Tensor | None) -> None:
        """Start tracking a sequence after the target's prefill of `prompt_ids`.

        target_hidden: [n_prompt, len(target_layer_ids), hidden], the taps at every prompt position.
        """
        ...

    def propose(
        self,
        slots: list[int],
        anchors: list[int],
        num_draft_tokens: int | Sequence[int],
        sampling: SamplingTensors,
        generators: list[torch.Generator | None],
        stop: DraftStop | None = None,
    ) -> DraftProposal:
        """Draft ℓ_r = num_draft_tokens[r] tokens (0 allowed; an int: the same for all) after each
        sequence's anchor (its last emitted token, whose target features are not known yet). The
        proposal is [num_reqs, max ℓ] wide (rows past their ℓ are padding), or narrower after `stop`."""
        ...

    def commit_batch(self, batch: DraftCommit) -> None:
        """After verification, for every sequence of the round at once."""
        ...

    def commit(self, slot: int, accepted_ids: list[int], target_hidden: Tensor | None) -> None:
        """One sequence's commit (`commit_batch` of one): `accepted_ids` = [anchor, accepted drafts...];
        target_hidden: [len(accepted_ids), len(target_layer_ids), hidden]."""
        ...

    def free(self, slot: int) -> None:
        """Forget a finished sequence."""
        ...


# ---------------------------------------------------------------------------------------------------
# Registry

DRAFTERS: dict[str, type] = {}
# config.json `architectures[0]` -> registered drafter name, for directories without `drafter_type`.
ARCHITECTURES: dict[str, str] = {}


def register_drafter(name: str, architectures: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: make `cls` loadable by `load_drafter` under `name` (and its architectures).

    The class must provide `from_pretrained(path: Path | None, target, max_seqs, max_len)`; `path`
    is None when the drafter was asked for by bare name (drafters without weights accept that).
    """

    def deco(cls: type) -> type:
        if name in DRAFTERS and DRAFTERS[name] is not cls:
            raise ValueError(f"drafter name {name!r} is already registered to {DRAFTERS[name].__name__}")
        DRAFTERS[name] = cls
        for arch in architectures:
            ARCHITECTURES.setdefault(arch, name)
        return cls

    return deco


def _ensure_builtin_drafters() -> None:
    # Importing the package registers the drafters shipped with DSpark.
    import dspark.drafters  # noqa: F401


def drafter_type_of(config: dict, source: str) -> str:
    """The registered drafter name a drafter `config.json` asks for (`drafter_type`, else
    `architectures[0]`)."""
    _ensure_builtin_drafters()
    kind = config.get("drafter_type")
    if kind is not None:
        if kind not in DRAFTERS:
            raise CheckpointError(
                f"{source}: unknown drafter_type {kind!r}; registered: {', '.join(sorted(DRAFTERS))}"
            )
        return str(kind)
    archs = config.get("architectures") or []
    if not archs:
        raise CheckpointError(f"{source}: missing key 'drafter_type' (or 'architectures') naming the drafter")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unknown drafter architecture {arch!r} in key 'architectures'; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[arch]


def load_drafter(path_or_name: str | Path, target: "TargetModel", max_seqs: int, max_len: int) -> Drafter:
    """Load a drafter directory (or a drafter without weights, by its registered name) for `target`.

    `max_seqs` / `max_len`: how many sequences and how many tokens per sequence the drafter must be
    able to track (the engine's own limits).
    """
    _ensure_builtin_drafters()
    path = Path(path_or_name)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"missing file config.json in drafter directory {path}")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{cfg_file}: expected a JSON object")
        cls = DRAFTERS[drafter_type_of(raw, str(cfg_file))]
        from dspark.bundled import check_drafter_target
        check_drafter_target(raw, str(cfg_file), target)
        return cls.from_pretrained(path, target, max_seqs, max_len)
    name = str(path_or_name)
    if name in DRAFTERS:
        return DRAFTERS[name].from_pretrained(None, target, max_seqs, max_len)
    raise CheckpointError(
        f"drafter {name!r} is neither a directory nor a registered drafter name "
        f"({', '.join(sorted(DRAFTERS))})"
    )
