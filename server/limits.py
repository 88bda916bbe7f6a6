"""The request body's size limit (`--max-request-bytes`), as plain ASGI middleware in front of everything.

A declared `Content-Length` over the limit is answered with a 413 before any of the body is read; a body sent
without one (chunked) is counted as it arrives and refused once it passes the limit, so no handler ever parses
more than `max_bytes`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


def body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {max_bytes} bytes (--max-request-bytes)")


class RequestSizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await body_too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # the app's error handlers turn this into the 413
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, counted, send)
