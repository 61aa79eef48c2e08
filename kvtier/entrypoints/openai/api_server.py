"""``kvtier serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared engine.

Errors come back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for
invalid parameters (naming the parameter), 401 for a wrong API key, 404 for an unknown model, 503
when the waiting queue is over ``--max-queue-len``. Bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import kvtier
from kvtier.engine.async_engine import AsyncLLMEngine, EngineOverloadedError, RequestStream
from kvtier.entrypoints.openai import responses as R
from kvtier.entrypoints.openai.metrics import ServerMetrics
from kvtier.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from kvtier.errors import InvalidArgumentError
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; nobody reads it


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


class RequireAPIKey:
    """401 on ``/v1`` routes without ``Authorization: Bearer KEY``. Plain ASGI rather than ``BaseHTTPMiddleware``, so a
    route that watches for its client leaving reads the connection's own ``receive``, not a wrapper around it."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and dict(scope["headers"]).get(b"authorization") != self.expected:
            await error_response(401, "invalid API key", "authentication_error")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def gone() -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None, log_requests: bool = False,
              metric_names: str = "both") -> FastAPI:
    """The app; ``log_requests`` logs each request's arrival and end at INFO (vLLM's ``--enable-log-requests``)."""
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, engine, model_name, metric_names)
    tok = engine.engine.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="kvtier", version=kvtier.__version__, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        return error_response(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "not_found_error", "model")

    def bad_request(e: InvalidArgumentError) -> APIError:
        return APIError(400, str(e), "invalid_request_error", e.field)

    def start(rid: str, req: CompletionRequest | ChatCompletionRequest, prompts: list, params: SamplingParams) -> RequestStream:
        """Validate every prompt (including its room in the context), then queue one request per prompt.

        A bad or rejected request raises an ``APIError`` before anything is queued.
        """
        limit = engine.engine.max_model_len
        try:
            prompts = [engine.validate(p, params) for p in prompts]  # tokenized once, here
        except InvalidArgumentError as e:
            raise bad_request(e) from None
        for p in prompts:
            ids = p.prompt_token_ids
            if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
                raise APIError(400, f"{req.max_tokens_field}: this model's maximum context length is {limit} tokens. However, you requested "
                               f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} in the completion). "
                               "Please reduce the length of the prompt or completion.", "invalid_request_error", req.max_tokens_field)
        try:
            stream = engine.submit(prompts, params, [f"{rid}-{i}" for i in range(len(prompts))], req.stream)
        except InvalidArgumentError as e:
            raise bad_request(e) from None
        except EngineOverloadedError as e:
            raise APIError(503, str(e), "server_overloaded") from None
        if log_requests:
            logger.info("Received request %s: prompts: %r, params: %s", rid, prompts, params)
        return stream

    def settle(rid: str, stream: RequestStream) -> None:
        """The request group is over for its client: abort what has not finished, count it, log it. Idempotent."""
        if stream.closed:
            return
        aborted = stream.close()
        for request_id in aborted:
            metrics.forget(request_id)
        if log_requests:
            logger.info("%s request %s", "Aborted" if aborted else "Finished", rid)

    async def observed(rid: str, stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The stream's outputs with their latencies observed; leaving early aborts what has not finished."""
        try:
            async for i, out in stream:
                metrics.observe_output(out)
                yield i, out
        finally:
            settle(rid, stream)

    def streamed(rid: str, body: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
        # the background task runs even when the client left before the body started, so nothing is left running
        return StreamingResponse(body, media_type="text/event-stream", background=BackgroundTask(settle, rid, stream))

    async def finals(rid: str, stream: RequestStream, count: int, raw: Request) -> list[RequestOutput] | None:
        """Each prompt's finished output, or None when the client went away first (its requests are then aborted)."""

        async def collect() -> list[RequestOutput]:
            last: dict[int, RequestOutput] = {}
            async for i, out in observed(rid, stream):
                last[i] = out
            return [last[i] for i in range(count)]

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                settle(rid, stream)
        return work.result() if work.done() and not work.cancelled() else None

    def sampling(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.to_sampling_params()
        except InvalidArgumentError as e:
            raise bad_request(e) from None

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/version")
    async def version():
        return {"version": kvtier.__version__}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "kvtier", "max_model_len": engine.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "invalid_request_error", "prompt")
        if req.messages is not None:
            try:
                text = tok.apply_chat_template([m.model_dump() for m in req.messages], req.add_generation_prompt)
            except InvalidArgumentError as e:
                raise bad_request(e) from None
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < engine.engine.model_config.vocab_size]
        if bad:
            raise APIError(400, f"tokens: ids must be in [0, {engine.engine.model_config.vocab_size}), got {bad[0]}", "invalid_request_error", "tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        params = sampling(req)
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt: must not be empty", "invalid_request_error", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = start(rid, req, prompts, params)
        if not req.stream:
            outs = await finals(rid, stream, len(prompts), raw)
            return gone() if outs is None else R.completion_body(rid, model_name, tok, outs, req.n, req.echo)
        return streamed(rid, stream_completion(rid, req, params, stream), stream)

    async def stream_completion(rid: str, req: CompletionRequest, params: SamplingParams, stream: RequestStream) -> AsyncIterator[str]:
        head = R.base("text_completion", rid, model_name)
        sent: dict[tuple[int, int], tuple[int, int, bool]] = {}
        echoed: set[tuple[int, int]] = set()
        prompt_tokens = completion_tokens = 0
        async for i, out in observed(rid, stream):
            for c, delta, first_new in R.stream_deltas(out, sent, i, params.stop):
                prefix = ""
                if req.echo and first_new == 0 and (i, c.index) not in echoed:
                    echoed.add((i, c.index))
                    prefix = out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids)
                lp = R.completion_logprobs(tok, c, start=first_new) if c.logprobs is not None else None
                choice = {"index": i * req.n + c.index, "text": prefix + delta, "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                yield R.sse({**head, "choices": [choice]})
            if out.finished:
                prompt_tokens += len(out.prompt_token_ids)
                completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        if req.stream_options and req.stream_options.include_usage:
            yield R.sse({**head, "choices": [], "usage": R.usage(prompt_tokens, completion_tokens)})
        yield R.sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        params = sampling(req)
        try:
            text = tok.apply_chat_template([m.model_dump() for m in req.messages], req.add_generation_prompt)
        except InvalidArgumentError as e:
            raise bad_request(e) from None
        prompt = {"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text}
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = start(rid, req, [prompt], params)
        top = req.top_logprobs or 0
        if not req.stream:
            outs = await finals(rid, stream, 1, raw)
            return gone() if outs is None else R.chat_body(rid, model_name, tok, outs[0], top)
        return streamed(rid, stream_chat(rid, req, params, stream, top), stream)

    async def stream_chat(rid: str, req: ChatCompletionRequest, params: SamplingParams, stream: RequestStream, top: int) -> AsyncIterator[str]:
        head = R.base("chat.completion.chunk", rid, model_name)
        for i in range(req.n):
            yield R.sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        sent: dict[tuple[int, int], tuple[int, int, bool]] = {}
        last = None
        async for _, out in observed(rid, stream):
            last = out
            for c, delta, first_new in R.stream_deltas(out, sent, 0, params.stop):
                lp = R.chat_logprobs(tok, c, top, start=first_new) if c.logprobs is not None else None
                choice = {"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                yield R.sse({**head, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage and last is not None:
            yield R.sse({**head, "choices": [], "usage": R.usage(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs))})
        yield R.sse("[DONE]")

    return app



class GracefulServer(uvicorn.Server):
    """uvicorn's server, plus the engine's side of a graceful shutdown: ``grace`` s after SIGTERM/SIGINT every
    request still running is aborted, so its stream ends with ``finish_reason`` "abort" and its connection closes."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace: float) -> None:
        super().__init__(config)
        self.engine, self.grace = engine, grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.grace, self.engine.abort_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def run_server(engine_args, host: str, port: int, model_name: str | None, api_key: str | None, max_queue_len: int | None, shutdown_timeout: float,
               log_level: str = "info", log_requests: bool = False, metric_names: str = "both") -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, let in-flight requests finish for ``shutdown_timeout`` s, abort the rest."""
    logging.basicConfig(format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    logging.getLogger("kvtier").setLevel("DEBUG" if log_level == "trace" else log_level.upper())
    engine = AsyncLLMEngine.from_engine_args(engine_args, max_queue_len)
    app = build_app(engine, model_name or engine_args.model, api_key, log_requests, metric_names)
    # uvicorn re-raises the signal to the handler it found after shutting down: make that a no-op so a requested shutdown exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # uvicorn's own deadline comes after the engine has aborted what was left, so it has nothing to cancel
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_requests, timeout_graceful_shutdown=shutdown_timeout + 5)
    GracefulServer(config, engine, shutdown_timeout).run()
