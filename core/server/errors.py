"""HTTP errors of the API: one exception, one JSON shape ``{"error": code, "message": text, "details": …}``.

Routes raise :class:`ApiError`; :func:`install` maps it, the store's errors (503, retry later) and anything
unexpected (500, logged, no internals in the body) to responses. FastAPI's own request validation stays 422.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError

from metatrail.errors import StoreError

log = logging.getLogger("metatrail.server")


class ApiError(Exception):
    """An error response: ``status``, a short machine-readable ``code``, a message that says how to fix it."""

    def __init__(self, status: int, code: str, message: str, *, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every failing route returns."""
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the error handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(DataError)
    async def _data_error(_request: Request, exc: DataError) -> JSONResponse:
        # A value the database refuses to even compare (a route let through something its checks should have
        # caught): the request is at fault, not the server.
        log.warning("metatrail server: database refused a value: %s", str(exc).splitlines()[0][:200])
        return error_response(400, "bad_value", "a value in the request cannot be stored or compared")

    @app.exception_handler(OperationalError)
    async def _operational(_request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("metatrail server: database unavailable: %s", str(exc).splitlines()[0][:200])
        return error_response(503, "store_unavailable", "the store is unavailable; retry later",
                              headers={"Retry-After": "1"})

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        log.warning("metatrail server: store error: %s", exc)
        return error_response(503, "store_unavailable", "the store is unavailable; retry later",
                              headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("metatrail server: unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
        return error_response(500, "internal", "internal error; see the server log")
