"""``kvtier serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared engine.

Errors come back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for
invalid parameters (naming the parameter), 401 for a wrong API key, 404 for an unknown model, 503
when the waiting queue is over ``--max-queue-len``. Bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvtier
from kvtier.engine.async_engine import AsyncLLMEngine, EngineOverloadedError
from kvtier.entrypoints.openai import responses as R
from kvtier.entrypoints.openai.metrics import ServerMetrics
from kvtier.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from kvtier.errors import InvalidArgumentError
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, engine, model_name)
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

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return error_response(401, "invalid API key", "authentication_error")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "not_found_error", "model")

    async def first_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        """Start a request; errors raised at submission (validation, overload) surface here as API errors."""
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except InvalidArgumentError as e:
            raise APIError(400, str(e), "invalid_request_error", e.field) from None
        except EngineOverloadedError as e:
            raise APIError(503, str(e), "server_overloaded") from None

    async def start(prompts: list, params: SamplingParams, stream: bool) -> list[tuple[RequestOutput | None, AsyncIterator[RequestOutput]]]:
        for p in prompts:  # validate all before starting any
            try:
                engine.validate(p, params)
            except InvalidArgumentError as e:
                raise APIError(400, str(e), "invalid_request_error", e.field) from None
        streams = [engine.generate(p, params, stream=stream) for p in prompts]
        firsts = []
        try:
            for s in streams:
                firsts.append(await first_output(s))
        except APIError:
            for s in streams:
                await s.aclose()
            raise
        return list(zip(firsts, streams))

    async def final(first: RequestOutput | None, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        last = first
        async for out in stream:
            last = out
        metrics.observe_finished(last)
        return last

    def sampling(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.to_sampling_params()
        except InvalidArgumentError as e:
            raise APIError(400, str(e), "invalid_request_error", e.field) from None

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/version")
    async def version():
        return {"version": kvtier.__version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kvtier", "max_model_len": engine.engine.max_model_len}]}

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
                raise APIError(400, str(e), "invalid_request_error", e.field) from None
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
        started = await start(prompts, params, req.stream)
        if not req.stream:
            outs = [await final(f, s) for f, s in started]
            return R.completion_body(rid, model_name, tok, outs, req.n, req.echo)
        return StreamingResponse(stream_completion(rid, req, params, started), media_type="text/event-stream")

    async def stream_completion(rid: str, req: CompletionRequest, params: SamplingParams, started) -> AsyncIterator[str]:
        head = R.base("text_completion", rid, model_name)
        sent: dict[tuple[int, int], tuple[int, int, bool]] = {}
        echoed: set[tuple[int, int]] = set()
        prompt_tokens = completion_tokens = 0
        async for i, out in merged(started):
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

    async def merged(started) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several requests as they come, tagged with the prompt index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, first: RequestOutput | None, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                if first is not None:
                    await queue.put((i, first))
                async for out in stream:
                    await queue.put((i, out))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(started)]
        open_streams = len(tasks)
        seen: set[str] = set()
        try:
            while open_streams:
                i, out = await queue.get()
                if out is None:
                    open_streams -= 1
                    continue
                seen.add(out.request_id)
                metrics.observe_output(out)
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            for _, s in started:
                await s.aclose()
            for rid in seen:
                metrics.forget(rid)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        params = sampling(req)
        try:
            text = tok.apply_chat_template([m.model_dump() for m in req.messages], req.add_generation_prompt)
        except InvalidArgumentError as e:
            raise APIError(400, str(e), "invalid_request_error", e.field) from None
        prompt = {"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text}
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        started = await start([prompt], params, req.stream)
        top = req.top_logprobs or 0
        if not req.stream:
            return R.chat_body(rid, model_name, tok, await final(*started[0]), top)
        return StreamingResponse(stream_chat(rid, req, params, started, top), media_type="text/event-stream")

    async def stream_chat(rid: str, req: ChatCompletionRequest, params: SamplingParams, started, top: int) -> AsyncIterator[str]:
        head = R.base("chat.completion.chunk", rid, model_name)
        for i in range(req.n):
            yield R.sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        sent: dict[tuple[int, int], tuple[int, int, bool]] = {}
        last = None
        async for _, out in merged(started):
            last = out
            for c, delta, first_new in R.stream_deltas(out, sent, 0, params.stop):
                lp = R.chat_logprobs(tok, c, top, start=first_new) if c.logprobs is not None else None
                choice = {"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                yield R.sse({**head, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage and last is not None:
            yield R.sse({**head, "choices": [], "usage": R.usage(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs))})
        yield R.sse("[DONE]")

    return app



def run_server(engine_args, host: str, port: int, model_name: str | None, api_key: str | None, max_queue_len: int | None, shutdown_timeout: float) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, let in-flight requests finish for ``shutdown_timeout`` s, abort the rest."""
    import uvicorn

    from kvtier.engine.llm_engine import LLMEngine

    engine = AsyncLLMEngine(LLMEngine(engine_args), max_queue_len)
    app = build_app(engine, model_name or engine_args.model, api_key)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found:
    # make that a no-op so a requested shutdown exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
