"""`dspark loadtest`: closed-loop concurrent clients against the serving engine, one run per
(verification policy, concurrency), and the paper's Figures 7 and 8.

    dspark loadtest --model M --drafter D --data-dir ../shared/benchmarks --set mt-bench \
        --concurrency 1,2,4,8,16,32 --policies plain,fixed:1,fixed:3,fixed:7,confidence \
        --requests-per-client 4 --max-tokens 64 --out runs/load.json [--http]
    python -m dspark.server.loadtest --url http://127.0.0.1:8000 --clients 32 --requests 4 --max-tokens 32

Each policy gets its own engine over the same target (`plain`: no drafter), with one slot per
client of the largest concurrency. At concurrency C, C clients each send --requests-per-client
greedy requests one after another (closed loop: a client sends its next request when the previous one
has finished); client c sends prompt (c · R + i) mod N of the set, chat-templated when the model has
a template. In-process, the clients submit to the server's `ServingEngine` (its engine thread steps
the batch); with --http they stream from a `dspark serve` app started on loopback, over HTTP/SSE.

Per (policy, concurrency) row of `results` in --out:
  throughput_tokens_per_s          completion tokens of all requests / wall time of the run
  per_user_tokens_per_s            mean over requests of (tokens − 1) / (last − first token time): a
                                   user's decoding speed once the reply started (1 / TPOT)
  mean_verified_tokens_per_request verification budget: target positions per request per step, 1 + ℓ
                                   (pooled over every request's rounds; 1 for plain)
  ttft_p50_ms, ttft_p99_ms         request sent -> first token
  accepted_length                  τ, tokens per round (bonus included)
  mismatches_vs_plain              requests whose greedy text differs from the plain policy's for the
                                   same prompt (lossless decoding: 0, up to float near-ties)
Next to it: `<out>.frontier.png` (throughput vs per-user speed, Figure 7) and `<out>.budget.png`
(throughput and verification budget vs concurrency, Figure 8), and `checks`: whether `confidence`
is never below `plain`, within 5% of the best fixed:K at every level, and >= 1.6x `fixed:1` per
user at one client.

The `--url` form (`python -m dspark.server.loadtest`) runs C streaming clients against a server that
is already running and reports throughput, TTFT and inter-token latency (one SSE chunk per engine
step; a speculative round may carry several tokens in one chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dspark.errors import DSparkError


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
    index: int = -1                 # which prompt (of the list the load test cycles through)
    rounds: int | None = None       # speculative rounds (None: plain decoding)
    verified_drafts: int = 0        # Σ ℓ over the rounds
    accepted_drafts: int = 0

    @property
    def decode_seconds(self) -> float:
        return sum(self.itls)


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


async def _one(client, url: str, prompt: str | list[int], max_tokens: int, index: int = -1) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    res = RequestResult(prompt, 0, index=index)
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
            if chunk.get("dspark"):
                spec = chunk["dspark"]
                res.rounds, res.accepted_drafts = spec["rounds"], spec["accepted_drafts"]
                res.verified_drafts = spec.get("verified_drafts", 0)
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


def prompt_index(c: int, i: int, requests_per_client: int, num_prompts: int) -> int:
    """The prompt client c sends as its i-th request."""
    return (c * requests_per_client + i) % num_prompts


async def run_load(url: str, prompts: Sequence[str | list[int]], clients: int = 32, requests_per_client: int = 4,
                   max_tokens: int = 16, timeout: float = 120.0,
                   on_done: Callable[[RequestResult], None] | None = None) -> tuple[LoadReport, list[RequestResult]]:
    """Client c sends prompts[(c * R + i) % len(prompts)] for i < R, one after another."""
    import httpx

    async def client_task(c: int, client) -> list[RequestResult]:
        out = []
        for i in range(requests_per_client):
            k = prompt_index(c, i, requests_per_client, len(prompts))
            out.append(await _one(client, url, prompts[k], max_tokens, k))
            if on_done is not None:
                on_done(out[-1])
        return out

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_task(c, client) for c in range(clients)))
        seconds = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    return summarize_load(clients, results, seconds), results


def summarize_load(clients: int, results: list[RequestResult], seconds: float) -> LoadReport:
    tokens = sum(r.completion_tokens for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [x for r in results for x in r.itls]
    return LoadReport(clients, len(results), seconds, tokens, tokens / seconds, len(results) / seconds,
                      1e3 * percentile(ttfts, 50), 1e3 * percentile(ttfts, 99),
                      1e3 * percentile(itls, 50), 1e3 * percentile(itls, 99), statuses)


# ---------------------------------------------------------------------------------------------------
# `dspark loadtest`: policies x concurrency levels against the serving engine


class LoadTestError(DSparkError, ValueError):
    """Bad load-test arguments; the message names the flag."""


@dataclass
class LoadConfig:
    out: Path
    policies: list[str] = field(default_factory=lambda: ["plain", "fixed:1", "fixed:3", "fixed:7", "confidence"])
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    requests_per_client: int = 4
    max_tokens: int = 64
    data_dir: Path | None = None
    set: str = "mt-bench"
    num_prompts: int | None = None   # None: enough for every request of the largest level
    model: str | None = None
    drafter: str | None = None       # None: the bundled DSpark drafter for the model
    gamma: int | None = None
    http: bool = False
    threads: int | None = None
    reprofile: bool = False
    repeats: int = 1                 # interleaved passes over every cell; each row is the median pass

    def __post_init__(self) -> None:
        from dspark.config import parse_policies

        self.out = Path(self.out)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else None
        self.policies = [str(p) for p in parse_policies(",".join(map(str, self.policies)))]
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise LoadTestError(f"--concurrency needs levels >= 1, got {self.concurrency}")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise LoadTestError(f"--concurrency lists a level twice: {self.concurrency}")
        for name, v in (("--requests-per-client", self.requests_per_client), ("--max-tokens", self.max_tokens),
                        ("--num-prompts", self.num_prompts), ("--gamma", self.gamma), ("--threads", self.threads),
                        ("--repeats", self.repeats)):
            if v is not None and v < 1:
                raise LoadTestError(f"{name} must be >= 1, got {v}")


async def _inprocess_client(serving, prompts: Sequence[list[int]], c: int, cfg: LoadConfig, params,
                            on_done: Callable[[RequestResult], None]) -> list[RequestResult]:
    from dspark.engine import RequestFailed

    loop = asyncio.get_running_loop()
    out = []
    for i in range(cfg.requests_per_client):
        k = prompt_index(c, i, cfg.requests_per_client, len(prompts))
        res = RequestResult(f"prompt {k}", 200, index=k)
        t0 = time.perf_counter()
        queue = serving.submit_many([f"load-{id(out)}-{c}-{i}"], list(prompts[k]), [params], loop)
        last = None
        while True:
            _, o = await queue.get()
            now = time.perf_counter()
            if o.finish_reason == "error":
                raise RequestFailed(f"load test request {k} failed: {o.error}")
            if o.new_token_ids:
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last = now
            if o.finished:
                break
        m = o.metrics
        res.text, res.completion_tokens, res.finish_reason, res.done = o.output.text, m.num_tokens, o.finish_reason, True
        res.rounds = m.rounds if serving.engine.drafter is not None else None
        res.verified_drafts, res.accepted_drafts = m.verified_drafts, m.accepted_drafts
        out.append(res)
        on_done(res)
    return out


def run_level(engine, prompts: Sequence[list[int]], concurrency: int, cfg: LoadConfig,
              on_done: Callable[[RequestResult], None], model_name: str = "model") -> tuple[LoadReport, list[RequestResult]]:
    """One closed-loop run of `concurrency` clients against a fresh serving loop over `engine`."""
    from dspark.sampling import SamplingParams
    from dspark.server.metrics import ServerMetrics
    from dspark.server.serving import ServingEngine

    params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens, num_speculative_tokens=cfg.gamma)
    serving = ServingEngine(engine, max_queue_len=concurrency, metrics=ServerMetrics(), loop_thread="caller")
    if cfg.http:
        return _run_level_http(serving, prompts, concurrency, cfg, on_done, model_name)

    async def go() -> list[RequestResult]:
        per = await asyncio.gather(*(_inprocess_client(serving, prompts, c, cfg, params, on_done)
                                     for c in range(concurrency)))
        return [r for rs in per for r in rs]

    t0 = time.perf_counter()
    results = clients_beside_engine(serving, lambda: asyncio.run(go()))
    seconds = time.perf_counter() - t0
    return summarize_load(concurrency, results, seconds), results


def clients_beside_engine(serving, clients: Callable[[], Any]) -> Any:
    """Run `clients()` on a background thread while this thread steps the engine (`run_here`: the
    thread that loaded the model, where its kernels run fastest); returns what it returned, or raises
    what it raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = clients()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            box["error"] = e

    thread = threading.Thread(target=run, name="dspark-loadtest-clients", daemon=True)
    thread.start()
    try:
        serving.run_here(until=lambda: not thread.is_alive())
    finally:
        thread.join()
        serving.shutdown(timeout=5)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run_level_http(serving, prompts, concurrency: int, cfg: LoadConfig, on_done, model_name: str):
    import socket

    import uvicorn

    from dspark.server.app import build_app

    drafter = serving.engine.drafter
    app = build_app(serving, model_name, drafter.name if drafter is not None else None, 5.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, name="dspark-loadtest-http", daemon=True)

    def clients():
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise LoadTestError(f"--http: the server did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        return asyncio.run(run_load(f"http://127.0.0.1:{port}", [list(p) for p in prompts], concurrency,
                                    cfg.requests_per_client, cfg.max_tokens, on_done=on_done))

    thread.start()
    try:
        return clients_beside_engine(serving, clients)  # the engine on this thread, the server and clients beside
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def load_row(policy: str, report: LoadReport, results: list[RequestResult]) -> dict[str, Any]:
    """One row of `results` (see the module docstring)."""
    speeds = [(r.completion_tokens - 1) / r.decode_seconds for r in results
              if r.completion_tokens > 1 and r.decode_seconds > 0]
    spec = [r for r in results if r.rounds]
    rounds = sum(r.rounds for r in spec)
    budget = (rounds + sum(r.verified_drafts for r in spec)) / rounds if rounds else 1.0
    return {"policy": policy, "concurrency": report.clients, "requests": report.requests,
            "seconds": report.seconds, "completion_tokens": report.completion_tokens,
            "throughput_tokens_per_s": report.tokens_per_s,
            "per_user_tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
            "mean_verified_tokens_per_request": budget,
            "accepted_length": (rounds + sum(r.accepted_drafts for r in spec)) / rounds if rounds else None,
            "ttft_p50_ms": report.ttft_p50_ms, "ttft_p99_ms": report.ttft_p99_ms,
            "itl_p50_ms": report.itl_p50_ms, "itl_p99_ms": report.itl_p99_ms, "statuses": report.statuses}


