"""OpenAI-shaped error bodies, `{"error": {"message", "type", "param", "code"}}`, and the app's exception handlers."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leapserve.decoding.async_engine import EngineRequestError, QueueFullError
from leapserve.decoding.errors import InvalidRequestError

from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error the server answers with directly (unknown model, bad API key, ...)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def payload(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload().model_dump(), self.status_code, headers=self.headers)


def as_api_error(exc: Exception) -> APIError:
    """Map any exception to the error the client sees (used for responses and for errors inside streams)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(
            503,
            str(exc) or "the server is overloaded, retry later",
            "server_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, EngineRequestError):
        return APIError(500, f"the engine failed this request: {exc}", "server_error")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """400 for a body that is not JSON or does not fit the request model; `param` names the first bad field."""
    errors = exc.errors()
    cause = errors[0].get("ctx", {}).get("error")
    if isinstance(cause, InvalidRequestError):  # raised by a request model's own validator
        return APIError(400, str(cause), param=cause.param)
    if errors[0]["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}")

    def field(error: dict) -> str:
        return ".".join(str(part) for part in error["loc"] if part != "body")

    def explained(error: dict) -> str:
        if error["type"] == "extra_forbidden":
            return "not a parameter this server knows (see docs/api.md for what it supports)"
        return error["msg"]

    message = "; ".join(f"{field(e) or 'body'}: {explained(e)}" for e in errors)
    return APIError(400, message, param=field(errors[0]).split(".")[0] or None)


def install_exception_handlers(app: FastAPI) -> None:
    # FastAPI's decorator, as Starlette's add_exception_handler is typed for handlers of any Exception
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, APIError):  # FastAPI wraps what reading the body raised (the size limit's 413)
            return exc.__cause__.response()
        messages = {
            404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }
        error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)
        return error.response()

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    for exc_type in (APIError, InvalidRequestError, QueueFullError, EngineRequestError, Exception):
        app.add_exception_handler(exc_type, on_error)
