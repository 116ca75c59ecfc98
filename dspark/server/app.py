"""The FastAPI application: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus
/health and /metrics, over a `ServingEngine`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.engine import StepOutput
from dspark.errors import DSparkError
from dspark.sampling import SamplingParams, SamplingParamsError
from dspark.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from dspark.server.serving import Overloaded, ServingEngine

# OpenAI's default for /v1/completions; chat requests default to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param), status_code=status)


@dataclass
class _Choice:
    text: str = ""
    token_ids: int = 0
    finish_reason: str | None = None
    rounds: int = 0
    accepted_drafts: int = 0
    verified_drafts: int = 0


def build_app(serving: ServingEngine, model_name: str, drafter_name: str | None = None,
              drain_timeout_s: float = 30.0) -> FastAPI:
    engine = serving.engine
    tokenizer = engine.tokenizer
    max_len = engine.max_model_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.start()
        yield
        # uvicorn has stopped accepting connections and waited for the open ones (SIGTERM drains):
        # finish whatever is still in flight, then stop the engine thread.
        await asyncio.to_thread(serving.shutdown, drain_timeout_s)

    app = FastAPI(title="DSpark", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over DSpark's lossless speculative decoding engine.")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}")
        return _error(400, f"{param or 'body'}: {msg}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), type_="invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.type)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": engine.last_step.num_running, "in_flight": serving.num_in_flight}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "dspark",
                                            "max_model_len": max_len, "drafter": drafter_name}]}

    def _params(body, prompt_len: int, default_max: int | None, max_tokens: int | None) -> list[SamplingParams]:
        room = max_len - prompt_len
        if room < 1:
            raise APIError(400, f"prompt has {prompt_len} tokens; the model's context is {max_len} tokens, which "
                                "must also leave room for at least one generated token", "messages"
                           if isinstance(body, ChatCompletionRequest) else "prompt")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the model's "
                                f"context of {max_len} tokens (at most {room} here)", "max_tokens")
        mt = max_tokens or min(default_max or room, room)
        out = []
        for i in range(body.n):
            try:
                out.append(SamplingParams(
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, max_tokens=mt,
                    stop=body.stop, seed=None if body.seed is None else body.seed + i, ignore_eos=body.ignore_eos))
            except SamplingParamsError as e:
                field = str(e).split("=", 1)[0].removeprefix("SamplingParams.")
                raise APIError(400, str(e), field) from None
        return out

    async def _generate(request: Request, body, prompt_ids: list[int], max_tokens: int | None,
                        default_max: int | None, chat: bool):
        params = _params(body, len(prompt_ids), default_max, max_tokens)
        base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        rids = [f"{base}-{i}" for i in range(body.n)]
        loop = asyncio.get_running_loop()
        try:
            queue = serving.submit_many(rids, prompt_ids, params, loop)
        except Overloaded as e:
            serving.metrics.requests.labels("rejected").inc()
            raise APIError(429, str(e), type_="rate_limit_exceeded") from None
        except DSparkError as e:
            raise APIError(400, str(e), "prompt") from None
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(request, queue, rids, base, created, len(prompt_ids), chat,
                                             include_usage), media_type="text/event-stream")
        return await _complete(request, queue, rids, base, created, len(prompt_ids), chat)

    def _usage(prompt_len: int, choices: list[_Choice]) -> dict:
        completion = sum(c.token_ids for c in choices)
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}

    def _spec(choices: list[_Choice]) -> dict | None:
        if drafter_name is None:
            return None
        rounds = sum(c.rounds for c in choices)
        acc = sum(c.accepted_drafts for c in choices)
        return {"drafter": drafter_name, "rounds": rounds, "accepted_drafts": acc,
                "verified_drafts": sum(c.verified_drafts for c in choices),
                "accepted_length": (acc + rounds) / rounds if rounds else None}

    def _absorb(c: _Choice, o: StepOutput) -> None:
        c.text += o.text_delta
        c.token_ids += len(o.new_token_ids)
        c.finish_reason = o.finish_reason
        c.rounds, c.accepted_drafts = o.metrics.rounds, o.metrics.accepted_drafts
        c.verified_drafts = o.metrics.verified_drafts

    async def _complete(request: Request, queue: asyncio.Queue, rids: list[str], base: str, created: int,
                        prompt_len: int, chat: bool) -> dict:
        choices = [_Choice() for _ in rids]
        left = len(rids)
        # The body has been read, so the next ASGI message is the client hanging up: abort then.
        gone = asyncio.Event()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()
            for rid in rids:
                serving.abort(rid)

        watcher = asyncio.create_task(watch())
        try:
            while left:
                got = asyncio.ensure_future(queue.get())
                waiter = asyncio.ensure_future(gone.wait())
                done, _ = await asyncio.wait({got, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if got not in done:
                    got.cancel()
                    raise asyncio.CancelledError  # nobody is listening any more
                waiter.cancel()
                idx, o = got.result()
                if o.finish_reason == "error":
                    raise APIError(500, f"generation failed: {o.error}", type_="server_error")
                _absorb(choices[idx], o)
                left -= o.finished
        finally:
            watcher.cancel()
            if left:
                for rid in rids:
                    serving.abort(rid)
        if chat:
            out_choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                            "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(choices)]
        else:
            out_choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                           for i, c in enumerate(choices)]
        resp = {"id": base, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": out_choices, "usage": _usage(prompt_len, choices)}
        if (spec := _spec(choices)) is not None:
            resp["dspark"] = spec  # speculative stats; OpenAI clients ignore unknown fields
        return resp

    async def _stream(request: Request, queue: asyncio.Queue, rids: list[str], base: str, created: int,
                      prompt_len: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        choices = [_Choice() for _ in rids]
        left = len(rids)

        def chunk(choice_list: list, usage: dict | None = None, extra: dict | None = None) -> str:
            body = {"id": base, "object": obj, "created": created, "model": model_name, "choices": choice_list}
            if usage is not None:
                body["usage"] = usage
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(len(rids))])
            while left:
                idx, o = await queue.get()
                if o.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(f'generation failed: {o.error}', 'server_error'))}\n\n"
                    break
                _absorb(choices[idx], o)
                left -= o.finished
                reason = o.finish_reason
                if chat:
                    piece = {"index": idx, "delta": {"content": o.text_delta} if o.text_delta else {},
                             "finish_reason": reason, "logprobs": None}
                else:
                    piece = {"index": idx, "text": o.text_delta, "finish_reason": reason, "logprobs": None}
                if o.text_delta or reason is not None:
                    yield chunk([piece])
            if include_usage and not left:
                spec = _spec(choices)
                yield chunk([], _usage(prompt_len, choices), {"dspark": spec} if spec else None)
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client went away (or the stream failed): free the slots now
                for rid in rids:
                    serving.abort(rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not tokenizer.has_chat_template:
            raise APIError(400, f"model {model_name} has no chat template; use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        except DSparkError as e:
            raise APIError(400, str(e), "messages") from None
        ids = tokenizer.encode(text)
        return await _generate(request, body, ids, body.max_completion_tokens or body.max_tokens, None, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            ids = tokenizer.encode(body.prompt)
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", "prompt")
        else:
            ids = list(body.prompt)
            bad = [t for t in ids if not 0 <= t < engine.target.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"[0, {engine.target.vocab_size})", "prompt")
        return await _generate(request, body, ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, chat=False)

    return app
