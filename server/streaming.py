"""Async plumbing for the handlers: merging engine streams, watching for a client that hangs up, server-sent events.

`ChoiceTracker` turns a choice's cumulative engine outputs into what changed since the last event; `sse_stream`
wraps an endpoint's events with the error event and the final `[DONE]` of the OpenAI streaming format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from leapserve.decoding.outputs import CompletionOutput, Logprob

from .errors import as_api_error

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"


async def merge_async_iterators(iterators: Sequence[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """Items of several async iterators as they arrive, tagged with the iterator's index.

    The first exception ends the merge; leaving the merge (exception, close, cancellation) closes every iterator.
    """
    queue: asyncio.Queue[tuple[int, T | Exception | None]] = asyncio.Queue()

    async def drain(index: int, iterator: AsyncGenerator[T, None]) -> None:
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


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """`first`, then the items of `rest`."""
    yield first
    async for item in rest:
        yield item


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


def sse(payload: BaseModel) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


def sse_chunk(
    chunk_type: type[BaseModel], request_id: str, created: int, model: str, choices: list, usage: Any = None
) -> str:
    """One streamed chunk of `chunk_type` (a completion or a chat completion chunk) as a server-sent event."""
    return sse(chunk_type(id=request_id, created=created, model=model, choices=choices, usage=usage))


async def sse_stream(events: AsyncGenerator[str, None], source: AsyncGenerator) -> AsyncGenerator[str, None]:
    """`events`, then [DONE]; a failure mid-stream becomes an `{"error": ...}` event before [DONE].

    However the stream ends (including the server dropping it after a disconnect), `source` (the engine requests
    the events are made from) is closed.
    """
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as e:
        yield sse(as_api_error(e).payload())
    finally:
        await source.aclose()
    yield SSE_DONE


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
        """What `output` adds to the previous one; None once finished, or when nothing changed."""
        if self.finished:
            return None
        new_ids = output.token_ids[self.num_tokens :]
        new_logprobs = None if output.logprobs is None else output.logprobs[self.num_tokens :]
        delta = ChoiceDelta(
            text=output.text[self.text_len :],
            token_ids=new_ids,
            logprobs=new_logprobs,
            text_offset=self.tokens_text_len,
            finish_reason=output.finish_reason,
        )
        self.text_len, self.num_tokens = len(output.text), len(output.token_ids)
        if new_logprobs is not None:
            self.tokens_text_len += sum(len(entries[t].decoded_token) for t, entries in zip(new_ids, new_logprobs))
        self.finished = output.finish_reason is not None
        if not (delta.text or delta.token_ids or delta.finish_reason):
            return None
        return delta
