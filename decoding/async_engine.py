"""The engine on its own thread, fed and drained from asyncio: what the HTTP server talks to."""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from .config import EngineConfig
from .engine import LLMEngine
from .observe import Clock, StepObserver
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .structured_output import StructuredOutputsParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later (HTTP 503)."""


class EngineRequestError(RuntimeError):
    """The engine failed this request (HTTP 500); other requests are unaffected."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, *, clock: Clock = time.perf_counter, observers: Seq[StepObserver] = ()):
        """Build the engine (`LLMEngine(config, clock=clock, observers=observers)`) on its own thread and wait
        until it is ready (its errors are raised here).

        Every torch call happens on that one thread, loading included. On CPU, a second thread that has run
        OpenMP work (here: building the engine) keeps its own OpenMP team; with more OpenMP threads than cores,
        GNU OpenMP stops spinning between parallel regions and every operation pays a wake-up: measured on 2
        cores, steps 1.4-1.7x slower than the same engine built and run on one thread.
        """
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        ready: queue.SimpleQueue = queue.SimpleQueue()
        build = functools.partial(LLMEngine, config, clock=clock, observers=observers)
        self._thread = threading.Thread(target=self._run, args=(build, ready), name="leapserve-engine", daemon=True)
        self._thread.start()
        built = ready.get()
        if isinstance(built, BaseException):
            self._thread.join()
            raise built
        self.engine: LLMEngine = built
        self.tokenizer = self.engine.tokenizer
        self.served_model_name = self.engine.served_model_name
        self.max_model_len = self.engine.max_model_len

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate_prompt(prompt_token_ids, params)

    def compile_grammar(self, spec: StructuredOutputsParams) -> object:
        """`LLMEngine.compile_grammar`, from any thread."""
        return self.engine.compile_grammar(spec)

    def stats(self) -> EngineStats:
        sched = self.engine.scheduler
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting) + self._commands.qsize(),
            kv_cache_usage=self.engine.cache.usage,
            num_preemptions=sched.num_preemptions,
        )

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Submit a request and yield its cumulative outputs; stopping the iteration aborts it."""
        self.validate_prompt(prompt_token_ids, params)
        if self.stats().num_waiting >= self.engine.config.scheduler.max_waiting_requests:
            raise QueueFullError("too many requests are waiting; retry later")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", request_id, prompt_token_ids, params, prompt))
        finished = False
        try:
            while True:
                out: RequestOutput = await outputs.get()
                if out.error is not None:
                    finished = True
                    raise EngineRequestError(out.error)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)

    def _publish(self, *outs: RequestOutput) -> None:
        """Hand outputs to their streams: one wake-up per event loop for the whole step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                loop, q = stream
                by_loop.setdefault(loop, []).append((q, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _handle(self, command: tuple) -> None:
        kind, *args = command
        if kind == "add":
            request_id, prompt_token_ids, params, prompt = args
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, prompt)
            except Exception as e:
                logger.exception("could not add request %s", request_id)
                self._publish(
                    RequestOutput(request_id, prompt, prompt_token_ids, [], True, error=f"{type(e).__name__}: {e}")
                )
        elif kind == "abort":
            self.engine.abort(args[0])

    def _run(self, build: Callable[[], LLMEngine], ready: queue.SimpleQueue) -> None:
        try:
            self.engine = build()
        except BaseException as e:  # handed to the constructor, which raises it
            ready.put(e)
            return
        ready.put(self.engine)
        self._loop()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                block = not self.engine.has_unfinished()
                while True:
                    try:
                        command = self._commands.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    self._handle(command)
                    block = False
                self._publish(*(req.output() for req in self.engine.step()))
            except Exception:  # a bug outside any one request: fail everything in flight, keep the loop alive
                logger.exception("engine loop error")
                for request_id in list(self.engine.requests):
                    aborted = self.engine.abort(request_id)
                    if aborted is not None:
                        self._publish(
                            RequestOutput(
                                request_id,
                                aborted.prompt,
                                aborted.prompt_token_ids,
                                [],
                                True,
                                error="internal engine error",
                            )
                        )


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
