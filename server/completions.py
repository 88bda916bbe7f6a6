"""/v1/completions: the legacy text completions endpoint.

Several prompts (strings or token ids) per request, each its own engine request; choice `i * n + j` is the j-th
sample of prompt i. The response is built from each prompt's final output, or streamed as one event per change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from leapserve.decoding.outputs import Logprob, RequestOutput

from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, random_id
from .serving import OpenAIServing, Outputs, respond, usage
from .streaming import ChoiceTracker, sse_chunk

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
    request_id: str, created: int, model: str, prompts: list[list[int]], finals: list[RequestOutput], *, n: int
) -> CompletionResponse:
    """The whole response from each prompt's final output (`n` choices per prompt)."""
    choices = [
        CompletionChoice(
            index=i * n + c.index,
            text=c.text,
            finish_reason=c.finish_reason,
            logprobs=completion_logprobs(c.token_ids, c.logprobs, 0),
        )
        for i, final in enumerate(finals)
        for c in final.outputs
    ]
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
) -> AsyncGenerator[str, None]:
    """One event per choice that changed, then (if asked for) one with the usage and no choices."""
    chunk = partial(sse_chunk, CompletionResponse, request_id, created, model)
    trackers = [ChoiceTracker() for _ in range(len(prompts) * n)]
    async for i, output in outputs:
        for c in output.outputs:
            delta = trackers[i * n + c.index].advance(c)
            if delta is None:
                continue
            logprobs = completion_logprobs(delta.token_ids, delta.logprobs, delta.text_offset)
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
    params = serving.prepare(req.to_sampling_params(), prompts)
    request_id, created, model, n = random_id("cmpl"), int(time.time()), serving.model_name, params.n
    outputs = serving.submit(request_id, prompts, texts, params)
    return await respond(
        http_request,
        outputs,
        len(prompts),
        req.stream,
        build=partial(completion_response, request_id, created, model, prompts, n=n),
        stream_events=partial(
            completion_events, request_id, created, model, prompts, n=n, include_usage=req.include_usage
        ),
    )
