"""The application factory: routers per area, error handlers, the body-size cap, and the services' lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from metatrail import __version__
from metatrail.server import errors
from metatrail.server.auth import route_policy
from metatrail.server.config import ServerConfig
from metatrail.server.hotpath import HotRoutes, hot_handlers
from metatrail.server.limits import BodyLimit
from metatrail.server.routes import admin, federation, ingest, meta, queries, sync
from metatrail.server.services import Services

# Routes outside the routers (FastAPI's own), each with its explicit policy: the API description is public.
FRAMEWORK_ROUTES = {"/openapi.json": "public"}
# Routes served without FastAPI's routing (metatrail.server.hotpath): the ingest paths producers call per event.
HOT_ROUTES = (("POST", "/api/v1/lineage"), ("POST", "/api/v1/lineage/batch"), ("POST", "/api/v1/sync/push"))


class _App(FastAPI):
    """FastAPI with :data:`HOT_ROUTES` served in front of its middleware stack (:mod:`metatrail.server.hotpath`),
    their bodies capped at ``hot_body_limit`` bytes. The stack is built at the first request, when every route is
    in place."""

    hot_body_limit = 0

    def build_middleware_stack(self) -> ASGIApp:
        return HotRoutes(super().build_middleware_stack(),
                         handlers=hot_handlers(_flatten(list(self.routes)), HOT_ROUTES),
                         error_handlers=self.exception_handlers, max_body_bytes=self.hot_body_limit)


def create_app(config: ServerConfig, *, services: Services | None = None) -> FastAPI:
    """A FastAPI app serving ``config.store``. The store is opened (and migrated) here; background work starts
    with the app's lifespan and stops, writing what is queued, when it ends."""
    svc = services or Services.open(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc.start_background()
        try:
            yield
        finally:
            svc.close()

    app = _App(title="metatrail", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
               redirect_slashes=False,
               description="OpenLineage ingest, sync, queries and federation for metatrail stores.")
    app.state.services = svc
    errors.install(app)
    for module in (meta, ingest, sync, queries, federation, admin):
        app.include_router(module.router)
    # Declare the bearer scheme in the API description (clients and fuzzers read it); checks are in PolicyRoute.
    original_openapi = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=config.max_batch_bytes)
    app.hot_body_limit = config.max_batch_bytes
    return app


def _flatten(routes: list[Any]) -> Iterator[Any]:
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI ≥ 0.16x keeps included routers as one route
        if inner is not None:
            yield from _flatten(list(inner.routes))
        else:
            yield route


def route_table(app: FastAPI) -> list[tuple[str, frozenset[str], str | None]]:
    """Every route of ``app`` as ``(path, methods, policy)``; policy None means the route is denied to everyone."""
    table = []
    for route in _flatten(list(app.routes)):
        methods = frozenset(getattr(route, "methods", None) or ())
        policy = route_policy(route) or FRAMEWORK_ROUTES.get(route.path)
        table.append((route.path, methods, policy))
    return table
