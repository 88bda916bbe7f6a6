"""Tool calling: parsing calls from an output (`auto`), holding back a streamed call, the conversation rendered with
earlier calls and tool results, and end to end with the real `openai` client against the server on the tiny model:
`required` and a named function (enforced by structured outputs) streamed and not, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from leapserve.server.protocol import ChatMessage, FunctionCall, Tool, ToolCall
from leapserve.server.tools import ToolCallStream, parse_tool_calls, render_messages
from test_server import MODEL, assert_error, client, post, running_server  # noqa: F401


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """The tiny model's server with room for the tools' system message (the last --max-model-len counts)."""
    log = tmp_path_factory.mktemp("tools") / "server.log"
    with running_server(tiny_model_dir, log, "--max-model-len", "1024", "--kv-cache-tokens", "8192") as url:
        yield url


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_auto_calls_are_parsed_and_the_rest_is_content():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    text += '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call><tool_call>not json</tool_call>'
    parsed = parse_tool_calls(text, forced=False)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert parsed.content == "Let me look.\n\n<tool_call>not json</tool_call>"
    assert len({c.id for c in parsed.calls}) == 2
    assert parse_tool_calls("no calls here", forced=False).calls == []
    forced = parse_tool_calls('[{"name": "get_time", "arguments": {"zone": "CET"}}]', forced=True)
    assert forced.content is None and forced.calls[0].function.arguments == '{"zone": "CET"}'
    assert parse_tool_calls('[{"name": "get_ti', forced=True).calls == []  # cut off by max_tokens: content


def test_a_streamed_call_is_held_back_and_comes_whole():
    stream = ToolCallStream(forced=False)
    pieces = ["Checking", " now <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']
    sent = [stream.feed(p) for p in pieces]
    assert "".join(sent) == "Checking now " and sent[1] == " now "
    rest, calls = stream.finish()
    assert rest == "" and [c.function.name for c in calls] == ["get_weather"]
    plain = ToolCallStream(forced=False)
    assert plain.feed("a < b") == "a < b" and plain.feed(" <tool") == " " and plain.finish() == ("<tool", [])


def test_earlier_calls_and_results_are_written_for_the_template():
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Rome"}'))
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Rome?"),
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", content='{"sky": "clear"}', tool_call_id="call_1"),
    ]
    rendered = render_messages(messages, [Tool.model_validate(WEATHER)], template_takes_tools=False)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in rendered[0]["content"] and "<tools>" in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert rendered[3] == {"role": "tool", "content": '{"sky": "clear"}'}
    assert render_messages(messages[1:2], None, False) == [{"role": "user", "content": "Weather in Rome?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_calls_end_to_end(client, stream):  # noqa: F811
    for choice, parallel, names in [
        ("required", False, {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, None, {"get_time"}),
    ]:
        kwargs = dict(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=48,
            temperature=0.8,
            seed=11,
        )
        if parallel is not None:
            kwargs["parallel_tool_calls"] = parallel
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            calls = [(d.function.name, json.loads(d.function.arguments)) for d in deltas]
            assert all(d.id and d.type == "function" for d in deltas)
            reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        else:
            (out,) = client.chat.completions.create(**kwargs).choices
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in out.message.tool_calls]
            reason = out.finish_reason
            assert out.message.content is None
        assert reason == "tool_calls" and len(calls) == 1
        name, arguments = calls[0]
        assert name in names
        assert arguments in ([{"city": c} for c in ("Paris", "Rome", "Oslo")] + [{"zone": "UTC"}, {"zone": "CET"}])


def test_auto_and_tool_results_through_the_server(client, server):  # noqa: F811
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=8, seed=1)
    assert auto.choices[0].message.content is not None or auto.choices[0].message.tool_calls
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear", "celsius": 21}'},
    ]
    answered = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=4, seed=1)
    assert answered.usage.prompt_tokens > auto.usage.prompt_tokens + 20  # the call and its result are in the prompt
    chat = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    named = {"type": "function", "function": {"name": "nope"}}
    assert_error(
        post(server, "/v1/chat/completions", {**chat, "tools": [WEATHER], "tool_choice": named}),
        400,
        param="tool_choice",
    )
    assert_error(post(server, "/v1/chat/completions", {**chat, "tool_choice": "required"}), 400, param="tool_choice")
    both = {**chat, "tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}
    assert_error(post(server, "/v1/chat/completions", both), 400, param="tool_choice")
    assert_error(
        post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "tools": [WEATHER]}), 400, param="tools"
    )
