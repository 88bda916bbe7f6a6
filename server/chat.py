"""/v1/chat/completions: the messages through the model's chat template, then one engine request with n choices.

The response is built from the final output; a stream opens with each choice's assistant role, then carries one
chunk per change of a choice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Literal

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from leapserve.decoding.errors import InvalidRequestError
from leapserve.decoding.outputs import Logprob, RequestOutput

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
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    Tool,
    ToolCall,
    TopLogprob,
    random_id,
)
from .serving import OpenAIServing, Outputs, respond, usage
from .streaming import ChoiceTracker, sse_chunk
from .tools import ParsedCalls, ToolCallStream, forced_calls_constraint, parse_tool_calls, render_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[Tool] | None = None,
) -> tuple[str, list[int]]:
    """The chat template applied (by default with the assistant's generation prompt) and tokenized as is; `tools`
    through the template where it takes them, else as a system message (`tools.render_messages`)."""
    takes_tools = "tools" in str(getattr(tokenizer, "chat_template", "") or "")
    rendered = render_messages(messages, tools, takes_tools)
    tool_specs: list[dict | Callable] | None = (
        [t.model_dump(exclude_none=True) for t in tools] if tools and takes_tools else None
    )
    try:
        text = tokenizer.apply_chat_template(
            rendered, tools=tool_specs, add_generation_prompt=add_generation_prompt, tokenize=False
        )
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


def _finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


def chat_response(
    request_id: str,
    created: int,
    model: str,
    prompt_ids: list[int],
    finals: list[RequestOutput],
    *,
    top_logprobs: int,
    tools: Literal["auto", "forced"] | None = None,
) -> ChatCompletionResponse:
    """The whole response from the final output of its one engine request; with `tools`, the calls parsed from
    each choice's text (`tools.parse_tool_calls`)."""
    (final,) = finals
    choices = []
    for c in final.outputs:
        parsed = parse_tool_calls(c.text, tools == "forced") if tools else ParsedCalls(c.text, [])
        choices.append(
            ChatChoice(
                index=c.index,
                message=AssistantMessage(
                    content=parsed.content if parsed.calls else c.text, tool_calls=parsed.calls or None
                ),
                finish_reason=_finish_reason(c.finish_reason, parsed.calls),
                logprobs=chat_logprobs(c.token_ids, c.logprobs, top_logprobs),
            )
        )
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
    tools: Literal["auto", "forced"] | None = None,
) -> AsyncGenerator[str, None]:
    """Each choice's role, one chunk per choice that changed, then (if asked for) one with the usage and no choices.
    With `tools`, text that may be a call is held back (`tools.ToolCallStream`) and a choice's calls come whole,
    one `tool_calls` delta each, in its last chunk."""
    chunk = partial(sse_chunk, ChatCompletionChunk, request_id, created, model)
    trackers = [ChoiceTracker() for _ in range(n)]
    held = [ToolCallStream(tools == "forced") for _ in range(n)] if tools else None
    for j in range(n):
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
    async for _, output in outputs:
        for c in output.outputs:
            delta = trackers[c.index].advance(c)
            if delta is None:
                continue
            message, reason = DeltaMessage(content=delta.text), delta.finish_reason
            if held is not None:
                stream = held[c.index]
                message.content = stream.feed(delta.text)
                if reason is not None:
                    rest, calls = stream.finish()
                    message.content = (message.content + rest) or None
                    message.tool_calls = [
                        DeltaToolCall(
                            index=i,
                            id=call.id,
                            type="function",
                            function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
                        )
                        for i, call in enumerate(calls)
                    ] or None
                    reason = _finish_reason(reason, calls)
                if not (message.content or message.tool_calls or reason or delta.logprobs):
                    continue
            yield chunk(
                [
                    ChatChunkChoice(
                        index=c.index,
                        delta=message,
                        finish_reason=reason,
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
    tools = req.active_tools
    text, prompt_ids = await asyncio.to_thread(chat_prompt, serving.engine.tokenizer, req.messages, True, tools)
    params = req.to_sampling_params()
    if req.forces_call:  # the output is held to a JSON array of calls, so that it always parses
        assert tools is not None
        parallel = req.parallel_tool_calls is not False
        params.structured_outputs = forced_calls_constraint(tools, req.forced_function, parallel)
    params = await serving.prepare(params, [prompt_ids])
    calls: Literal["auto", "forced"] | None = None if tools is None else "forced" if req.forces_call else "auto"
    request_id, created, model = random_id("chatcmpl"), int(time.time()), serving.model_name
    top_logprobs = params.logprobs or 0
    outputs = serving.submit(request_id, [prompt_ids], [text], params)
    return await respond(
        http_request,
        outputs,
        1,
        req.stream,
        build=partial(chat_response, request_id, created, model, prompt_ids, top_logprobs=top_logprobs, tools=calls),
        stream_events=partial(
            chat_events,
            request_id,
            created,
            model,
            prompt_ids,
            n=params.n,
            top_logprobs=top_logprobs,
            include_usage=req.include_usage,
            tools=calls,
        ),
    )
