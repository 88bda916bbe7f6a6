"""Bearer-token auth for the OpenAI routes.

Plain ASGI middleware rather than a FastAPI dependency, so streaming responses and disconnect detection pass
through untouched; only paths under /v1 need the key (/health and /metrics stay open).
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError


class APIKeyMiddleware:
    """Answers requests to /v1/* without `Authorization: Bearer <api_key>` with an OpenAI-shaped 401."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError(
                    401,
                    "invalid or missing API key: send `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
