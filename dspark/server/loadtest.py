"""A load test for `dspark serve`: C concurrent streaming clients, each sending R requests one after
another, over loopback; reports throughput and TTFT / inter-token latency percentiles.

    python -m dspark.server.loadtest --url http://127.0.0.1:8000 --clients 32 --requests 4 --max-tokens 32

TTFT: request sent -> first SSE chunk with text. Inter-token latency: time between consecutive text
chunks of one stream (one chunk per engine step; a speculative round may carry several tokens in one
chunk). Every request is greedy, so its text can be checked against a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    prompt: str
    status: int
    text: str = ""
    completion_tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    done: bool = False  # saw data: [DONE]
    finish_reason: str | None = None


@dataclass
class LoadReport:
    clients: int
    requests: int
    seconds: float
    completion_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    statuses: dict[str, int]

    def line(self) -> str:
        return (f"{self.requests} requests from {self.clients} clients in {self.seconds:.2f} s: "
                f"{self.tokens_per_s:.1f} tokens/s, {self.requests_per_s:.2f} requests/s; TTFT p50 "
                f"{self.ttft_p50_ms:.1f} ms, p99 {self.ttft_p99_ms:.1f} ms; ITL p50 {self.itl_p50_ms:.2f} ms, "
                f"p99 {self.itl_p99_ms:.2f} ms; statuses {self.statuses}")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def _one(client, url: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    res = RequestResult(prompt, 0)
    t0 = time.perf_counter()
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        res.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                res.completion_tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                now = time.perf_counter()
                if c.get("text"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    res.text += c["text"]
                if c.get("finish_reason"):
                    res.finish_reason = c["finish_reason"]
    return res


async def run_load(url: str, prompts: list[str], clients: int = 32, requests_per_client: int = 4,
                   max_tokens: int = 16, timeout: float = 120.0) -> tuple[LoadReport, list[RequestResult]]:
    """Client c sends prompts[(c * R + i) % len(prompts)] for i < R, one after another."""
    import httpx

    async def client_task(c: int, client) -> list[RequestResult]:
        out = []
        for i in range(requests_per_client):
            out.append(await _one(client, url, prompts[(c * requests_per_client + i) % len(prompts)], max_tokens))
        return out

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_task(c, client) for c in range(clients)))
        seconds = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    tokens = sum(r.completion_tokens for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [x for r in results for x in r.itls]
    report = LoadReport(clients, len(results), seconds, tokens, tokens / seconds, len(results) / seconds,
                        1e3 * percentile(ttfts, 50), 1e3 * percentile(ttfts, 99),
                        1e3 * percentile(itls, 50), 1e3 * percentile(itls, 99), statuses)
    return report, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark.server.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: a few code openings)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    prompts = args.prompt or ["def add(a, b):\n", "import os\n", "class Stack:\n", "for i in range(10):\n"]
    report, _ = asyncio.run(run_load(args.url, prompts, args.clients, args.requests, args.max_tokens))
    print(json.dumps(asdict(report)) if args.json else report.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
