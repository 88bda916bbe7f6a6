"""Tool calling on /v1/chat/completions.

The tools reach the model through its chat template when the template takes `tools`; otherwise (SmolLM2's does
not) as a system message in the Hermes format many instruction-tuned models know: the tools' JSON schemas, and
calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Earlier calls and tool results in the
conversation are written the same way. With `tool_choice` `auto` the calls are parsed from the output and the rest
is the message's content; with `required` or a named function the output is held by structured outputs to a JSON
array of calls (of that function, or of any of the tools), so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from leapserve.decoding.structured_output import StructuredOutputsParams

from .protocol import ChatMessage, FunctionCall, Tool, ToolCall

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


def tools_system_prompt(tools: list[Tool]) -> str:
    """The Hermes-style description of the tools, for a template that does not take them."""
    specs = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return (
        "You may call one or more functions to assist with the user query. The functions are described in JSON "
        f"within <tools></tools> tags:\n<tools>\n{specs}\n</tools>\nFor each function call, return a JSON object "
        f"with the function name and arguments within {CALL_OPEN}{CALL_CLOSE} tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def _arguments(call: ToolCall) -> object:
    """A call's arguments as JSON data (its text where that is not JSON)."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def render_messages(messages: list[ChatMessage], tools: list[Tool] | None, template_takes_tools: bool) -> list[dict]:
    """The messages as the chat template reads them: an assistant's earlier calls written out as `<tool_call>`
    blocks after its text, a tool's result as its content; the tools' system message first when the template does
    not take `tools` itself (joined to a leading system message)."""
    rendered = []
    for m in messages:
        text = m.text()
        if m.tool_calls:
            calls = [
                f"{CALL_OPEN}\n{json.dumps({'name': c.function.name, 'arguments': _arguments(c)})}\n{CALL_CLOSE}"
                for c in m.tool_calls
            ]
            text = "\n".join(filter(None, [text, *calls]))
        rendered.append({"role": m.role, "content": text})
    if tools and not template_takes_tools:
        system = tools_system_prompt(tools)
        if rendered and rendered[0]["role"] in ("system", "developer"):
            rendered[0] = {"role": rendered[0]["role"], "content": rendered[0]["content"] + "\n\n" + system}
        else:
            rendered.insert(0, {"role": "system", "content": system})
    return rendered


def forced_calls_constraint(tools: list[Tool], name: str | None, parallel: bool = True) -> StructuredOutputsParams:
    """`required` (any of the tools) or a named function: a JSON array of calls, one for a named function or
    without `parallel` calls, else at least one."""
    chosen = [t for t in tools if name is None or t.function.name == name]
    call_schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"enum": [t.function.name]},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    items = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    schema = {"type": "array", "items": items, "minItems": 1}
    if name is not None or not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema, param="tool_choice")


def _call(obj: object) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=obj["name"], arguments=json.dumps(arguments, ensure_ascii=False)),
    )


@dataclass
class ParsedCalls:
    content: str | None  # the text outside the calls (None when there is none)
    calls: list[ToolCall]


def parse_tool_calls(text: str, forced: bool) -> ParsedCalls:
    """The calls in an output: `forced` (required or named), the whole output is a JSON array of calls; `auto`,
    every well-formed `<tool_call>` block. What does not parse stays content."""
    if forced:
        try:
            found = [_call(obj) for obj in json.loads(text)]
        except (json.JSONDecodeError, TypeError):
            return ParsedCalls(text or None, [])
        return ParsedCalls(None, [c for c in found if c is not None])
    calls, kept, last = [], [], 0
    for match in CALL.finditer(text):
        try:
            call = _call(json.loads(match.group(1)))
        except json.JSONDecodeError:
            call = None
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last : match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip()
    return ParsedCalls(content or None, calls)


class ToolCallStream:
    """One streamed choice's text with tools active: content goes out as it comes until a call may have begun
    (from `<tool_call>`, or for a forced call from the start); the calls go out parsed at the end."""

    def __init__(self, forced: bool):
        self.forced = forced
        self.text = ""
        self.sent = 0  # characters of `text` sent as content

    def feed(self, delta: str) -> str:
        """The content to send now, given the choice's new text."""
        self.text += delta
        if self.forced:
            return ""
        start = self.text.find(CALL_OPEN)
        if start < 0:  # hold back a tail that could be the start of the tag
            start = len(self.text)
            for k in range(min(len(CALL_OPEN) - 1, len(self.text)), 0, -1):
                if CALL_OPEN.startswith(self.text[-k:]):
                    start = len(self.text) - k
                    break
        out = self.text[self.sent : max(self.sent, start)]
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still unsent and the calls, once the choice has finished."""
        rest = self.text[self.sent :]  # what was sent holds no call: it ends before any `<tool_call>`
        self.sent = len(self.text)
        parsed = parse_tool_calls(rest, self.forced)
        if not parsed.calls:
            return rest, []
        return parsed.content or "", parsed.calls
