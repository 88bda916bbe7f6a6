"""The OpenAI-compatible HTTP API over `AsyncLLMEngine`: completions, chat completions, models, health, metrics.

The engine runs on its own thread; uvicorn's event loop runs the handlers, which submit requests with
`engine.generate(...)` and stream its cumulative outputs back as JSON or server-sent events. A client that
goes away closes the engine's generator, which aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from leapserve.decoding.async_engine import AsyncLLMEngine, QueueFullError
from leapserve.decoding.config import EngineConfig
from leapserve.decoding.outputs import CompletionOutput, Logprob, RequestOutput
from leapserve.decoding.sampling_params import InvalidRequestError, LogitsProcessor, SamplingParams

from .errors import APIError, as_api_error, install_exception_handlers
from .metrics import ServerMetrics
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, CompletionResponse, DeltaMessage, ModelCard, ModelList, TopLogprob,
                       UsageInfo, random_id)

T = TypeVar("T")
Outputs = AsyncIterator[tuple[int, RequestOutput]]  # engine outputs tagged with their prompt's index
StreamEvents = Callable[[Outputs], AsyncIterator[str]]
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer


# ---------------------------------------------------------------- async helpers


async def merge_async_iterators(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they arrive, tagged with the iterator's index.

    The first exception ends the merge; leaving the merge (exception, close, cancellation) closes every iterator.
    """
    queue: asyncio.Queue[tuple[int, T | Exception | None]] = asyncio.Queue()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async with aclosing(iterator):
                async for item in iterator:
                    queue.put_nowait((index, item))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await `work`, cancelling it if the client disconnects first; returns (completed, result)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left (or this handler is being cancelled): stop the work
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


# ---------------------------------------------------------------- output formatting


def _rank(lp: Logprob) -> int:
    return lp.rank


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]],
                        text_offset: int) -> CompletionLogprobs:
    """The legacy completions format; `text_offset` is where the first token's text starts."""
    out = CompletionLogprobs()
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries[token_id]
        out.tokens.append(sampled.decoded_token)
        out.token_logprobs.append(sampled.logprob)
        out.top_logprobs.append({lp.decoded_token: lp.logprob for lp in sorted(entries.values(), key=_rank)})
        out.text_offset.append(text_offset)
        text_offset += len(sampled.decoded_token)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    """The chat format: each sampled token with the k most likely ones (byte values included)."""
    def top(lp: Logprob) -> TopLogprob:
        return TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode()))

    content = []
    for token_id, entries in zip(token_ids, logprobs):
        top_k = sorted((lp for lp in entries.values() if lp.rank <= k), key=_rank)
        content.append(ChatTokenLogprob(**top(entries[token_id]).model_dump(), top_logprobs=[top(lp) for lp in top_k]))
    return ChatLogprobs(content=content)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ChoiceDelta:
    """What one choice gained since the previous chunk."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int  # where the first new token's text starts (the previous tokens' texts, summed)
    finish_reason: str | None


class ChoiceTracker:
    """Turns one choice's cumulative outputs into deltas."""

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0
        self.tokens_text_len = 0
        self.finished = False

    def advance(self, output: CompletionOutput) -> ChoiceDelta | None:
        if self.finished:
            return None
        new_ids = output.token_ids[self.num_tokens:]
        new_logprobs = None if output.logprobs is None else output.logprobs[self.num_tokens:]
        delta = ChoiceDelta(text=output.text[self.text_len:], token_ids=new_ids, logprobs=new_logprobs,
                            text_offset=self.tokens_text_len, finish_reason=output.finish_reason)
        self.text_len, self.num_tokens = len(output.text), len(output.token_ids)
        if new_logprobs is not None:
            self.tokens_text_len += sum(len(entries[t].decoded_token) for t, entries in zip(new_ids, new_logprobs))
        self.finished = output.finish_reason is not None
        if not (delta.text or delta.token_ids or delta.finish_reason):
            return None
        return delta


