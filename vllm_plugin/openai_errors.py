"""vLLM's error responses in OpenAI's error shape, as leapserve's native server answers them.

An ASGI middleware that `leapserve serve --backend vllm` gives vLLM's API server (`--middleware
leapserve.vllm_plugin.openai_errors.OpenAIErrorShape`). vLLM answers errors as `{"error": {"message", "type":
"BadRequestError", "param", "code": 400}}`, a 401 as `{"error": "Unauthorized"}` and an unknown route as
`{"detail": "Not Found"}`; clients and the native server expect `{"error": {"message", "type":
"invalid_request_error" | "server_error", "param", "code"}}` with `param` the request field at fault and `code` a
string or null. Only complete JSON bodies of responses with status >= 400 are rewritten; everything else,
streams included, passes through untouched. Imports nothing from vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PARAMS = {"input_tokens": "prompt"}  # vLLM's name for a field -> the request field it is about


def request_field(param: object) -> str | None:
    """A request field from vLLM's `param`: "body.prompt.1" -> "prompt"; "body" or a JSON offset -> None."""
    if not isinstance(param, str) or not param:
        return None
    parts = [p for p in param.split(".") if p != "body"]
    if not parts or parts[0].isdigit():
        return None
    return PARAMS.get(parts[0], parts[0])


def openai_error(status: int, body: object, method: str, path: str) -> dict[str, dict[str, Any]]:
    """vLLM's error body for a response of `status` to `method path`, in OpenAI's shape."""
    error = body.get("error") if isinstance(body, dict) else None
    param = request_field(error.get("param")) if isinstance(error, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    elif status == 404:
        message = f"no route {method} {path}"
    elif status == 405:
        message = f"method {method} is not allowed on {path}"
    elif status == 401:
        message = "invalid or missing API key"
    else:
        message = str(error or (body.get("detail") if isinstance(body, dict) else body))
    code = {401: "invalid_api_key"}.get(status)
    if status == 404 and param == "model":
        code = "model_not_found"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIErrorShape:
    """ASGI middleware: JSON error responses (status >= 400) rewritten by `openai_error`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: Message | None = None
        body = b""

        async def rewrite(message: Message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    start = message  # held back until the whole body is here
                    return
            elif message["type"] == "http.response.body" and start is not None:
                body += message.get("body", b"")
                if message.get("more_body", False):
                    return
                status = start["status"]
                try:
                    original = json.loads(body)
                except ValueError:
                    new = body
                else:
                    new = json.dumps(openai_error(status, original, scope["method"], scope["path"])).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(new)).encode())]})
                await send({"type": "http.response.body", "body": new, "more_body": False})
                start = None
                return
            await send(message)

        await self.app(scope, receive, rewrite)
