"""/v1/completions: the legacy text completions endpoint.

Several prompts (strings or token ids) per request, each its own engine request; choice `i * n + j` is the j-th
sample of prompt i. The response is built from each prompt's final output, or streamed as one event per change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, cast

from fastapi import Request
from fastapi.responses import Response

from leapserve.decoding.outputs import Logprob, RequestOutput

from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, random_id
from .serving import OpenAIServing, Outputs, respond, usage
from .streaming import ChoiceTracker, sse_chunk

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Echo:
    """What `echo` puts before a prompt's completions: its text and, with logprobs, its tokens' logprobs (the first
    token, with nothing before it to score it, as its text and a null logprob)."""

    text: str
    logprobs: CompletionLogprobs | None

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, text: str | None, final: RequestOutput) -> Echo:
        ids, scored = final.prompt_token_ids, final.prompt_logprobs
        prompt = text if text is not None else str(tokenizer.decode(ids))
        if scored is None:
            return cls(prompt, None)
        first = str(tokenizer.decode(ids[:1]))
        logprobs = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
        rest = completion_logprobs(ids[1:], cast("list[dict[int, Logprob]]", scored[1:]), len(first))
        assert rest is not None
        return cls(prompt, merge_logprobs(logprobs, rest))


def merge_logprobs(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """`a`'s tokens, then `b`'s (None where both are None)."""
    if a is None or b is None:
        return a or b
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, text_offset: int
) -> CompletionLogprobs | None:
    """The legacy completions format (None when logprobs were not asked for); `text_offset` is where the first
    token's text starts."""
    if logprobs is None:
        return None
    out = CompletionLogprobs()
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries[token_id]
        out.tokens.append(sampled.decoded_token)
        out.token_logprobs.append(sampled.logprob)
        ranked = sorted(entries.values(), key=attrgetter("rank"))
        out.top_logprobs.append({lp.decoded_token: lp.logprob for lp in ranked})
        out.text_offset.append(text_offset)
        text_offset += len(sampled.decoded_token)
    return out


def completion_prompts(
    tokenizer: PreTrainedTokenizerBase, req: CompletionRequest
) -> tuple[list[str | None], list[list[int]]]:
    """The request's prompts as texts (None for a token-id prompt) and as token ids."""
    texts: list[str | None] = []
    prompts: list[list[int]] = []
    for prompt in req.prompts():
        texts.append(prompt if isinstance(prompt, str) else None)
        prompts.append(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
    return texts, prompts


def completion_response(
    request_id: str,
    created: int,
    model: str,
    prompts: list[list[int]],
    finals: list[RequestOutput],
    *,
    n: int,
    echo: Callable[[int, RequestOutput], Echo] | None = None,
) -> CompletionResponse:
    """The whole response from each prompt's final output (`n` choices per prompt); `echo(i, final)`, when given,
    is what goes before prompt i's completions."""
    choices = []
    for i, final in enumerate(finals):
        before = echo(i, final) if echo is not None else Echo("", None)
        offset = len(before.text)
        for c in final.outputs:
            choices.append(
                CompletionChoice(
                    index=i * n + c.index,
                    text=before.text + c.text,
                    finish_reason=c.finish_reason,
                    logprobs=merge_logprobs(before.logprobs, completion_logprobs(c.token_ids, c.logprobs, offset)),
                )
            )
    num_generated = sum(len(c.token_ids) for final in finals for c in final.outputs)
    return CompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=usage(map(len, prompts), num_generated)
    )


async def completion_events(
    request_id: str,
    created: int,
    model: str,
    prompts: list[list[int]],
    outputs: Outputs,
    *,
    n: int,
    include_usage: bool,
    echo: Callable[[int, RequestOutput], Echo] | None = None,
) -> AsyncGenerator[str, None]:
    """One event per choice that changed, then (if asked for) one with the usage and no choices; with `echo`, a
    choice's first event starts with what `echo(i, output)` puts before prompt i's completions."""
    chunk = partial(sse_chunk, CompletionResponse, request_id, created, model)
    trackers = [ChoiceTracker() for _ in range(len(prompts) * n)]
    echoes: dict[int, Echo] = {}
    async for i, output in outputs:
        for c in output.outputs:
            tracker = trackers[i * n + c.index]
            first = tracker.num_tokens == 0 and not tracker.finished
            delta = tracker.advance(c)
            if delta is None:
                continue
            before = Echo("", None)
            if echo is not None:
                before = echoes[i] if i in echoes else echoes.setdefault(i, echo(i, output))
            offset = len(before.text)
            logprobs = completion_logprobs(delta.token_ids, delta.logprobs, delta.text_offset + offset)
            if first:
                delta.text = before.text + delta.text
                logprobs = merge_logprobs(before.logprobs, logprobs)
            yield chunk(
                [
                    CompletionChoice(
                        index=i * n + c.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                ]
            )
    if include_usage:
        yield chunk([], usage(map(len, prompts), sum(t.num_tokens for t in trackers)))


async def create_completion(serving: OpenAIServing, req: CompletionRequest, http_request: Request) -> Response:
    """The handler: tokenize, submit every prompt, answer as JSON or as server-sent events."""
    serving.check_model(req.model)
    # in a worker thread: the tokenizer releases the GIL, so a huge prompt does not hold up other clients
    texts, prompts = await asyncio.to_thread(completion_prompts, serving.engine.tokenizer, req)
    params = await serving.prepare(req.to_sampling_params(), prompts)
    request_id, created, model, n = random_id("cmpl"), int(time.time()), serving.model_name, params.n
    outputs = serving.submit(request_id, prompts, texts, params)
    tokenizer = serving.engine.tokenizer
    echo = (lambda i, final: Echo.of(tokenizer, texts[i], final)) if req.echo else None
    return await respond(
        http_request,
        outputs,
        len(prompts),
        req.stream,
        build=partial(completion_response, request_id, created, model, prompts, n=n, echo=echo),
        stream_events=partial(
            completion_events, request_id, created, model, prompts, n=n, include_usage=req.include_usage, echo=echo
        ),
    )
