"""An engine shared by many concurrent clients: one thread steps it, asyncio callers stream its outputs.

The ``LLMEngine`` is not thread-safe, so only the engine thread touches it after start-up: callers
validate their request first (cheap, read-only), then hand adds and aborts to that thread through a
queue; outputs come back through each ``RequestStream``'s ``asyncio.Queue``. A request whose caller
goes away is aborted at the next step, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable

from kvtier.config import EngineArgs
from kvtier.engine.input_processor import EngineInput, PromptInput
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.metrics import engine_metrics
from kvtier.errors import KvtierError
from kvtier.outputs import RequestOutput
from kvtier.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(KvtierError):
    """The waiting queue is full (``max_queue_len``); the client should retry later."""


class RequestStream:
    """The outputs of a group of requests (one per prompt) as ``(prompt index, output)``, in the order they come.

    A plain async iterator fed by one queue, not an async generator: closing it is synchronous and
    safe from any task, so a client that goes away cannot race a consumer still inside it.
    """

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished or self.closed:
            raise StopAsyncIteration
        i, out = await self.queue.get()
        if isinstance(out, BaseException):
            self.close()
            raise out
        if out.finished:
            self.unfinished.discard(self.request_ids[i])
        return i, out

    def close(self) -> list[str]:
        """Abort what has not finished (at the engine's next step); return those request ids. Idempotent."""
        if self.closed:
            return []
        self.closed = True
        return self.engine.release(self)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_queue_len: int | None = None) -> None:
        """``engine``, or a function that builds it: then the engine thread builds it (see ``from_engine_args``) and
        this returns once it is ready, raising what building raised."""
        self.max_queue_len = max_queue_len
        self._ops: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._metrics: dict[str, float] = {}
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        self._thread = threading.Thread(target=self._run, args=(build,), name="kvtier-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, max_queue_len: int | None = None) -> AsyncLLMEngine:
        """Build the engine on the thread that will step it, as a server should.

        All of torch's parallel work then comes from one OS thread. Each thread that starts OpenMP regions gets its own
        team of workers: with the loading thread's team still alive beside the stepping thread's, libgomp counts more
        workers than cores and parks them after every region, and a decode step of a few sequences took 1.6x as long
        (16.5 vs 10.4 ms on 2 cores for the reference Llama, one request).
        """
        return cls(lambda: LLMEngine(engine_args), max_queue_len)

    # ---- called from the event loop ----------------------------------------------------------
    def validate(self, prompt: PromptInput | EngineInput, params: SamplingParams) -> EngineInput:
        """Raise ``InvalidArgumentError`` for a bad request before anything is queued; return it checked and tokenized.

        The result is what ``submit`` takes and hands on as it is, so a text prompt is tokenized once, here.
        """
        return self.engine.inputs.process(prompt, params)

    def submit(self, prompts: list[PromptInput | EngineInput], params: SamplingParams, request_ids: list[str] | None = None,
               stream: bool = True) -> RequestStream:
        """Queue one request per prompt and return their outputs' stream; bad input or a full queue raises first, queuing nothing."""
        prompts = [self.validate(p, params) for p in prompts]
        if self.max_queue_len is not None and self._metrics["num_requests_waiting"] + self._ops.qsize() + len(prompts) > self.max_queue_len:
            raise EngineOverloadedError(f"max_queue_len: {self.max_queue_len} requests are already waiting")
        rids = request_ids or [f"req-{next(self._ids)}" for _ in prompts]
        out = RequestStream(self, rids)
        loop = asyncio.get_running_loop()
        for i, (rid, p) in enumerate(zip(rids, prompts)):
            self._streams[rid] = (loop, out.queue, i)
            self._submit(("add", rid, p, params, stream))
        return out

    def release(self, stream: RequestStream) -> list[str]:
        """Stop delivering to ``stream`` and abort its unfinished requests at the next step; return their ids."""
        for rid in stream.request_ids:
            self._streams.pop(rid, None)
        aborted = sorted(stream.unfinished)
        for rid in aborted:
            self._submit(("abort", rid))
        if aborted:
            logger.debug("aborted %s: its caller went away", ", ".join(aborted))
        return aborted

    def metrics(self) -> dict[str, float]:
        """The engine's counters as of its last step (read without touching the engine)."""
        return dict(self._metrics)

    def abort_all(self) -> None:
        """End every request at the next step; each stream gets a last output with ``finish_reason`` "abort"."""
        self._submit(("abort_all",))

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
            loop, q, index = target
            loop.call_soon_threadsafe(q.put_nowait, (index, item))

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
            elif op[0] == "abort":
                self.engine.abort_request(op[1])
            else:
                for rid in list(self.engine.requests):
                    self._deliver(rid, self.engine.abort_request(rid))

    def _run(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
            self._metrics = engine_metrics(self.engine, with_waste=False)
        except BaseException as e:  # handed to the constructor, which raises it in the caller's thread
            self._build_error = e
            return
        finally:
            self._ready.set()
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
