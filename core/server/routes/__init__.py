"""The HTTP API, one module per area; each exposes ``router``, whose routes are
:class:`~metatrail.server.auth.PolicyRoute` (the declared policy is enforced before the handler runs)."""

from __future__ import annotations

from fastapi import APIRouter

from metatrail.server.auth import PolicyRoute


def make_router() -> APIRouter:
    """A router whose routes enforce their declared policies."""
    return APIRouter(route_class=PolicyRoute)
