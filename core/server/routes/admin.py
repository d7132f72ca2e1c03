"""Administration: tokens (create, list, revoke), projection rebuild, and the server's internal counters."""

from __future__ import annotations

from typing import Any

from fastapi import Path
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from metatrail.errors import ConfigError
from metatrail.server.auth import ADMIN, policy
from metatrail.server.errors import ApiError
from metatrail.server.limits import read_json
from metatrail.server.routes import make_router
from metatrail.server.routes.common import json_body, services

router = make_router()
TOKEN_SCHEMA = {
    "type": "object", "required": ["scopes", "site"],
    "properties": {"name": {"type": "string", "maxLength": 200},
                   "scopes": {"type": "array", "items": {"type": "string", "enum": ["read", "write", "admin"]}},
                   "site": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                   "pipelines": {"type": ["array", "null"], "items": {"type": "string"}}},
}


@router.get("/api/v1/admin/tokens", tags=["admin"])
@policy(ADMIN)
async def list_tokens(request: Request) -> dict[str, Any]:
    """Every token, without secrets."""
    return {"tokens": await run_in_threadpool(services(request).tokens.list)}


@router.post("/api/v1/admin/tokens", status_code=201, tags=["admin"], openapi_extra=json_body(TOKEN_SCHEMA))
@policy(ADMIN)
async def create_token(request: Request) -> JSONResponse:
    """Create a token; the response holds the token text, shown this once."""
    body = await read_json(request, max_bytes=64 * 1024, max_depth=8)
    if not isinstance(body, dict) or not isinstance(body.get("site"), str) or not isinstance(body.get("scopes"), list):
        raise ApiError(422, "invalid_token_request", "send {name?, scopes: [...], site, pipelines?}")
    pipelines = body.get("pipelines")
    if pipelines is not None and (not isinstance(pipelines, list) or not all(isinstance(p, str) for p in pipelines)):
        raise ApiError(422, "invalid_token_request", "pipelines is a list of pipeline names")
    if not all(isinstance(s, str) for s in body["scopes"]) or not isinstance(body.get("name", ""), str):
        raise ApiError(422, "invalid_token_request", "scopes are strings; name is a string")
    try:
        record, text = await run_in_threadpool(lambda: services(request).tokens.create(
            name=body.get("name", ""), scopes=body["scopes"], site=body["site"], pipelines=pipelines))
    except ConfigError as exc:
        raise ApiError(422, "invalid_token_request", str(exc)) from None
    return JSONResponse({**record, "token": text}, status_code=201)


@router.delete("/api/v1/admin/tokens/{token_id}", tags=["admin"])
@policy(ADMIN)
async def revoke_token(request: Request, token_id: str = Path(pattern=r"^[0-9a-f]{12}$")) -> dict[str, Any]:
    """Revoke a token by id."""
    if not await run_in_threadpool(services(request).tokens.revoke, token_id):
        raise ApiError(404, "not_found", f"no active token {token_id}")
    return {"revoked": token_id}


@router.post("/api/v1/admin/rebuild", tags=["admin"])
@policy(ADMIN)
async def rebuild(request: Request) -> dict[str, Any]:
    """Recompute every projection from the event log."""
    await run_in_threadpool(services(request).store.rebuild_projections)
    return {"rebuilt": True}


@router.get("/api/v1/admin/status", tags=["admin"])
@policy(ADMIN)
async def status(request: Request) -> dict[str, Any]:
    """Internal counters: writer queue and commits, fan-out, scheduled federation runs."""
    svc = services(request)
    return {
        "site": svc.config.site,
        "writer": {"pending": svc.writer.pending, "committed": svc.writer.committed,
                   "transactions": svc.writer.transactions},
        "forward": await run_in_threadpool(svc.forwarder.stats) if svc.forwarder is not None else None,
        "scheduled_syncs": svc.scheduler.runs if svc.scheduler is not None else 0,
    }
