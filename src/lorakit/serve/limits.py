"""The request-size limit: a body over `--max-request-bytes` is refused with 413, unread.

`BodyLimit` is a plain ASGI middleware around the FastAPI app. A request whose `Content-Length`
is over the limit is answered at once, before any of its body is read. A body without one (chunked
transfer) is counted as it arrives, and reading stops at the first chunk that passes the limit:
`BodyTooLarge` is raised from `receive`, and FastAPI's body reader passes an `HTTPException`
through to the app's handler for them, which answers OpenAI's error JSON with status 413. Either
way the answer carries `Connection: close`, so the rest of the body is never read.

A request takes a row in the engine's batch only after its whole body was read and validated, so
neither a large body nor a client that sends its body slowly (or never) holds a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BodyLimit", "BodyTooLarge", "too_large_message"]

Scope = dict[str, Any]


def too_large_message(limit: int) -> str:
    """What a 413 says: the limit in bytes and the flag that sets it."""
    return f"the request body is larger than this server accepts ({limit} bytes, --max-request-bytes)"


class BodyTooLarge(HTTPException):
    """413, raised while the body is read once more than the limit has arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=too_large_message(limit), headers={"connection": "close"})


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` without reading them.

    Args:
        app: the ASGI application inside.
        max_bytes: the largest body accepted, in bytes.
    """

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer_413(send, self.max_bytes)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app sees it
    return None


async def _answer_413(send: Callable, limit: int) -> None:
    error = {"message": too_large_message(limit), "type": "invalid_request_error", "param": None, "code": None}
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
