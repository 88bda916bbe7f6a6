"""The server's parts on their own, without an engine: stream merging and disconnects, choice deltas, the
completions and chat response and event builders on hand-made engine outputs, SSE framing, API-key auth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx
from fastapi import FastAPI
from starlette.requests import Request

from leapserve.decoding.outputs import CompletionOutput, Logprob, RequestOutput
from leapserve.server.auth import APIKeyMiddleware
from leapserve.server.chat import chat_events, chat_logprobs, chat_prompt, chat_response
from leapserve.server.completions import completion_events, completion_logprobs, completion_response
from leapserve.server.errors import APIError
from leapserve.server.protocol import ChatCompletionRequest, ChatMessage
from leapserve.server.streaming import SSE_DONE, ChoiceTracker, merge_async_iterators, sse_stream, unless_disconnected

# Two steps of one choice: " a" (id 10, beating id 11) then "bc" (id 12, the runner-up to id 13).
STEP_1 = {10: Logprob(-0.1, 1, " a"), 11: Logprob(-2.0, 2, " b")}
STEP_2 = {13: Logprob(-0.3, 1, "d"), 12: Logprob(-1.5, 2, "bc")}


def output(
    index: int,
    text: str,
    token_ids: list[int],
    finish_reason: str | None = None,
    logprobs: list[dict[int, Logprob]] | None = None,
) -> CompletionOutput:
    return CompletionOutput(index=index, text=text, token_ids=token_ids, finish_reason=finish_reason, logprobs=logprobs)


def request_output(prompt_ids: list[int], *outputs: CompletionOutput) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=prompt_ids,
        outputs=list(outputs),
        finished=all(o.finish_reason is not None for o in outputs),
    )


async def read(stream: AsyncIterator[str]) -> list[str]:
    return [event async for event in stream]


def events(stream: AsyncIterator[str]) -> list[dict | str]:
    """The events' payloads, parsed (the final [DONE] as is)."""
    return payloads(asyncio.run(read(stream)))


def payloads(raw: list[str]) -> list[dict | str]:
    out: list[dict | str] = []
    for event in raw:
        assert event.startswith("data: ") and event.endswith("\n\n")
        body = event[len("data: ") : -2]
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


