"""An engine shared by many concurrent clients: one thread steps it, asyncio callers stream its outputs.

The ``LLMEngine`` is not thread-safe, so only the engine thread touches it after start-up: callers
validate their request first (cheap, read-only), then hand adds and aborts to that thread through a
queue; outputs come back through each request's ``asyncio.Queue``. A request whose caller goes away
is aborted at the next step, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from kvtier.engine.llm_engine import LLMEngine, PromptInput
from kvtier.engine.metrics import engine_metrics
from kvtier.errors import KvtierError
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams


class EngineOverloadedError(KvtierError):
    """The waiting queue is full (``max_queue_len``); the client should retry later."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self._ops: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._metrics: dict[str, float] = engine_metrics(engine, with_waste=False)
        self._thread = threading.Thread(target=self._run, name="kvtier-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop ----------------------------------------------------------
    def validate(self, prompt: PromptInput, params: SamplingParams) -> list[int]:
        """Raise ``InvalidArgumentError`` for a bad request before anything is queued; return its token ids."""
        self.engine.check_params(params)
        return self.engine.tokenize_prompt(prompt)[1]

    async def generate(self, prompt: PromptInput, params: SamplingParams, request_id: str | None = None, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that moved it; the last one has ``finished``."""
        self.validate(prompt, params)
        if self.max_queue_len is not None and self._metrics["num_requests_waiting"] + self._ops.qsize() >= self.max_queue_len:
            raise EngineOverloadedError(f"max_queue_len: {self.max_queue_len} requests are already waiting")
        rid = request_id or f"req-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), outputs)
        self._submit(("add", rid, prompt, params, stream))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._submit(("abort", rid))

    def metrics(self) -> dict[str, float]:
        """The engine's counters as of its last step (read without touching the engine)."""
        return dict(self._metrics)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------
    def _submit(self, op: tuple) -> None:
        self._ops.put(op)
        self._wake.set()

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply_ops(self) -> None:
        while True:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                return
            if op[0] == "add":
                _, rid, prompt, params, stream = op
                try:
                    self.engine.add_request(prompt, params, rid, stream=stream)
                except Exception as e:  # validated already; anything here goes back to its caller only
                    self._deliver(rid, e)
            else:
                self.engine.abort_request(op[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_ops()
            if not self.engine.has_unfinished_requests():
                self._metrics = engine_metrics(self.engine, with_waste=False)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for out in self.engine.step():
                self._deliver(out.request_id, out)
            self._metrics = engine_metrics(self.engine, with_waste=False)
