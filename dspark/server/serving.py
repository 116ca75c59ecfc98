"""The serving loop: one thread steps the engine; HTTP handlers (asyncio) submit requests and receive
each request's `StepOutput`s on an asyncio queue.

    serving = ServingEngine(engine, max_queue_len=64, metrics=ServerMetrics())
    serving.start()                 # the loop on a background thread, or, in the thread that built the
                                    # model: serving.run_here(until=...)  (see run_here: 2x faster on CPU)
    queue = serving.submit("req-1", prompt_ids, params, loop, index=0)   # raises Overloaded when full
    out = await queue.get()                                               # (index, StepOutput)
    serving.abort("req-1")                                                # e.g. the client went away
    serving.shutdown()                                                    # after draining

Admission: at most `engine.max_num_seqs` requests run, at most `max_queue_len` more wait; beyond
that `submit` raises `Overloaded` (the server answers 429 at once instead of hanging). An error in
a step fails the requests it concerns (the engine isolates them); an unexpected error escaping the
engine fails every request in flight, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dspark.engine import Engine, RequestMetrics, StepOutput
from dspark.errors import DSparkError
from dspark.sampling import SamplingParams
from dspark.server.metrics import ServerMetrics

log = logging.getLogger("dspark.server")


class Overloaded(DSparkError):
    """Every running slot and queue place is taken."""


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int  # choice index within its HTTP request
    t_arrival: float
    t_last: float | None = None


class ServingEngine:
    def __init__(self, engine: Engine, max_queue_len: int, metrics: ServerMetrics,
                 idle_wait_s: float = 0.05, loop_thread: str = "background") -> None:
        """loop_thread: "background" (`start()` steps the engine on a thread of its own) or "caller"
        (a thread of the caller's steps it with `run_here`; `start()` does nothing)."""
        if max_queue_len < 0:
            raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
        if loop_thread not in ("background", "caller"):
            raise ValueError(f"loop_thread must be 'background' or 'caller', got {loop_thread!r}")
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.capacity = engine.max_num_seqs + max_queue_len
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._listeners: dict[str, _Listener] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)
        self._caller_runs_loop = loop_thread == "caller"  # start() then leaves the loop to run_here

    # ---- handler side ----------------------------------------------------------------------------

    def start(self) -> None:
        """Step the engine on a background thread (nothing when `run_here` drives the loop)."""
        if not self._caller_runs_loop and not self._thread.is_alive():
            self._thread.start()

    def run_here(self, until=None) -> None:
        """Step the engine in the calling thread until `shutdown` (or until `until()` is true, checked
        between steps and at least every `idle_wait_s` while idle). Build the ServingEngine with
        loop_thread="caller" when an HTTP server is started first (its lifespan's `start()` then does
        nothing).

        Why: the kernels run their threads with OpenMP (GNU libgomp), which keeps a team of worker
        threads for every thread that has started one; once a second thread starts teams, there are
        more of libgomp's threads than CPUs and libgomp makes every worker sleep between parallel
        sections instead of spinning: each of a decode step's hundreds of sections then costs a wake-up
        (measured here: an empty section 0.7 us from the one thread, 12-20 us from a second; a SmolLM2
        decode step 5.2 ms against 10.6 ms). The thread that loaded the model has already started
        teams, so the engine runs fastest on that thread, with the HTTP handlers elsewhere."""
        self._caller_runs_loop = True
        self._loop(until)

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._listeners)

    def submit_many(self, rids: Sequence[str], prompt: list[int], params: Sequence[SamplingParams],
                    loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Admit the `len(rids)` choices of one HTTP request together, or none (Overloaded)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._listeners) + len(rids) > self.capacity:
                raise Overloaded(f"server is at capacity ({self.engine.max_num_seqs} running, "
                                 f"{self.max_queue_len} queued); retry later")
            now = time.perf_counter()
            added = []
            try:
                for i, (rid, sp) in enumerate(zip(rids, params)):
                    self._listeners[rid] = _Listener(loop, queue, i, now)
                    self.engine.add_request(prompt, sp, request_id=rid)
                    added.append(rid)
            except BaseException:
                for rid in rids:
                    self._listeners.pop(rid, None)
                for rid in added:
                    self.engine.abort(rid)
                raise
            self.metrics.in_flight.set(len(self._listeners))
        self.metrics.prompt_tokens.inc(len(prompt) * len(rids))
        self._wake.set()
        return queue

    def abort(self, rid: str) -> None:
        """Stop a request (client gone); its slot is freed at the start of the next step."""
        with self._lock:
            known = rid in self._listeners
        if known:
            self.engine.abort(rid)
            self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let requests in flight finish (up to `timeout` s), then stop the loop."""
        end = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # ---- engine thread ---------------------------------------------------------------------------

    def _loop(self, until=None) -> None:
        while not self._stop.is_set() and not (until is not None and until()):
            if not self.engine.has_unfinished():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - never let one bad step take the server down
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                continue
            self._publish(outputs)

    def _publish(self, outputs: list[StepOutput]) -> None:
        m = self.metrics
        stats = self.engine.last_step
        m.queue_depth.set(stats.num_waiting)
        m.running.set(stats.num_running)
        if stats.num_verified_tokens:
            m.verified_per_step.observe(stats.num_verified_tokens)
        now = time.perf_counter()
        for o in outputs:
            with self._lock:
                lst = self._listeners.get(o.request_id) if not o.finished else self._listeners.pop(o.request_id, None)
                m.in_flight.set(len(self._listeners))
            if o.new_token_ids:
                m.completion_tokens.inc(len(o.new_token_ids))
            m.observe_round(o.num_draft_tokens, o.num_accepted)
            if o.finished:
                m.requests.labels(o.finish_reason).inc()
            if lst is None:
                continue
            if o.new_token_ids:
                if lst.t_last is None:
                    m.ttft.observe(now - lst.t_arrival)
                else:
                    m.itl.observe(now - lst.t_last)
                lst.t_last = now
            self._send(lst, o)

    @staticmethod
    def _send(lst: _Listener, o: StepOutput) -> None:
        try:
            lst.loop.call_soon_threadsafe(lst.queue.put_nowait, (lst.index, o))
        except RuntimeError:  # the event loop is closed (server shutting down): nobody listens
            pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            listeners, self._listeners = dict(self._listeners), {}
        for rid, lst in listeners.items():
            self.engine.abort(rid)
            self.metrics.requests.labels("error").inc()
            self._send(lst, StepOutput(rid, [], "", "error", RequestMetrics(0), error=str(error)))
        try:
            self.engine.step()  # carry out the aborts
        except Exception:  # noqa: BLE001
            log.exception("engine step failed again while aborting")
