"""The request plumbing both OpenAI endpoints share, bound to one `AsyncLLMEngine`.

Handlers check the model, `prepare` the sampling parameters, `submit` every prompt as its own engine request
(with metrics), and `respond`: as one JSON body, or as server-sent events from the first output on. A client that
goes away closes the engine's generators, which aborts its requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from leapserve.decoding.async_engine import AsyncLLMEngine, QueueFullError
from leapserve.decoding.errors import InvalidRequestError
from leapserve.decoding.outputs import RequestOutput
from leapserve.decoding.sampling_params import LogitsProcessor, SamplingParams

from .errors import APIError
from .metrics import ServerMetrics
from .protocol import ModelCard, ModelList, UsageInfo
from .streaming import merge_async_iterators, prepend, sse_stream, unless_disconnected

Outputs = AsyncGenerator[tuple[int, RequestOutput], None]  # engine outputs tagged with their prompt's index
StreamEvents = Callable[[Outputs], AsyncGenerator[str, None]]
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer


def usage(prompt_lens: Iterable[int], completion_tokens: int) -> UsageInfo:
    """Token counts of a response: all its prompts, and every choice's generated tokens."""
    prompt_tokens = sum(prompt_lens)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


async def _collect(outputs: Outputs, num_prompts: int) -> list[RequestOutput]:
    """Each prompt's last (final) output, in prompt order."""
    finals: dict[int, RequestOutput] = {}
    async for index, output in outputs:
        finals[index] = output
    return [finals[i] for i in range(num_prompts)]


async def respond(
    http_request: Request,
    outputs: Outputs,
    num_prompts: int,
    stream: bool,
    build: Callable[[list[RequestOutput]], BaseModel],
    stream_events: StreamEvents,
) -> Response:
    """Run a request to its end (JSON), or to its first output and then as server-sent events.

    `build` turns each prompt's final output into the response; `stream_events` turns the outputs into events.
    A client that disconnects first gets nothing, and its engine requests are aborted.
    """
    if not stream:
        completed, finals = await unless_disconnected(http_request, _collect(outputs, num_prompts))
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        assert finals is not None  # completed: the work's result
        return Response(build(finals).model_dump_json(), media_type="application/json")
    # Refusals at submission (queue full, invalid request) raise here, while an error status can still be sent.
    completed, first = await unless_disconnected(http_request, anext(outputs))
    if not completed:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    assert first is not None  # completed: the work's result
    return StreamingResponse(
        sse_stream(stream_events(prepend(first, outputs)), outputs), media_type="text/event-stream"
    )


class OpenAIServing:
    """The shared part of the request handlers, bound to one engine."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, logits_processors: Sequence[LogitsProcessor]):
        self.engine = engine
        self.metrics = metrics
        self.logits_processors = list(logits_processors)
        self.model_name = engine.served_model_name

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is unset or the served model's name."""
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.max_model_len)])

    async def prepare(self, params: SamplingParams, prompts: list[list[int]]) -> SamplingParams:
        """`params` with the server's logits processors; raises InvalidRequestError for a prompt that cannot run.
        A structured-output constraint is compiled (or found cached) in a worker thread, off the event loop."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.engine.compile_grammar, params.structured_outputs)
        params.logits_processors.extend(self.logits_processors)
        for prompt_ids in prompts:
            self.engine.validate_prompt(prompt_ids, params)
        return params

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None
    ) -> AsyncGenerator[RequestOutput, None]:
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

    def submit(
        self, request_id: str, prompts: list[list[int]], texts: list[str | None], params: SamplingParams
    ) -> Outputs:
        """Every prompt as its own engine request; outputs tagged with the prompt's index."""
        return merge_async_iterators(
            [
                self._generate(ids, params, f"{request_id}-{i}", text)
                for i, (ids, text) in enumerate(zip(prompts, texts))
            ]
        )