def usage(prompt_lens: Iterable[int], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(prompt_lens)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


# ---------------------------------------------------------------- the API


class APIKeyMiddleware:
    """Bearer-token auth on /v1/* (plain ASGI, so streaming and disconnect detection are untouched)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIServing:
    """The request handlers, bound to one engine."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, logits_processors: Sequence[LogitsProcessor]):
        self.engine = engine
        self.metrics = metrics
        self.logits_processors = list(logits_processors)
        self.model_name = engine.served_model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.max_model_len)])

    def _prepare(self, params: SamplingParams, prompts: list[list[int]]) -> SamplingParams:
        params.logits_processors.extend(self.logits_processors)
        for prompt_ids in prompts:
            self.engine.validate_prompt(prompt_ids, params)
        return params

    async def _generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                        prompt: str | None) -> AsyncIterator[RequestOutput]:
        """`engine.generate` with metrics; closing this generator closes the engine's (which aborts the request)."""
        observer = self.metrics.observer()
        finished = False
        try:
            async with aclosing(self.engine.generate(prompt_ids, params, request_id, prompt=prompt)) as outputs:
                async for output in outputs:
                    observer.on_output(output)
                    finished = output.finished
                    yield output
        except (InvalidRequestError, QueueFullError):
            raise  # refused at submission: it never ran
        except Exception:
            observer.on_failure()
            raise
        except BaseException:  # cancelled or closed: the client went away
            if not finished:
                observer.on_abort(params.n)
            raise

    def _submit(self, request_id: str, prompts: list[list[int]], texts: list[str | None],
                params: SamplingParams) -> Outputs:
        """Every prompt as its own engine request; outputs tagged with the prompt's index."""
        return merge_async_iterators([self._generate(ids, params, f"{request_id}-{i}", text)
                                      for i, (ids, text) in enumerate(zip(prompts, texts))])

    async def _respond(self, http_request: Request, outputs: Outputs, num_prompts: int, stream: bool,
                       build: Callable[[list[RequestOutput]], BaseModel], stream_events: StreamEvents) -> Response:
        """Run a request to its end (JSON), or to its first output and then as server-sent events.

        `build` turns each prompt's final output into the response; `stream_events` turns the outputs into events.
        A client that disconnects first gets nothing, and its engine requests are aborted.
        """
        if not stream:
            async def collect() -> list[RequestOutput]:
                finals: dict[int, RequestOutput] = {}
                async for index, output in outputs:
                    finals[index] = output
                return [finals[i] for i in range(num_prompts)]

            completed, finals = await unless_disconnected(http_request, collect())
            if not completed:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return Response(build(finals).model_dump_json(), media_type="application/json")
        # Refusals at submission (queue full, invalid request) raise here, while an error status can still be sent.
        completed, first = await unless_disconnected(http_request, anext(outputs))
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return StreamingResponse(_sse_stream(stream_events(_chain(first, outputs)), outputs),
                                 media_type="text/event-stream")

    # ---- /v1/completions

    async def create_completion(self, req: CompletionRequest, http_request: Request) -> Response:
        self.check_model(req.model)
        texts: list[str | None] = []
        prompts: list[list[int]] = []
        for prompt in req.prompts():
            texts.append(prompt if isinstance(prompt, str) else None)
            prompts.append(self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        params = self._prepare(req.to_sampling_params(), prompts)
        request_id, created, n = random_id("cmpl"), int(time.time()), params.n
        outputs = self._submit(request_id, prompts, texts, params)

        def build(finals: list[RequestOutput]) -> CompletionResponse:
            choices = []
            for i, final in enumerate(finals):
                for c in final.outputs:
                    logprobs = None if c.logprobs is None else completion_logprobs(c.token_ids, c.logprobs, 0)
                    choices.append(CompletionChoice(index=i * n + c.index, text=c.text, logprobs=logprobs,
                                                    finish_reason=c.finish_reason))
            num_generated = sum(len(c.token_ids) for final in finals for c in final.outputs)
            return CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                      usage=usage(map(len, prompts), num_generated))

        def chunk(choices: list[CompletionChoice], usage_info: UsageInfo | None = None) -> str:
            return sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage_info))

        async def stream_events(outputs: Outputs) -> AsyncIterator[str]:
            trackers = [ChoiceTracker() for _ in range(len(prompts) * n)]
            async for i, output in outputs:
                for c in output.outputs:
                    delta = trackers[i * n + c.index].advance(c)
                    if delta is None:
                        continue
                    logprobs = None if delta.logprobs is None else completion_logprobs(
                        delta.token_ids, delta.logprobs, delta.text_offset)
                    yield chunk([CompletionChoice(index=i * n + c.index, text=delta.text, logprobs=logprobs,
                                                  finish_reason=delta.finish_reason)])
            if req.include_usage:
                yield chunk([], usage(map(len, prompts), sum(t.num_tokens for t in trackers)))

        return await self._respond(http_request, outputs, len(prompts), req.stream, build, stream_events)

    # ---- /v1/chat/completions

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The chat template applied (with the assistant's generation prompt) and tokenized as is."""
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (ValueError, TemplateError) as e:
            raise InvalidRequestError(f"cannot apply the model's chat template: {e}", "messages") from e
        # The template already contains any special tokens the model expects (e.g. <|im_start|>).
        return text, tokenizer.encode(text, add_special_tokens=False)

    async def create_chat_completion(self, req: ChatCompletionRequest, http_request: Request) -> Response:
        self.check_model(req.model)
        text, prompt_ids = self.chat_prompt(req)
        params = self._prepare(req.to_sampling_params(), [prompt_ids])
        request_id, created = random_id("chatcmpl"), int(time.time())
        top_k = params.logprobs or 0
        outputs = self._submit(request_id, [prompt_ids], [text], params)

        def logprobs_of(token_ids: list[int], logprobs: list[dict[int, Logprob]] | None) -> ChatLogprobs | None:
            return None if logprobs is None else chat_logprobs(token_ids, logprobs, top_k)

        def build(finals: list[RequestOutput]) -> ChatCompletionResponse:
            (final,) = finals
            choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                                  logprobs=logprobs_of(c.token_ids, c.logprobs), finish_reason=c.finish_reason)
                       for c in final.outputs]
            return ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                          usage=usage([len(prompt_ids)], sum(len(c.token_ids) for c in final.outputs)))

        def chunk(choices: list[ChatChunkChoice], usage_info: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices,
                                           usage=usage_info))

        async def stream_events(outputs: Outputs) -> AsyncIterator[str]:
            trackers = [ChoiceTracker() for _ in range(params.n)]
            for j in range(params.n):
                yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
            async for _, output in outputs:
                for c in output.outputs:
                    delta = trackers[c.index].advance(c)
                    if delta is not None:
                        yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=delta.text),
                                                     logprobs=logprobs_of(delta.token_ids, delta.logprobs),
                                                     finish_reason=delta.finish_reason)])
            if req.include_usage:
                yield chunk([], usage([len(prompt_ids)], sum(t.num_tokens for t in trackers)))

        return await self._respond(http_request, outputs, 1, req.stream, build, stream_events)


