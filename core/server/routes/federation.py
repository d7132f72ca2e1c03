"""Federation: peers of this server and syncing with them (admin tokens only)."""

from __future__ import annotations

from typing import Any

from fastapi import Path, Query
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from metatrail.errors import ConfigError
from metatrail.server.auth import ADMIN, policy
from metatrail.server.errors import ApiError
from metatrail.server.federation import sync_peer
from metatrail.server.limits import read_json
from metatrail.server.routes import make_router
from metatrail.server.routes.common import NAME_PATTERN, json_body, services
from metatrail.store.remote import RemoteError

router = make_router()
PEER_SCHEMA = {
    "type": "object", "required": ["name", "url"],
    "properties": {"name": {"type": "string", "pattern": NAME_PATTERN}, "url": {"type": "string", "format": "uri"},
                   "token": {"type": ["string", "null"]}, "pull": {"type": "boolean"}, "push": {"type": "boolean"},
                   "share": {"type": ["array", "null"], "items": {"type": "string"}},
                   "interval_s": {"type": ["number", "null"], "minimum": 1}},
}


@router.get("/api/v1/peers", tags=["federation"])
@policy(ADMIN)
async def list_peers(request: Request) -> dict[str, Any]:
    """Peers, with the time and outcome of their last sync (their tokens are never shown)."""
    return {"peers": await run_in_threadpool(services(request).peers.list)}


@router.post("/api/v1/peers", status_code=201, tags=["federation"], openapi_extra=json_body(PEER_SCHEMA))
@policy(ADMIN)
async def add_peer(request: Request) -> JSONResponse:
    """Add (or replace) a peer: its URL, the token we present to it, whether to pull and/or push, which pipelines
    to push (``share``; null = all) and an optional sync interval."""
    body = await read_json(request, max_bytes=64 * 1024, max_depth=8)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("url"), str):
        raise ApiError(422, "invalid_peer", "send {name, url, token?, pull?, push?, share?, interval_s?}")
    share = body.get("share")
    interval = body.get("interval_s")
    if (share is not None and (not isinstance(share, list) or not all(isinstance(s, str) for s in share))) or (
            interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float)))) or (
            body.get("token") is not None and not isinstance(body.get("token"), str)) or not all(
            isinstance(body.get(k, False), bool) for k in ("pull", "push")):
        raise ApiError(422, "invalid_peer", "share lists pipeline names, interval_s is a number, pull/push booleans")
    try:
        peer = await run_in_threadpool(lambda: services(request).peers.add(
            body["name"], body["url"], token=body.get("token"), pull=body.get("pull", True),
            push=body.get("push", False), share=share, interval_s=float(interval) if interval is not None else None))
    except ConfigError as exc:
        raise ApiError(422, "invalid_peer", str(exc)) from None
    return JSONResponse(peer, status_code=201)


@router.delete("/api/v1/peers/{name}", tags=["federation"])
@policy(ADMIN)
async def remove_peer(request: Request, name: str = Path(pattern=NAME_PATTERN)) -> dict[str, Any]:
    """Remove a peer (its cursors stay, so re-adding it resumes)."""
    if not await run_in_threadpool(services(request).peers.remove, name):
        raise ApiError(404, "not_found", f"no peer {name}")
    return {"removed": name}


@router.post("/api/v1/peers/{name}/sync", tags=["federation"])
@policy(ADMIN)
async def sync_with_peer(request: Request, name: str = Path(pattern=NAME_PATTERN),
                         direction: str = Query("both", pattern=r"^(pull|push|both)$")) -> dict[str, Any]:
    """Sync with a peer now; returns what each direction moved."""
    svc = services(request)
    try:
        result: dict[str, Any] = await run_in_threadpool(sync_peer, svc, name, direction)
    except KeyError:
        raise ApiError(404, "not_found", f"no peer {name}") from None
    except RemoteError as exc:
        raise ApiError(502, "peer_failed", f"sync with {name} failed: {exc}") from None
    except ConfigError as exc:
        raise ApiError(409, "peer_refused", str(exc)) from None
    return result
