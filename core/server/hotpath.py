"""A direct way in for the ingest routes that producers call once per event.

FastAPI reaches a route through its error, telemetry and body-limit middleware, its exception and exit-stack layers,
and then matches the path against each included router in turn and again inside the one that matched (three
matches for ``POST /api/v1/lineage``). For a one-event POST, measured in-process (the HTTP server's own parsing
left out), skipping them took the application's time from about 390 to 300 µs. :class:`HotRoutes` wraps the
application's whole middleware stack and calls the named routes' handlers directly, looked up by method and exact
path, behind the same body-size cap (:class:`~metatrail.server.limits.BodyLimit`). A handler here is the route's
own guarded handler (:class:`~metatrail.server.auth.PolicyRoute`): the same policy check, the same code; only the
routing is skipped. The routes stay registered with FastAPI, which still describes them in the API and answers
every other method and path. FastAPI's own OpenTelemetry instrumentation, when a user has configured it, still
wraps these requests (it sits in front of the stack); its exception middleware does not see their errors.

Errors are answered as FastAPI's middleware would: by the application's exception handlers, looked up along the
exception's class hierarchy; an exception with none of its own gets the catch-all handler's answer (500, logged) and
is raised again after it, as Starlette's error middleware does, so the ASGI server sees it too.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from metatrail.server.limits import BodyLimit, BodyTooLarge

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[..., Any]  # (request, exc) -> Response, or an awaitable of one


def hot_handlers(routes: Iterable[Any], wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Handler]:
    """The guarded handlers of the ``wanted`` ``(method, path)`` pairs among ``routes`` (an app's routes, with
    included routers flattened); a pair without a route is an error."""
    want = set(wanted)
    found: dict[tuple[str, str], Handler] = {}
    for route in routes:
        for method in getattr(route, "methods", None) or ():
            key = (method, getattr(route, "path", None))
            if key in want and hasattr(route, "get_route_handler"):
                found[key] = route.get_route_handler()
    missing = want - set(found)
    if missing:
        raise RuntimeError(f"hot routes not found among the app's routes: {sorted(missing)}")
    return found


class HotRoutes:
    """ASGI middleware around an application's middleware stack: serve ``handlers`` (``(method, path)`` → handler)
    directly, bodies capped at ``max_body_bytes``; pass everything else to ``app``. See the module docstring."""

    def __init__(self, app: ASGIApp, *, handlers: Mapping[tuple[str, str], Handler],
                 error_handlers: Mapping[Any, ErrorHandler], max_body_bytes: int) -> None:
        self.app = app
        self.handlers = dict(handlers)
        self.error_handlers = {k: v for k, v in error_handlers.items() if isinstance(k, type) and k is not Exception}
        self.catch_all = error_handlers.get(Exception) or error_handlers.get(500)
        self._capped = BodyLimit(self._serve, max_bytes=max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in self.handlers:
            await self._capped(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.handlers[(scope["method"], scope["path"])](request)
        except BodyTooLarge:
            raise  # the body cap around this answers it (413)
        except Exception as exc:
            own = self._error_handler(exc)
            unexpected = own is None
            error_handler = own or self.catch_all
            if error_handler is None:
                raise
            answer = error_handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
            await response(scope, receive, send)
            if unexpected:
                raise
            return
        await response(scope, receive, send)

    def _error_handler(self, exc: Exception) -> ErrorHandler | None:
        for cls in type(exc).__mro__:
            found = self.error_handlers.get(cls)
            if found is not None:
                return found
        return None