async def _chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


async def _sse_stream(events: AsyncIterator[str], outputs: Outputs) -> AsyncIterator[str]:
    """`events`, then [DONE]; a failure mid-stream becomes an `{"error": ...}` event before [DONE].

    However the stream ends (including the server dropping it after a disconnect), the engine requests are closed.
    """
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as e:
        yield sse(as_api_error(e).payload())
    finally:
        await outputs.aclose()
    yield SSE_DONE


def build_app(engine: AsyncLLMEngine, *, api_key: str | None,
              logits_processors: Sequence[LogitsProcessor] = ()) -> FastAPI:
    """The FastAPI app; `logits_processors` are added to every request's sampling parameters."""
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, metrics, logits_processors)
    app = FastAPI(title="leapserve", docs_url=None, redoc_url=None)
    install_exception_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_alive:
            return Response(status_code=200)
        return APIError(503, "the engine thread has stopped", "server_error").response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def list_models() -> ModelList:
        return serving.models()

    @v1.post("/completions")
    async def create_completion(req: CompletionRequest, http_request: Request) -> Response:
        return await serving.create_completion(req, http_request)

    @v1.post("/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, http_request: Request) -> Response:
        return await serving.create_chat_completion(req, http_request)

    app.include_router(v1)
    return app


def run_server(config: EngineConfig, host: str, port: int, api_key: str | None, *,
               logits_processors: Sequence[LogitsProcessor] = (), log_level: str = "info") -> None:
    """Load the engine, serve until SIGINT/SIGTERM, then shut the engine down."""
    engine = AsyncLLMEngine(config)
    try:
        app = build_app(engine, api_key=api_key, logits_processors=logits_processors)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
    finally:
        engine.shutdown()
