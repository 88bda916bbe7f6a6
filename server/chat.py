"""/v1/chat/completions: the messages through the model's chat template, then one engine request with n choices.

The response is built from the final output; a stream opens with each choice's assistant role, then carries one
chunk per change of a choice.
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
from jinja2 import TemplateError

from leapserve.decoding.outputs import Logprob, RequestOutput
from leapserve.decoding.sampling_params import InvalidRequestError

from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    random_id,
)
from .serving import OpenAIServing, Outputs, respond, usage
from .streaming import ChoiceTracker, sse_chunk

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> tuple[str, list[int]]:
    """The chat template applied (by default with the assistant's generation prompt) and tokenized as is."""
    rendered = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert isinstance(text, str)  # tokenize=False: the rendered text (transformers' return type is a union)
    except (ValueError, TemplateError) as e:
        raise InvalidRequestError(f"cannot apply the model's chat template: {e}", "messages") from e
    # The template already contains any special tokens the model expects (e.g. <|im_start|>).
    return text, tokenizer.encode(text, add_special_tokens=False)


def _top(lp: Logprob) -> TopLogprob:
    return TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode()))


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, k: int) -> ChatLogprobs | None:
    """The chat format (None when logprobs were not asked for): each sampled token with the k most likely ones,
    byte values included."""
    if logprobs is None:
        return None
    content = []
    for token_id, entries in zip(token_ids, logprobs):
        top_k = sorted((lp for lp in entries.values() if lp.rank <= k), key=attrgetter("rank"))
        sampled = _top(entries[token_id])
        content.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=[_top(lp) for lp in top_k]))
    return ChatLogprobs(content=content)


def chat_response(
    request_id: str, created: int, model: str, prompt_ids: list[int], finals: list[RequestOutput], *, top_logprobs: int
) -> ChatCompletionResponse:
    """The whole response from the final output of its one engine request."""
    (final,) = finals
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            finish_reason=c.finish_reason,
            logprobs=chat_logprobs(c.token_ids, c.logprobs, top_logprobs),
        )
        for c in final.outputs
    ]
    return ChatCompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=choices,
        usage=usage([len(prompt_ids)], sum(len(c.token_ids) for c in final.outputs)),
    )


async def chat_events(
    request_id: str,
    created: int,
    model: str,
    prompt_ids: list[int],
    outputs: Outputs,
    *,
    n: int,
    top_logprobs: int,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """Each choice's role, one chunk per choice that changed, then (if asked for) one with the usage and no choices."""
    chunk = partial(sse_chunk, ChatCompletionChunk, request_id, created, model)
    trackers = [ChoiceTracker() for _ in range(n)]
    for j in range(n):
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
    async for _, output in outputs:
        for c in output.outputs:
            delta = trackers[c.index].advance(c)
            if delta is not None:
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=c.index,
                            delta=DeltaMessage(content=delta.text),
                            finish_reason=delta.finish_reason,
                            logprobs=chat_logprobs(delta.token_ids, delta.logprobs, top_logprobs),
                        )
                    ]
                )
    if include_usage:
        yield chunk([], usage([len(prompt_ids)], sum(t.num_tokens for t in trackers)))


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, http_request: Request) -> Response:
    """The handler: apply the chat template, submit, answer as JSON or as server-sent events."""
    serving.check_model(req.model)
    # in a worker thread: the tokenizer releases the GIL, so a huge prompt does not hold up other clients
    text, prompt_ids = await asyncio.to_thread(chat_prompt, serving.engine.tokenizer, req.messages)
    params = await serving.prepare(req.to_sampling_params(), [prompt_ids])
    request_id, created, model = random_id("chatcmpl"), int(time.time()), serving.model_name
    top_logprobs = params.logprobs or 0
    outputs = serving.submit(request_id, [prompt_ids], [text], params)
    return await respond(
        http_request,
        outputs,
        1,
        req.stream,
        build=partial(chat_response, request_id, created, model, prompt_ids, top_logprobs=top_logprobs),
        stream_events=partial(
            chat_events,
            request_id,
            created,
            model,
            prompt_ids,
            n=params.n,
            top_logprobs=top_logprobs,
            include_usage=req.include_usage,
        ),
    )
