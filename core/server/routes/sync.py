"""Sync: the routes :mod:`metatrail.sync` uses to exchange only missing events, plus a digest to compare sites.

``GET /api/v1/sync/ids`` pages the log as ``(seq, id)`` pairs after a cursor; ``POST /api/v1/sync/fetch`` returns
bodies by id; ``POST /api/v1/sync/missing`` says which ids this server lacks; ``POST /api/v1/sync/push`` stores
events with their origin sites. ``GET /api/v1/events`` pages whole events (for ``RemoteStore.iter_events``). Reads
honour the token's pipeline restriction, and so does ``missing``: to a token limited to some pipelines, an event it
may not read is missing (else the answer would tell it whether such an event exists). Answers with event bodies are
bounded in bytes (``max_fetch_bytes``): ``fetch`` names the ids it did not get to, ``events`` says ``more``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Query
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from metatrail.server.auth import ADMIN, READ, SITE_RE, WRITE, current, policy, refuse_foreign_pipelines, writing_site
from metatrail.server.errors import ApiError
from metatrail.server.limits import read_json
from metatrail.server.routes import make_router
from metatrail.server.routes.common import (
    EVENT_ID_PATTERN,
    EVENT_SCHEMA,
    UUID_PATTERN,
    checked_events,
    json_body,
    services,
    submit,
)
from metatrail.sync import Filter

router = make_router()
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
IDS_SCHEMA = {"type": "object", "required": ["ids"],
              "properties": {"ids": {"type": "array", "maxItems": 10000,
                                     "items": {"type": "string", "pattern": EVENT_ID_PATTERN}}}}
FETCH_SCHEMA = {"type": "object", "required": ["ids"],
                "properties": {"ids": {"type": "array", "maxItems": 10000,
                                       "items": {"type": "string", "pattern": EVENT_ID_PATTERN}},
                               "partial": {"type": "boolean", "description":
                                           "the client takes an answer cut at the server's byte bound, with the ids "
                                           "it did not get to in 'rest' (without it, such an answer is a 413)"}}}
PUSH_SCHEMA = {"type": "object", "required": ["events"],
               "properties": {"events": {"type": "array", "items": EVENT_SCHEMA},
                              "origins": {"type": "array", "items": {"type": ["string", "null"]}}}}


def _filter(request: Request, pipeline: str | None, run_id: str | None, since: float | None) -> Filter:
    return Filter(pipeline=pipeline, run_id=run_id, since=since, pipelines=current(request).pipelines)


async def _ids(request: Request, limit: int) -> list[str]:
    return (await _ids_body(request, limit))[0]


async def _ids_body(request: Request, limit: int) -> tuple[list[str], dict[str, Any]]:
    body = await read_json(request, max_bytes=limit * 80 + 1024, max_depth=4)
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or len(ids) > limit:
        raise ApiError(422, "invalid_ids", f"send {{\"ids\": [...]}} with at most {limit} event ids")
    if not all(isinstance(i, str) and _EVENT_ID.fullmatch(i) for i in ids):
        raise ApiError(422, "invalid_ids", "event ids are 64 lower-case hex characters")
    return ids, body


@router.get("/api/v1/sync/ids", tags=["sync"])
@policy(READ)
async def sync_ids(request: Request, after: int = Query(0, ge=0, le=2**62), limit: int = Query(2000, ge=0, le=10000),
                   pipeline: str | None = Query(None, max_length=1024),
                   run_id: str | None = Query(None, pattern=UUID_PATTERN),
                   since: float | None = Query(None, ge=-1e11, le=1e11)) -> dict[str, Any]:
    """The next ``(seq, id)`` pairs of the log after ``after``; ``last`` is where to resume. ``limit=0`` only
    counts what remains."""
    svc = services(request)
    filt = _filter(request, pipeline, run_id, since)
    if limit == 0:
        remaining = await run_in_threadpool(svc.log.count_after, after, filt)
        return {"site": svc.config.site, "items": [], "last": after, "more": remaining > 0, "remaining": remaining}
    page = await run_in_threadpool(svc.log.page, after, filt, limit)
    return {"site": svc.config.site, "items": page.items, "last": page.last, "more": page.more}


@router.post("/api/v1/sync/fetch", tags=["sync"], openapi_extra=json_body(FETCH_SCHEMA))
@policy(READ)
async def sync_fetch(request: Request) -> Response:
    """The events with these ids (those the token may read), with their origin sites, up to the server's byte bound
    (at least one event). With ``"partial": true`` an answer cut there lists the ids it did not get to in ``rest``
    (ask again for them); without it (a client that would take a cut answer for the whole) such an answer is a 413."""
    svc = services(request)
    ids, body = await _ids_body(request, svc.config.max_ids)
    found, rest = await run_in_threadpool(svc.log.fetch_bounded, ids, _filter(request, None, None, None),
                                          svc.config.max_fetch_bytes)
    if rest and body.get("partial") is not True:
        raise ApiError(413, "fetch_too_large", f"these events come to more than {svc.config.max_fetch_bytes} bytes; "
                       "ask for fewer ids at a time, or send \"partial\": true and ask again for the ids in 'rest' "
                       "(what a current metatrail client does)")
    # Stored bodies are canonical JSON text already: splice them in rather than decode and encode them again.
    parts = [f'{{"id":"{s.id}","site":{json.dumps(s.site)},"event":{s.text}}}' for s in found]
    tail = ',"rest":' + json.dumps(rest) if rest else ""
    return Response(('{"events":[' + ",".join(parts) + "]" + tail + "}").encode("utf-8"),
                    media_type="application/json")


@router.post("/api/v1/sync/missing", tags=["sync"], openapi_extra=json_body(IDS_SCHEMA))
@policy(WRITE)
async def sync_missing(request: Request) -> dict[str, Any]:
    """Which of these event ids this server does not have. To a token limited to some pipelines, an event it may not
    read is missing: ids are content hashes, and the answer must not tell it whether such an event exists."""
    svc = services(request)
    ids = await _ids(request, svc.config.max_ids)
    return {"missing": await run_in_threadpool(svc.log.missing_for, ids, _filter(request, None, None, None))}


def _refuse_own_site_claims(request: Request, origins: list[Any], writer_site: str, own_site: str) -> None:
    """Origins are the pushing side's word: a client that pulled site A's events pushes them on to its own site's
    server naming A, so a write token may relay other sites' events. It may not pass events off as this server's
    own site's unless it writes for that site (or is an admin's): 403, nothing stored."""
    if writer_site == own_site or ADMIN in current(request).scopes:
        return
    if own_site in origins:
        raise ApiError(403, "site_forbidden", f"this token writes for site {writer_site!r}; it cannot push events as "
                       f"recorded at this server's own site {own_site!r}")


@router.post("/api/v1/sync/push", status_code=201, tags=["sync"], openapi_extra=json_body(PUSH_SCHEMA))
@policy(WRITE)
async def sync_push(request: Request) -> JSONResponse:
    """Store pushed events (all or nothing). ``origins`` names the site each event was first recorded at (null:
    the pushing site); events without one are recorded under the token's site."""
    svc = services(request)
    body = await read_json(request, max_bytes=svc.config.max_batch_bytes, max_depth=svc.config.max_depth,
                           check=False)
    events = body.get("events") if isinstance(body, dict) else None
    origins = body.get("origins") if isinstance(body, dict) else None
    if not isinstance(events, list):
        raise ApiError(422, "invalid_push", 'send {"events": [...], "origins": [...]}')
    if len(events) > svc.config.max_batch_events:
        raise ApiError(413, "batch_too_large", f"at most {svc.config.max_batch_events} events per push")
    if origins is None:
        origins = [None] * len(events)
    if not isinstance(origins, list) or len(origins) != len(events) or not all(
            o is None or (isinstance(o, str) and SITE_RE.fullmatch(o)) for o in origins):
        raise ApiError(422, "invalid_origins", "origins must list one site name (or null) per event")
    checked = checked_events(events, max_depth=svc.config.max_depth)
    pipelines = refuse_foreign_pipelines(request, checked)
    default = writing_site(request)
    _refuse_own_site_claims(request, origins, default, svc.config.site)
    sites = [origin or default for origin in origins]
    inserted = (await submit(svc, checked, default, sites, pipelines=pipelines)).inserted  # all or nothing
    return JSONResponse({"received": len(events), "inserted": inserted}, status_code=201)