def load_checks(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's claims about `confidence`, where the policies they compare were run."""
    at = {(r["policy"], r["concurrency"]): r for r in rows}
    levels = sorted({r["concurrency"] for r in rows})
    fixed = sorted({r["policy"] for r in rows if r["policy"].startswith("fixed:")})
    out: dict[str, Any] = {}
    conf = {c: at[("confidence", c)]["throughput_tokens_per_s"] for c in levels if ("confidence", c) in at}
    if conf and any(("plain", c) in at for c in levels):
        out["confidence_never_below_plain"] = all(v >= at[("plain", c)]["throughput_tokens_per_s"]
                                                  for c, v in conf.items() if ("plain", c) in at)
    if conf and fixed:
        ratio = {c: v / max(at[(f, c)]["throughput_tokens_per_s"] for f in fixed if (f, c) in at)
                 for c, v in conf.items() if any((f, c) in at for f in fixed)}
        out["confidence_vs_best_fixed"] = {str(c): round(r, 4) for c, r in ratio.items()}
        out["confidence_within_5pct_of_best_fixed"] = all(r >= 0.95 for r in ratio.values())
    # The same comparisons pass by pass: each pass runs every policy at a level back to back, so the ratio
    # within a pass cancels the machine's drift between passes; the median over passes.
    passes = {k: r.get("throughput_all_passes") for k, r in at.items()}
    if conf and all(passes.get(("confidence", c)) for c in conf):
        paired_plain, paired_fixed = {}, {}
        for c in conf:
            mine = passes[("confidence", c)]
            if passes.get(("plain", c)):
                paired_plain[c] = statistics.median(a / b for a, b in zip(mine, passes[("plain", c)]))
            rivals = [passes[(f, c)] for f in fixed if passes.get((f, c))]
            if rivals:
                paired_fixed[c] = statistics.median(a / max(col) for a, col in zip(mine, zip(*rivals)))
        if paired_plain:
            out["confidence_over_plain_paired"] = {str(c): round(r, 4) for c, r in paired_plain.items()}
            out["confidence_never_below_plain_paired"] = all(r >= 1.0 for r in paired_plain.values())
        if paired_fixed:
            out["confidence_vs_best_fixed_paired"] = {str(c): round(r, 4) for c, r in paired_fixed.items()}
            out["confidence_within_5pct_of_best_fixed_paired"] = all(r >= 0.95 for r in paired_fixed.values())
    if ("confidence", 1) in at and ("fixed:1", 1) in at and at[("fixed:1", 1)]["per_user_tokens_per_s"]:
        r = at[("confidence", 1)]["per_user_tokens_per_s"] / at[("fixed:1", 1)]["per_user_tokens_per_s"]
        out["per_user_confidence_over_fixed1_at_1_client"] = round(r, 4)
        out["per_user_at_1_client_at_least_1.6x_fixed1"] = r >= 1.6
    return out


def load_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| policy | clients | tokens/s | per-user tokens/s | verified / request / step | τ | TTFT p50 ms | "
             "TTFT p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tau = "–" if r["accepted_length"] is None else f"{r['accepted_length']:.2f}"
        lines.append(f"| {r['policy']} | {r['concurrency']} | {r['throughput_tokens_per_s']:.1f} | "
                     f"{r['per_user_tokens_per_s']:.1f} | {r['mean_verified_tokens_per_request']:.2f} | {tau} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def loadtest(cfg: LoadConfig, *, target=None, progress: bool = True, plots: bool = True) -> dict[str, Any]:
    """Run every (policy, concurrency) cell and write --out and the plots; returns what --out holds."""
    import torch
    from tqdm import tqdm

    from dspark.bundled import default_drafter_for, resolve_drafter, target_label
    from dspark.config import VerifyPolicy
    from dspark.drafters import load_drafter
    from dspark.engine import Engine
    from dspark.eval.prompts import BUILTIN_PROMPTS, load_prompt_set, prepare_prompts
    from dspark.sampling import SamplingParams
    from dspark.train.checkpoint import atomic_write_text, check_writable

    try:
        import prometheus_client  # noqa: F401
        if cfg.http:
            import fastapi  # noqa: F401
            import httpx  # noqa: F401
            import uvicorn  # noqa: F401
    except ImportError as e:
        raise LoadTestError(f"dspark loadtest needs the serve extra ({e.name} is missing): "
                            "pip install -e '.[serve]'" + (" (and httpx for --http)" if cfg.http else "")) from None
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    need = max(cfg.concurrency) * cfg.requests_per_client
    n = cfg.num_prompts or need
    texts = load_prompt_set(cfg.data_dir, cfg.set, n) if cfg.data_dir is not None else list(BUILTIN_PROMPTS)[:n]
    check_writable(cfg.out, "--out")
    if target is None:
        from dspark.bundled import default_model_path
        from dspark.models import load_target
        target = load_target(Path(cfg.model) if cfg.model else default_model_path())
    prompts = prepare_prompts(texts, target.tokenizer, target.context_length, cfg.max_tokens).token_ids
    max_len = min(target.context_length, max(len(p) for p in prompts) + cfg.max_tokens)
    slots = max(cfg.concurrency)
    spec = resolve_drafter(cfg.drafter, target) if cfg.drafter is not None else default_drafter_for(target)[0]
    policies = [VerifyPolicy.parse(p) for p in cfg.policies]
    if spec is None and any(p.speculative for p in policies):
        raise LoadTestError(f"--policies {','.join(cfg.policies)} need a drafter, and {target_label(target)} has "
                            "none (pass --drafter)")
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    plain_text: dict[tuple[int, int], str] = {}
    total = cfg.repeats * len(policies) * sum(c * cfg.requests_per_client for c in cfg.concurrency)
    bar = tqdm(total=total, desc="loadtest", unit="req", disable=not progress)
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}  # (policy index, concurrency) -> a row per pass
    try:
        engines = []  # one engine per policy, alive for every pass (its step-cost table and gate persist)
        for policy in policies:
            drafter = load_drafter(spec, target, max_seqs=slots, max_len=max_len) if policy.speculative else None
            engine = Engine(target, max_num_seqs=slots, max_model_len=max_len, drafter=drafter, policy=policy,
                            num_speculative_tokens=cfg.gamma, reprofile=cfg.reprofile)
            if engine.step_cost_path is not None:
                notes.append(f"{policy}: step-cost table {'read from' if engine.step_cost_cached else 'profiled into'} "
                             f"{engine.step_cost_path}")
            engine.run([prompts[0]], [SamplingParams(temperature=0, max_tokens=4)])  # warm-up
            engines.append(engine)
        # Interleaved: each pass runs every concurrency level with every policy back to back, so a
        # change in the machine's load shows in every policy alike; every other pass in the reverse
        # order, so a load that rises or falls over a level's runs favours no policy (ABBA).
        for p in range(cfg.repeats):
            for c in cfg.concurrency:
                order = list(enumerate(zip(policies, engines)))
                for i, (policy, engine) in (reversed(order) if p % 2 else order):
                    bar.set_postfix_str(f"{policy} x{c}")
                    report, results = run_level(engine, prompts, c, cfg, lambda r: bar.update(1), target_label(target))
                    row = load_row(str(policy), report, results)
                    if policy.kind == "plain":
                        plain_text.update({(c, r.index): r.text for r in results})
                    elif plain_text:
                        row["mismatches_vs_plain"] = sum(1 for r in results
                                                         if plain_text.get((c, r.index), r.text) != r.text)
                    cells.setdefault((i, c), []).append(row)
        del engines
    finally:
        bar.close()
    for i, _ in enumerate(policies):
        for c in cfg.concurrency:
            passes = cells[(i, c)]
            ranked = sorted(passes, key=lambda r: r["throughput_tokens_per_s"])
            row = dict(ranked[(len(ranked) - 1) // 2])  # the median pass (the lower one of an even count)
            if len(passes) > 1:
                row["throughput_all_passes"] = [r["throughput_tokens_per_s"] for r in passes]
                if any("mismatches_vs_plain" in r for r in passes):
                    row["mismatches_vs_plain"] = sum(r.get("mismatches_vs_plain", 0) for r in passes)
            rows.append(row)
    data = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()} |
            {"model": target_label(target), "drafter": str(spec) if spec is not None else None,
             "threads": torch.get_num_threads(), "mode": "http" if cfg.http else "in-process"},
            "results": rows, "checks": load_checks(rows), "notes": notes}
    paths = {"json": cfg.out}
    if plots:
        from dspark.eval.plots import plot_load_budget, plot_load_frontier
        paths["frontier_png"] = plot_load_frontier(rows, cfg.out.with_suffix(".frontier.png"),
                                                   title=f"{target_label(target)}: throughput vs per-user speed")
        paths["budget_png"] = plot_load_budget(rows, cfg.out.with_suffix(".budget.png"))
    data["paths"] = {k: str(v) for k, v in paths.items()}
    atomic_write_text(cfg.out, json.dumps(data, indent=1) + "\n")
    return data


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dspark.bundled import DRAFTER_HELP, MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--drafter", default=None, help=DRAFTER_HELP)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory of benchmark prompt sets (default: built-in Python openings)")
    p.add_argument("--set", default="mt-bench", help="prompt set in --data-dir (default: mt-bench)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="first N prompts of the set, cycled through (default: one per request of the largest level)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8, 16, 32],
                   help="comma-separated numbers of concurrent clients (default: 1,2,4,8,16,32)")
    p.add_argument("--policies", default="plain,fixed:1,fixed:3,fixed:7,confidence",
                   help="comma-separated verification policies: plain, static, fixed:K, threshold:P, confidence "
                        "(default: plain,fixed:1,fixed:3,fixed:7,confidence)")
    p.add_argument("--requests-per-client", type=int, default=4,
                   help="requests each client sends, one after another (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("-g", "--num-speculative-tokens", dest="gamma", type=int, default=None,
                   help="γ, the most drafts a round verifies (default: the drafter's block size)")
    p.add_argument("--http", action="store_true",
                   help="go through the HTTP server (OpenAI API, SSE streaming on loopback) instead of in-process")
    p.add_argument("--out", type=Path, default=Path("runs/load.json"),
                   help="results JSON; the two PNGs go next to it (default: runs/load.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reprofile", action="store_true",
                   help="measure the target's step-cost table again instead of reading the cached one")
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved passes over every (policy, concurrency) cell, every other one in the reverse "
                        "order of policies; each row reports the median pass by throughput (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(out=args.out, policies=args.policies.split(","), concurrency=args.concurrency,
                      requests_per_client=args.requests_per_client, max_tokens=args.max_tokens, data_dir=args.data_dir,
                      set=args.set, num_prompts=args.num_prompts, model=args.model, drafter=args.drafter,
                      gamma=args.gamma, http=args.http, threads=args.threads, reprofile=args.reprofile,
                      repeats=args.repeats)


def run(args: argparse.Namespace) -> int:
    """`dspark loadtest`: exit status 0."""
    data = loadtest(config_from_args(args), progress=not args.no_progress)
    print(load_table(data["results"]), end="")
    for k, v in data["checks"].items():
        print(f"{k}: {v}")
    for n in data["notes"]:
        print(f"note: {n}")
    print("wrote " + ", ".join(data["paths"].values()))
    return 0


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
