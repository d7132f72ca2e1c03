"""OpenLineage ingest: ``POST /api/v1/lineage`` (one event, Marquez-compatible) and ``POST /api/v1/lineage/batch``
(a JSON array, all-or-nothing). Any valid OpenLineage 2-x event from any producer; run, dataset and job events.
Idempotent: an event already stored is acknowledged again and stored once."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from metatrail.openlineage.validation import InvalidEvent
from metatrail.server.auth import WRITE, policy, refuse_foreign_pipelines, writing_site
from metatrail.server.errors import ApiError
from metatrail.server.limits import read_json
from metatrail.server.routes import make_router
from metatrail.server.routes.common import EVENT_SCHEMA, checked_event, checked_events, json_body, services, submit

router = make_router()


@router.post("/api/v1/lineage", status_code=201, tags=["ingest"],
             openapi_extra=json_body(EVENT_SCHEMA, "one OpenLineage event (run, dataset or job event)"),
             responses={201: {"description": "stored (or already stored); with `Accept: application/json`, the "
                                             "event's id, kind and whether this request stored it",
                              "content": {"application/json": {"schema": {
                                  "type": "object", "properties": {"id": {"type": "string"},
                                                                   "kind": {"type": "string"},
                                                                   "stored": {"type": "boolean"}}}}}},
                        400: {}, 413: {}, 422: {}})
@policy(WRITE)
async def post_lineage(request: Request) -> Response:
    """Store one OpenLineage event. 201 when stored or already stored; 400/422 as Marquez would refuse it.

    The answer is empty, as Marquez's, unless the client asks for JSON (``Accept: application/json``; metatrail's
    own client does): then it names the event's id, its kind and whether this request stored it. OpenLineage
    producers ask for nothing and read nothing; a body costs the server a second write to the socket per event, a
    twentieth of a one-event POST."""
    svc = services(request)
    body = await read_json(request, max_bytes=svc.config.max_event_bytes, max_depth=svc.config.max_depth,
                           check=False)
    try:
        kind, event = checked_event(body, max_depth=svc.config.max_depth)
    except InvalidEvent as exc:
        raise ApiError(exc.status, "invalid_event", str(exc)) from None
    pipelines = refuse_foreign_pipelines(request, [event])
    result = await submit(svc, [event], writing_site(request), pipelines=pipelines)
    if "application/json" not in request.headers.get("accept", ""):
        return Response(status_code=201)
    # orjson writes the same compact JSON as JSONResponse's json.dumps, in a fraction of the time.
    return Response(orjson.dumps({"id": event.id, "kind": kind, "stored": result.inserted == 1}), status_code=201,
                    media_type="application/json")


@router.post("/api/v1/lineage/batch", status_code=201, tags=["ingest"],
             openapi_extra=json_body({"type": "array", "items": EVENT_SCHEMA}, "a JSON array of OpenLineage events"),
             responses={201: {"description": "all stored"}, 400: {}, 413: {}, 422: {}})
@policy(WRITE)
async def post_lineage_batch(request: Request) -> JSONResponse:
    """Store a batch of events atomically: when any event is invalid nothing is stored and every problem is
    listed (status of the first)."""
    svc = services(request)
    body = await read_json(request, max_bytes=svc.config.max_batch_bytes, max_depth=svc.config.max_depth,
                           check=False)
    if not isinstance(body, list):
        raise ApiError(400, "invalid_batch", "a batch is a JSON array of events")
    if len(body) > svc.config.max_batch_events:
        raise ApiError(413, "batch_too_large", f"at most {svc.config.max_batch_events} events per batch")
    events = checked_events(body, max_depth=svc.config.max_depth, max_errors=100)
    if not events:
        return JSONResponse({"received": 0, "inserted": 0}, status_code=201)
    pipelines = refuse_foreign_pipelines(request, events)
    result = await submit(svc, events, writing_site(request), pipelines=pipelines)
    return JSONResponse({"received": result.received, "inserted": result.inserted}, status_code=201)