@router.get("/api/v1/sync/digest", tags=["sync"])
@policy(READ)
async def sync_digest(request: Request, pipeline: str | None = Query(None, max_length=1024)) -> dict[str, Any]:
    """A digest of the set of events this token can read: two sites hold the same events when digests match."""
    svc = services(request)
    digest: dict[str, Any] = await run_in_threadpool(svc.log.digest, _filter(request, pipeline, None, None))
    return {"site": svc.config.site, **digest}


@router.get("/api/v1/events", tags=["sync"])
@policy(READ)
async def list_events(request: Request, after: int = Query(0, ge=0, le=2**62),
                      limit: int = Query(1000, ge=1, le=5000), pipeline: str | None = Query(None, max_length=1024),
                      run_id: str | None = Query(None, pattern=UUID_PATTERN),
                      since: float | None = Query(None, ge=-1e11, le=1e11)) -> Response:
    """Whole events in log order after ``after`` (``RemoteStore.iter_events``): at most ``limit``, and no more than
    the server's byte bound of bodies (at least one); ``more`` says whether to ask again after the last one."""
    svc = services(request)
    rows, cut = await run_in_threadpool(svc.log.events_after_bounded, after,
                                        _filter(request, pipeline, run_id, since), limit, svc.config.max_fetch_bytes)
    parts = [f'{{"seq":{seq},"id":"{s.id}","site":{json.dumps(s.site)},"event":{s.text}}}' for seq, s in rows]
    more = "true" if cut or len(rows) == limit else "false"
    return Response(('{"events":[' + ",".join(parts) + '],"more":' + more + "}").encode("utf-8"),
                    media_type="application/json")
