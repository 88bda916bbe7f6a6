"""The OpenAI-compatible HTTP API over `AsyncLLMEngine`: completions, chat completions, models, health, metrics,
and vLLM's tokenize, detokenize and version.

The engine runs on its own thread; uvicorn's event loop runs the handlers (`completions`, `chat`), which submit
requests through `serving` and stream the engine's cumulative outputs back as JSON or server-sent events.
`run_server` loads the engine and serves until the process is told to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from leapserve.decoding.async_engine import AsyncLLMEngine
from leapserve.decoding.config import EngineConfig
from leapserve.decoding.sampling_params import LogitsProcessor

from . import DEFAULT_MAX_REQUEST_BYTES, chat, completions, tokenize
from .auth import APIKeyMiddleware
from .errors import APIError, install_exception_handlers
from .limits import RequestSizeLimit
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from .serving import OpenAIServing


def build_app(
    engine: AsyncLLMEngine,
    *,
    api_key: str | None,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app; `logits_processors` are added to every request's sampling parameters; bodies over
    `max_request_bytes` get a 413."""
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, metrics, logits_processors)
    app = FastAPI(title="leapserve", docs_url=None, redoc_url=None)
    install_exception_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestSizeLimit, max_bytes=max_request_bytes)  # added last: runs first

    @app.get("/health")
    async def health() -> Response:
        if engine.is_alive:
            return Response(status_code=200)
        return APIError(503, "the engine thread has stopped", "server_error").response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def get_version() -> VersionResponse:
        return tokenize.server_version()

    @app.post("/tokenize")
    async def post_tokenize(req: TokenizeRequest) -> TokenizeResponse:
        return await tokenize.tokenize(serving, req)

    @app.post("/detokenize")
    async def post_detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenize.detokenize(serving, req)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def list_models() -> ModelList:
        return serving.models()

    @v1.post("/completions")
    async def create_completion(req: CompletionRequest, http_request: Request) -> Response:
        return await completions.create_completion(serving, req, http_request)

    @v1.post("/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, http_request: Request) -> Response:
        return await chat.create_chat_completion(serving, req, http_request)

    app.include_router(v1)
    return app


def run_server(
    config: EngineConfig,
    host: str,
    port: int,
    api_key: str | None,
    *,
    logits_processors: Sequence[LogitsProcessor] = (),
    log_level: str = "info",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Load the engine, serve until SIGINT/SIGTERM, then shut the engine down."""
    engine = AsyncLLMEngine(config)
    try:
        app = build_app(
            engine, api_key=api_key, logits_processors=logits_processors, max_request_bytes=max_request_bytes
        )
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
    finally:
        engine.shutdown()
