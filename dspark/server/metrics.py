"""Prometheus metrics of the server (one registry per server, so several servers in one process do
not collide), exposed as text at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, max_positions: int = 16) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. (Linux)
        self.requests = Counter("dspark_requests", "Finished requests by status", ["status"], registry=r)
        self.prompt_tokens = Counter("dspark_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("dspark_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dspark_inter_token_latency_seconds", "Time between outputs of one request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.accepted_length = Histogram("dspark_accepted_length", "τ per speculative round (bonus included)",
                                         buckets=tuple(range(1, 18)), registry=r)
        self.tried = Counter("dspark_drafts_tried", "Drafts verified, by position", ["position"], registry=r)
        self.accepted = Counter("dspark_drafts_accepted", "Drafts accepted, by position", ["position"], registry=r)
        self.verified_per_step = Histogram("dspark_verified_tokens_per_step",
                                           "Target positions scored by each decoding step",
                                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.queue_depth = Gauge("dspark_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("dspark_requests_running", "Requests holding a cache slot", registry=r)
        self.in_flight = Gauge("dspark_requests_in_flight", "Requests accepted and not finished", registry=r)
        self.max_positions = max_positions

    def observe_round(self, num_draft: int, num_accepted: int | None) -> None:
        if num_accepted is None:
            return
        self.accepted_length.observe(num_accepted + 1)
        for k in range(min(num_accepted + 1, num_draft, self.max_positions)):
            self.tried.labels(str(k + 1)).inc()
            if k < num_accepted:
                self.accepted.labels(str(k + 1)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
