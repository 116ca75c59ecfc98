"""`dspark serve`: an OpenAI-compatible HTTP server over the DSpark engine (FastAPI + uvicorn).

    dspark serve                                   # the default model and its drafter, 127.0.0.1:8000
    dspark serve --model DIR --drafter ngram --port 8001 --policy static --max-num-seqs 8
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0}'

Endpoints: POST /v1/chat/completions (the model's chat template), POST /v1/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus text). Streaming (`"stream": true`) sends
OpenAI's SSE chunks, then `data: [DONE]`. Beyond --max-num-seqs running and --max-queue-len waiting
requests the server answers 429; bad input is a 400 naming the field; SIGTERM stops accepting
connections, lets the requests in flight finish, then exits.
"""

from __future__ import annotations

import argparse
import signal
import threading

from dspark.config import POLICY_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dspark.bundled import DRAFTER_HELP, MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--drafter", default=None, help=DRAFTER_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--policy", default="static", help=POLICY_HELP + " (default: static)")
    p.add_argument("--reprofile", action="store_true",
                   help="measure the target's step-cost table again instead of reading the cached one")
    p.add_argument("-g", "--num-speculative-tokens", type=int, default=None, help="γ (default: the drafter's block)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-queue-len", type=int, default=64,
                   help="requests that may wait for a slot; beyond, 429 (default: 64)")
    p.add_argument("--max-model-len", type=int, default=None, help="context per request (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step, prefill chunks included (default: 512)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default: float32 compute on CPU)")
    from dspark.config import add_runtime_arguments

    add_runtime_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight (default: 30)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")


def build_from_args(args: argparse.Namespace, loop_thread: str = "background"):
    """(FastAPI app, ServingEngine) from parsed `dspark serve` arguments (`loop_thread`: see ServingEngine)."""
    from dspark.engine import LLM
    from dspark.server.app import build_app
    from dspark.server.metrics import ServerMetrics
    from dspark.server.serving import ServingEngine

    drafter = "auto" if args.drafter is None else args.drafter
    if drafter.lower() in ("none", "vanilla", "plain"):
        drafter = None
    llm = LLM(model=args.model, drafter=drafter, dtype=args.dtype, cpu_gemm=getattr(args, "cpu_gemm", "auto"),
              attention=getattr(args, "attention", "auto"), kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
              max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, num_speculative_tokens=args.num_speculative_tokens,
              policy=args.policy, reprofile=getattr(args, "reprofile", False),
              max_num_batched_tokens=args.max_num_batched_tokens)
    if llm.model_note:
        print(f"note: {llm.model_note}", flush=True)
    name = args.served_model_name or llm.model_path.stem if llm.model_path.suffix == ".gguf" else \
        args.served_model_name or llm.model_path.name
    serving = ServingEngine(llm.engine, args.max_queue_len, ServerMetrics(), loop_thread=loop_thread)
    app = build_app(serving, name, llm.drafter.name if llm.drafter is not None else None, args.drain_timeout)
    return app, serving


def run(args: argparse.Namespace) -> int:
    import torch
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        from dspark.errors import DSparkError
        raise DSparkError(f"dspark serve needs the serve extra ({e.name} is missing): "
                          "pip install -e '.[serve]'") from None

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # process-wide, once, here at start-up
    # The engine steps on this thread, the one that loaded the model (its kernels' OpenMP teams run
    # fastest there: ServingEngine.run_here); uvicorn serves HTTP on another.
    app, serving = build_from_args(args, loop_thread="caller")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout))
    http = threading.Thread(target=server.run, name="dspark-http", daemon=True)
    signals = {"n": 0}

    def on_signal(signum, frame):  # the first SIGINT / SIGTERM drains (as uvicorn does), a second forces
        signals["n"] += 1
        if signals["n"] == 1:
            server.should_exit = True
        else:
            server.force_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http.start()
    print(f"dspark serve: listening on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    # Until the server has drained (its lifespan's shutdown stops this loop) or failed to start.
    serving.run_here(until=lambda: not http.is_alive())
    http.join(timeout=args.drain_timeout + 10)
    return 0 if server.started else 1
