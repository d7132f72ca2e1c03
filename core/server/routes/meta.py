"""Public routes: liveness and version (the only routes that need no token, besides the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from metatrail import __version__
from metatrail.server.auth import PUBLIC, policy
from metatrail.server.routes import make_router
from metatrail.server.routes.common import services

router = make_router()


@router.get("/health", tags=["meta"])
@policy(PUBLIC)
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/api/v1/version", tags=["meta"])
@policy(PUBLIC)
async def version(request: Request) -> dict[str, Any]:
    """The server's version, API version and site name."""
    return {"version": __version__, "api": "v1", "site": services(request).config.site}
