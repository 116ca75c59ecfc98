"""`dspark serve` over real HTTP on loopback: the OpenAI endpoints (raw HTTP and the official
`openai` client), greedy output equal to `LLM.generate` / `LLM.chat`, streaming, n > 1 with a seed,
bad input -> 400 naming the field, overload -> 429, a disconnect frees the slot, SIGTERM drains,
a 32 x 4 streaming load test, and a schemathesis fuzz run with no 5xx."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import httpx
import pytest

from dspark import LLM, SamplingParams
from dspark.server import build_from_args

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Hello world! Bonjour", "Numbers 0 1 2 3"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(model: Path, **kw) -> Namespace:
    base = dict(model=str(model), drafter="none", host="127.0.0.1", port=free_port(), policy="static",
                num_speculative_tokens=None, max_num_seqs=4, max_queue_len=64, max_model_len=None,
                max_num_batched_tokens=None, served_model_name="tiny", dtype=None, threads=None,
                drain_timeout=30.0, log_level="warning")
    base.update(kw)
    return Namespace(**base)


class ThreadServer:
    """uvicorn serving the app in a thread of this process (real sockets, real HTTP)."""

    def __init__(self, args: Namespace) -> None:
        import uvicorn

        self.app, self.serving = build_from_args(args)
        self.url = f"http://127.0.0.1:{args.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=args.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} did not become healthy in {timeout} s")


@pytest.fixture(scope="module")
def plain_srv(qwen3_ckpt):
    srv = ThreadServer(serve_args(qwen3_ckpt.path))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def spec_srv(qwen3_ckpt):
    srv = ThreadServer(serve_args(qwen3_ckpt.path, drafter="ngram", num_speculative_tokens=4))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def ref(qwen3_ckpt) -> LLM:
    return LLM(model=qwen3_ckpt.path, max_num_seqs=4)


def sse_events(resp: httpx.Response) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- endpoints and equality with the Python API ------------------------------------------------------

def test_models_health_metrics(plain_srv):
    r = httpx.get(f"{plain_srv.url}/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{plain_srv.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{plain_srv.url}/metrics").text
    for name in ("dspark_requests_total", "dspark_time_to_first_token_seconds", "dspark_inter_token_latency_seconds",
                 "dspark_accepted_length", "dspark_verified_tokens_per_step", "dspark_queue_depth",
                 "dspark_requests_running", "dspark_prompt_tokens_total", "dspark_completion_tokens_total"):
        assert name in text, name


@pytest.mark.parametrize("which", ["plain_srv", "spec_srv"])
def test_greedy_completion_equals_generate(request, ref, which):
    srv = request.getfixturevalue(which)
    for prompt in PROMPTS:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                          "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        want = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        assert body["choices"][0]["text"] == want.text
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(want.prompt_token_ids), "completion_tokens": 12,
                                 "total_tokens": len(want.prompt_token_ids) + 12}
        if which == "spec_srv":
            assert body["dspark"]["drafter"] == "ngram" and body["dspark"]["rounds"] >= 1
    if which == "spec_srv":  # speculative stats reached the metrics
        assert 'dspark_drafts_tried_total{position="1"}' in httpx.get(f"{srv.url}/metrics").text


@pytest.mark.parametrize("which", ["plain_srv", "spec_srv"])
def test_openai_client_chat_and_stream_equal_llm_chat(request, ref, which):
    from openai import OpenAI

    srv = request.getfixturevalue(which)
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    want = ref.chat(CHAT, SamplingParams(temperature=0, max_tokens=10))[0]
    got = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=10)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_completion_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices
    comp = client.completions.create(model="tiny", prompt=PROMPTS[1], temperature=0, max_tokens=8, stream=True)
    want_c = ref.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8))[0]
    assert "".join(c.choices[0].text for c in comp) == want_c.text


def test_n_with_seed_is_reproducible_and_equals_seeded_generate(plain_srv, ref):
    from openai import OpenAI

    client = OpenAI(base_url=f"{plain_srv.url}/v1", api_key="unused", max_retries=0)
    kw = dict(model="tiny", prompt=PROMPTS[0], temperature=1.0, top_k=8, max_tokens=8, n=3, seed=7,
              extra_body={"top_k": 8, "ignore_eos": True})
    kw.pop("top_k")
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    want = ref.generate([PROMPTS[0]] * 3, [SamplingParams(temperature=1.0, top_k=8, max_tokens=8, seed=7 + i,
                                                          ignore_eos=True) for i in range(3)])
    assert texts == [w.text for w in want]
    assert len(set(texts)) > 1  # different seeds per choice
    assert a.usage.completion_tokens == 24


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 2}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "word " * 400}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_completion_input_is_400_naming_the_field(plain_srv, body, param):
    r = httpx.post(f"{plain_srv.url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert param in err["message"] or "prompt" in err["message"]


def test_malformed_json_and_bad_chat_are_400(plain_srv):
    r = httpx.post(f"{plain_srv.url}/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{plain_srv.url}/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = httpx.post(f"{plain_srv.url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# ---- limits and failures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_srv(qwen3_ckpt):
    srv = ThreadServer(serve_args(qwen3_ckpt.path, max_num_seqs=1, max_queue_len=1))
    yield srv
    srv.close()


@pytest.fixture
def slow_steps(small_srv, monkeypatch):
    """~5 ms per engine step, so a 240-token request is still running while the test acts on it."""
    eng = small_srv.serving.engine
    real = eng.step

    def step():
        time.sleep(0.005)
        return real()

    monkeypatch.setattr(eng, "step", step)


LONG = {"prompt": "Hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}


def test_overload_is_429_not_a_hang(small_srv, slow_steps):
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2, httpx.Client(timeout=10) as c3:
        with c1.stream("POST", f"{small_srv.url}/v1/completions", json=LONG) as r1, \
                c2.stream("POST", f"{small_srv.url}/v1/completions", json=LONG) as r2:
            assert r1.status_code == 200 and r2.status_code == 200  # one running, one queued
            t0 = time.monotonic()
            r3 = c3.post(f"{small_srv.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r3.status_code == 429 and time.monotonic() - t0 < 5
            assert r3.json()["error"]["type"] == "rate_limit_exceeded"
            assert sse_events(r1)[-1] == "[DONE]" and sse_events(r2)[-1] == "[DONE]"
    assert 'dspark_requests_total{status="rejected"} 1.0' in httpx.get(f"{small_srv.url}/metrics").text


def test_disconnect_mid_stream_frees_the_slot(small_srv, slow_steps):
    eng = small_srv.serving.engine
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{small_srv.url}/v1/completions", json=LONG) as r:
            # Keep the line iterator referenced: a dropped one closes the connection (a disconnect).
            lines = r.iter_lines()
            next(lines)  # generation has started
            assert eng.cache.num_free == 0
    end = time.monotonic() + 5
    while (eng.cache.num_free != eng.max_num_seqs or small_srv.serving.num_in_flight) and time.monotonic() < end:
        time.sleep(0.005)
    assert eng.cache.num_free == eng.max_num_seqs and small_srv.serving.num_in_flight == 0
    assert 'dspark_requests_total{status="abort"}' in httpx.get(f"{small_srv.url}/metrics").text
    # The slot is usable again.
    r = httpx.post(f"{small_srv.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_disconnect_of_a_non_streaming_request_frees_the_slot(small_srv, slow_steps):
    eng = small_srv.serving.engine
    body = {k: v for k, v in LONG.items() if k != "stream"}

    def finished(status: str) -> float:
        for line in httpx.get(f"{small_srv.url}/metrics").text.splitlines():
            if line.startswith(f'dspark_requests_total{{status="{status}"}}'):
                return float(line.split()[1])
        return 0.0

    before = finished("length"), finished("abort")
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes the connection) mid-generation
        httpx.post(f"{small_srv.url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    end = time.monotonic() + 5
    while (eng.cache.num_free != eng.max_num_seqs or small_srv.serving.num_in_flight) and time.monotonic() < end:
        time.sleep(0.005)
    assert eng.cache.num_free == eng.max_num_seqs and small_srv.serving.num_in_flight == 0
    # Freed before the 240 tokens (>= 1.2 s at 5 ms a step) could have finished: it was aborted.
    assert time.monotonic() - t0 < 1.1
    assert (finished("length"), finished("abort")) == (before[0], before[1] + 1)


def test_a_failing_request_does_not_take_the_loop_down(plain_srv, monkeypatch):
    eng = plain_srv.serving.engine
    real = eng._prefill

    def boom(chunks):
        if any(c.request.prompt_ids[:1] == eng.tokenizer.encode("Numbers")[:1] for c in chunks):
            raise RuntimeError("injected failure")
        return real(chunks)

    monkeypatch.setattr(eng, "_prefill", boom)
    r = httpx.post(f"{plain_srv.url}/v1/completions", json={"prompt": "Numbers 0", "max_tokens": 3}, timeout=30)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    ok = httpx.post(f"{plain_srv.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def _spawn(model: Path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dspark.cli", "serve", "--model", str(model), "--port", str(port),
                             "--threads", "1", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_drains_running_requests_then_exits(qwen3_ckpt):
    port = free_port()
    proc = _spawn(qwen3_ckpt.path, port, "--drafter", "none")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        body = dict(LONG, stream_options={"include_usage": True})
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(l[6:]) if l[6:] != "[DONE]" else "[DONE]" for l in lines if l.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 240  # finished in full, not cut off
        # uvicorn re-raises the captured SIGTERM once it has drained, so the exit status is "killed by
        # SIGTERM" (what process managers expect from a clean stop), reached only after the drain.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- load -----------------------------------------------------------------------------------------------

def _rss(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[1])
    raise AssertionError("no process_resident_memory_bytes in /metrics")


def test_load_32_streaming_clients_x4(qwen3_ckpt, ref, capsys):
    from dspark.server.loadtest import run_load

    prompts = PROMPTS + ["def add(a, b):\n    return a + b\ndef add(a, b):\n", "Hello world! Hello world! Hello"]
    want = {p: o.text for p, o in zip(prompts, ref.generate(prompts, SamplingParams(temperature=0, max_tokens=16)))}
    port = free_port()
    proc = _spawn(qwen3_ckpt.path, port, "--drafter", "ngram", "-g", "4", "--max-num-seqs", "8",
                  "--max-queue-len", "64")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        asyncio.run(run_load(url, prompts, clients=8, requests_per_client=1, max_tokens=16))  # warm-up
        rss0 = _rss(url)
        t0 = time.monotonic()
        report, results = asyncio.run(run_load(url, prompts, clients=32, requests_per_client=4, max_tokens=16))
        assert time.monotonic() - t0 < 120
        rss1 = _rss(url)
        assert report.statuses == {"200": 128}
        for r in results:
            assert r.done and r.text == want[r.prompt], r
        assert rss1 - rss0 < 64e6, (rss0, rss1)  # stable: no per-request growth
        with capsys.disabled():
            print(f"\n[load] {report.line()}; server RSS {rss0 / 1e6:.0f} -> {rss1 / 1e6:.0f} MB")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- fuzz -----------------------------------------------------------------------------------------------

def test_schemathesis_fuzz_finds_no_server_errors(spec_srv, tmp_path):
    """Valid and invalid bodies generated from the server's own OpenAPI schema (coverage + fuzzing
    phases, positive and negative mode): no 5xx on any of them."""
    import re

    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{spec_srv.url}/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "60", "--mode", "all", "--phases", "examples,coverage,fuzzing", "--seed", "1",
           "--no-color"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    generated = int(re.search(r"(\d+) generated", res.stdout).group(1))
    assert generated >= 200, res.stdout[-2000:]


def test_serving_loop_in_the_callers_thread(plain_srv):
    """loop_thread="caller": start() starts no thread; run_here steps the engine in the calling thread
    until asked to stop, serving requests submitted from another thread's event loop."""
    import asyncio
    import threading

    from dspark.engine import Engine
    from dspark.sampling import SamplingParams
    from dspark.server.metrics import ServerMetrics
    from dspark.server.serving import ServingEngine

    engine = Engine(plain_srv.serving.engine.target, max_num_seqs=2, max_model_len=64)  # not the server's
    serving = ServingEngine(engine, 4, ServerMetrics(), loop_thread="caller")
    serving.start()
    assert not serving._thread.is_alive()
    got, stepped = {}, set()
    real = engine.step

    def step():
        stepped.add(threading.current_thread().name)
        return real()

    def client():
        async def go():
            q = serving.submit_many(["caller-1"], [5, 6, 7], [SamplingParams(temperature=0, max_tokens=5)],
                                    asyncio.get_running_loop())
            while True:
                _, o = await q.get()
                if o.finished:
                    return o

        got["out"] = asyncio.run(go())

    engine.step = step
    try:
        t = threading.Thread(target=client)
        t.start()
        serving.run_here(until=lambda: not t.is_alive())
        t.join()
    finally:
        del engine.step
    assert got["out"].finish_reason == "length" and got["out"].metrics.num_tokens == 5
    assert stepped == {threading.current_thread().name}
    with pytest.raises(ValueError, match="loop_thread must be 'background' or 'caller'"):
        ServingEngine(engine, 4, ServerMetrics(), loop_thread="main")
