"""Limits on what a request may send and on what an error sends back.

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)   # 413 past it, before the body is read
    {"loc": [...], "msg": ..., "input": clip_input(value)}                # a 422 echoes a short prefix at most

A body larger than MOEDISCO_MAX_REQUEST_BYTES is refused while it streams in, and no error echoes more than a short,
bounded rendering of the value it is about (`reprlib` stops walking a big value early): FastAPI's own 422 echoes the
whole input, and an answer larger than Ray Serve's proxy-to-replica gRPC message limit comes back as a 500.
"""

from __future__ import annotations

import reprlib

from fastapi import HTTPException, status
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_ECHO_CHARS = 120
_ECHO = reprlib.Repr()  # keyword arguments only from Python 3.12
_ECHO.maxlevel, _ECHO.maxdict, _ECHO.maxlist, _ECHO.maxstring, _ECHO.maxother, _ECHO.maxlong = 2, 4, 4, 60, 60, 40


def clip_input(value):
    """What an error may echo of `value`: short scalars as they are, everything else a bounded text rendering."""
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**15):
        return value
    if isinstance(value, str) and len(value) <= MAX_ECHO_CHARS:
        return value
    text = value if isinstance(value, str) else _ECHO.repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def too_large(max_bytes: int) -> str:
    return f"request body larger than {max_bytes} bytes (MOEDISCO_MAX_REQUEST_BYTES, MOEDISCO_MAX_UPLOAD_BYTES)"


class BodyLimit:
    """ASGI middleware: a request whose Content-Length exceeds `max_bytes` gets 413 at once; a chunked one as soon
    as what arrived exceeds it (the route reading the body gets an HTTPException(413), which FastAPI passes on)."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.default_bytes, self.larger = app, max_bytes, larger or {}

    def limit(self, path: str) -> int:
        """The cap of a request to `path`: a larger one under a prefix of `larger` (uploads), else `max_bytes`."""
        return next((cap for prefix, cap in self.larger.items() if path.startswith(prefix)), self.default_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            response = JSONResponse({"detail": too_large(max_bytes)}, status.HTTP_413_CONTENT_TOO_LARGE)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, too_large(max_bytes))
            return message

        await self.app(scope, limited, send)
