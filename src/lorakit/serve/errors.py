"""Errors the server answers with: each carries its HTTP status and OpenAI's error `type` and `code`."""

from __future__ import annotations

from lorakit.errors import LorakitError

__all__ = ["BadRequest", "Overloaded", "ServeError", "Unauthorized", "Unavailable", "UnknownModel"]


class ServeError(LorakitError):
    """A request the server refuses; `status`, `type` and `code` go into OpenAI's error JSON."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError, ValueError):
    """400: the request cannot be served as written."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(ServeError, PermissionError):
    """401: missing or wrong API key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class UnknownModel(ServeError, KeyError):
    """404: `model` names neither the base nor a loaded adapter (or one being unloaded)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class Unavailable(ServeError):
    """503: the server is stopping; the request was not run, or was cancelled at the end of the grace period."""

    status = 503
    type = "server_error"
    code = "server_stopping"


class Overloaded(ServeError):
    """429: the waiting queue is full; retry after `retry_after` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retry_after = 1
