"""The error a request's own parameters raise, wherever the engine finds them wrong."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `param` names it (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