async def tagged(*items: tuple[int, RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    for item in items:
        yield item


# ---------------------------------------------------------------- streaming helpers


def test_choice_tracker_yields_what_each_output_adds_until_finished():
    tracker = ChoiceTracker()
    first = tracker.advance(output(0, " a", [10], logprobs=[STEP_1]))
    assert (first.text, first.token_ids, first.text_offset, first.finish_reason) == (" a", [10], 0, None)
    assert tracker.advance(output(0, " a", [10], logprobs=[STEP_1])) is None  # nothing new
    last = tracker.advance(output(0, " abc", [10, 12], "stop", logprobs=[STEP_1, STEP_2]))
    assert (last.text, last.token_ids, last.logprobs, last.text_offset) == ("bc", [12], [STEP_2], 2)
    assert last.finish_reason == "stop" and tracker.num_tokens == 2
    assert tracker.advance(output(0, " abc", [10, 12], "stop")) is None  # finished


def test_choice_tracker_reports_a_finish_that_adds_no_text():
    tracker = ChoiceTracker()
    tracker.advance(output(0, "x", [5]))
    delta = tracker.advance(output(0, "x", [5], "length"))
    assert (delta.text, delta.token_ids, delta.logprobs, delta.finish_reason) == ("", [], None, "length")


def test_merge_closes_every_iterator_when_left_early():
    closed: list[int] = []

    async def endless(i: int) -> AsyncIterator[int]:
        try:
            while True:
                yield i
                await asyncio.sleep(0)
        finally:
            closed.append(i)

    async def take_three() -> list[tuple[int, int]]:
        taken = []
        async with aclosing(merge_async_iterators([endless(i) for i in range(3)])) as merged:
            async for item in merged:
                taken.append(item)
                if len(taken) == 3:
                    break
        return taken

    taken = asyncio.run(take_three())
    assert len(taken) == 3 and all(index == value for index, value in taken)
    assert sorted(closed) == [0, 1, 2]


def test_merge_raises_the_first_error_and_closes_the_others():
    closed: list[str] = []

    async def fails() -> AsyncIterator[int]:
        yield 1
        raise ValueError("boom")

    async def waits() -> AsyncIterator[int]:
        try:
            await asyncio.Event().wait()
            yield 2
        finally:
            closed.append("waits")

    async def run() -> list[tuple[int, int]]:
        seen = []
        try:
            async for item in merge_async_iterators([fails(), waits()]):
                seen.append(item)
        except ValueError as e:
            assert str(e) == "boom"
            return seen
        raise AssertionError("the error did not end the merge")

    assert asyncio.run(run()) == [(0, 1)]
    assert closed == ["waits"]


def request_with(receive) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_unless_disconnected_cancels_the_work_when_the_client_leaves():
    async def disconnect() -> dict:
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def run() -> tuple[tuple[bool, object], bool]:
        work = asyncio.ensure_future(asyncio.sleep(10, "never"))
        result = await unless_disconnected(request_with(disconnect), work)
        return result, work.cancelled()

    assert asyncio.run(run()) == ((False, None), True)


def test_unless_disconnected_returns_the_result_of_work_that_ends_first():
    async def stays() -> dict:
        await asyncio.Event().wait()
        return {}

    async def run() -> tuple[bool, object]:
        return await unless_disconnected(request_with(stays), asyncio.sleep(0, "done"))

    assert asyncio.run(run()) == (True, "done")


def test_sse_stream_turns_a_failure_into_an_error_event_then_done_and_closes_the_source():
    closed = []

    async def source() -> AsyncIterator[int]:
        try:
            yield 0
        finally:
            closed.append(True)

    async def failing() -> AsyncIterator[str]:
        yield 'data: {"n": 1}\n\n'
        raise APIError(400, "bad", param="x")

    async def run() -> list[str]:
        src = source()
        await anext(src)  # the engine requests are running
        return await read(sse_stream(failing(), src))

    raw = asyncio.run(run())
    assert payloads(raw) == [
        {"n": 1},
        {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}},
        "[DONE]",
    ]
    assert raw[-1] == SSE_DONE and closed == [True]


# ---------------------------------------------------------------- completions


def test_completion_logprobs_offsets_and_top_entries_by_rank():
    out = completion_logprobs([10, 12], [STEP_1, STEP_2], text_offset=5)
    assert out.tokens == [" a", "bc"] and out.token_logprobs == [-0.1, -1.5]
    assert out.text_offset == [5, 7]
    assert [list(top) for top in out.top_logprobs] == [[" a", " b"], ["d", "bc"]]
    assert completion_logprobs([10], None, 0) is None


def test_completion_response_numbers_choices_by_prompt_and_counts_usage():
    finals = [
        request_output([1, 2, 3], output(0, " a", [10], "length", [STEP_1]), output(1, " b", [11], "stop", [STEP_1])),
        request_output([4], output(0, "bc", [12], "length", [STEP_2]), output(1, "", [], "stop", [])),
    ]
    resp = completion_response("cmpl-1", 7, "tiny", [[1, 2, 3], [4]], finals, n=2)
    body = json.loads(resp.model_dump_json())
    assert (body["id"], body["object"], body["created"], body["model"]) == ("cmpl-1", "text_completion", 7, "tiny")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, " a", "length"),
        (1, " b", "stop"),
        (2, "bc", "length"),
        (3, "", "stop"),
    ]
    assert body["choices"][1]["logprobs"]["tokens"] == [" b"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_completion_events_stream_each_change_then_the_usage():
    outputs = tagged(
        (1, request_output([4], output(0, " a", [10]))),
        (0, request_output([1, 2], output(0, "x", [5]))),
        (1, request_output([4], output(0, " a", [10], "stop"))),
        (0, request_output([1, 2], output(0, "xy", [5, 6], "length"))),
    )
    got = events(completion_events("cmpl-1", 7, "tiny", [[1, 2], [4]], outputs, n=1, include_usage=True))
    assert all(e["id"] == "cmpl-1" and e["object"] == "text_completion" for e in got)
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in e["choices"]] for e in got] == [
        [(1, " a", None)],
        [(0, "x", None)],
        [(1, "", "stop")],
        [(0, "y", "length")],
        [],
    ]
    assert "usage" not in got[0]
    assert got[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completion_events_carry_logprobs_with_running_text_offsets():
    outputs = tagged(
        (0, request_output([1], output(0, " a", [10], logprobs=[STEP_1]))),
        (0, request_output([1], output(0, " abc", [10, 12], "stop", [STEP_1, STEP_2]))),
    )
    got = events(completion_events("cmpl-1", 7, "tiny", [[1]], outputs, n=1, include_usage=False))
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in got] == [[0], [2]]


