"""Request bodies, defensively: size caps before and while reading, gzip with a decompressed-size cap (a gzip bomb
stops at the cap), strict JSON (no NaN/Infinity, valid UTF-8), and a nesting limit that never exhausts the stack.

:class:`BodyLimit` is ASGI middleware that caps every request body (the largest any route accepts); routes then read
with :func:`read_json` and their own, smaller cap.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.requests import Request

from metatrail.openlineage.validation import InvalidEvent, check_structure
from metatrail.server.errors import ApiError, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
JSON_TYPES = ("application/json", "application/x-ndjson", "text/plain")


class BodyTooLarge(Exception):
    """Raised by :class:`BodyLimit`'s ``receive`` when a streamed body passes the cap; :class:`BodyLimit` answers it
    with 413, so whatever reads the body must let it through."""


class BodyLimit:
    """Refuse (413) any request whose body exceeds ``max_bytes``: by ``Content-Length`` before reading, and by
    counting while streaming (a missing or lying ``Content-Length`` does not get past it)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await _reply(send, scope, 413 if declared > self.max_bytes else 400)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reply(send, scope, 413)


async def _reply(send: Send, scope: Scope, status: int) -> None:
    message = (f"request body larger than the server accepts ({status})" if status == 413
               else "invalid Content-Length")
    response = error_response(status, "body_too_large" if status == 413 else "bad_request", message)

    async def no_receive() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_receive, send)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 past ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress a gzip body, stopping with 413 as soon as the output passes ``max_bytes``."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, max_bytes + 1)
        if len(out) > max_bytes or inflater.unconsumed_tail:
            raise ApiError(413, "body_too_large", f"decompressed body exceeds the limit of {max_bytes} bytes")
        out += inflater.flush()
    except zlib.error as exc:
        raise ApiError(400, "bad_gzip", f"body is not valid gzip: {exc}") from None
    if len(out) > max_bytes:
        raise ApiError(413, "body_too_large", f"decompressed body exceeds the limit of {max_bytes} bytes")
    if not inflater.eof:
        raise ApiError(400, "bad_gzip", "gzip body is truncated")
    if inflater.unused_data:
        # Several gzip members, or bytes after the stream: refused rather than silently cut off.
        raise ApiError(400, "bad_gzip", "gzip body has data after its end (send one gzip member)")
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON but no double: it would be stored as null (orjson writes infinities so), not as sent.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(data: bytes, *, max_depth: int, check: bool = True) -> Any:
    """Strict JSON: 400 for invalid JSON/UTF-8 or NaN/Infinity, 422 for nesting past ``max_depth`` or NUL
    characters. ``check=False`` leaves nesting and NUL checks to the caller (event routes validate each event,
    which checks both; walking the body twice would cost a tenth of a push)."""
    if not data:
        raise ApiError(400, "invalid_json", "empty body; expected JSON")
    try:
        return _checked(orjson.loads(data), max_depth, check)  # the fast path: 2-3x the standard library
    except orjson.JSONDecodeError:
        pass  # let the standard library decide (and say why): it is the reference, orjson is stricter on big ints
    try:
        value = json.loads(data, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(422, "too_deep", f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {str(exc)[:200]}") from None
    return _checked(value, max_depth, check)


def _checked(value: Any, max_depth: int, check: bool) -> Any:
    if not check:
        return value
    try:
        # Event bodies sit one level below a batch or push wrapper, so allow for the wrapper here.
        check_structure(value, max_depth=max_depth + 2)
    except InvalidEvent as exc:
        raise ApiError(exc.status, "invalid_json", str(exc)) from None
    return value


async def read_json(request: Request, *, max_bytes: int, max_depth: int, check: bool = True) -> Any:
    """Read, decompress (``Content-Encoding: gzip``) and parse a JSON body under the limits above."""
    content_type = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    if content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", f"send JSON (Content-Type: application/json), not {content_type}")
    data = await read_body(request, max_bytes)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        data = gunzip(data, max_bytes)
    elif encoding not in ("identity", ""):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip")
    return parse_json(data, max_depth=max_depth, check=check)