# ---------------------------------------------------------------- chat


def test_chat_logprobs_keep_the_top_k_by_rank_with_bytes():
    content = chat_logprobs([12], [STEP_2], 1).content
    assert (content[0].token, content[0].logprob, content[0].bytes) == ("bc", -1.5, [98, 99])
    assert [t.token for t in content[0].top_logprobs] == ["d"]
    assert chat_logprobs([12], [STEP_2], 0).content[0].top_logprobs == []
    assert chat_logprobs([12], None, 2) is None


def test_chat_response_from_the_final_output():
    final = request_output(
        [1, 2, 3], output(0, " a", [10], "stop", [STEP_1]), output(1, "bc", [12, 13], "length", [STEP_2, STEP_2])
    )
    body = json.loads(chat_response("chatcmpl-1", 7, "tiny", [1, 2, 3], [final], top_logprobs=2).model_dump_json())
    assert (body["id"], body["object"], body["created"]) == ("chatcmpl-1", "chat.completion", 7)
    assert [c["message"] for c in body["choices"]] == [
        {"role": "assistant", "content": " a"},
        {"role": "assistant", "content": "bc"},
    ]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert [t["token"] for t in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]] == [" a", " b"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chat_events_open_with_each_role_then_deltas_then_usage():
    outputs = tagged(
        (0, request_output([1], output(0, "hi", [5]), output(1, "", []))),
        (0, request_output([1], output(0, "hi!", [5, 6], "stop"), output(1, "yo", [7], "length"))),
    )
    got = events(chat_events("chatcmpl-1", 7, "tiny", [1, 2], outputs, n=2, top_logprobs=0, include_usage=True))
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-1" for e in got)
    assert [[(c["index"], c["delta"], c["finish_reason"]) for c in e["choices"]] for e in got] == [
        [(0, {"role": "assistant", "content": ""}, None)],
        [(1, {"role": "assistant", "content": ""}, None)],
        [(0, {"content": "hi"}, None)],
        [(0, {"content": "!"}, "stop")],
        [(1, {"content": "yo"}, "length")],
        [],
    ]
    assert got[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_chat_prompt_applies_the_template_with_the_generation_prompt(smollm2_tokenizer):
    req = ChatCompletionRequest(messages=[ChatMessage(role="user", content="Hello")])
    text, ids = chat_prompt(smollm2_tokenizer, req.messages)
    assert "Hello" in text and text.endswith("<|im_start|>assistant\n")
    assert ids == smollm2_tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- auth


def test_api_key_middleware_guards_v1_only():
    app = FastAPI()
    app.get("/v1/ping")(lambda: {"ok": True})
    app.get("/health")(lambda: {"ok": True})
    app.add_middleware(APIKeyMiddleware, api_key="secret")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [
                await client.get("/v1/ping"),
                await client.get("/v1/ping", headers={"Authorization": "Bearer no"}),
                await client.get("/v1/ping", headers={"Authorization": "Bearer secret"}),
                await client.get("/health"),
            ]

    missing, wrong, right, health = asyncio.run(run())
    for refused in (missing, wrong):
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json() == {
            "error": {
                "message": "invalid or missing API key: send `Authorization: Bearer <key>`",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    assert right.json() == {"ok": True} and health.json() == {"ok": True}
