"""Helpers the route modules share: the services of a request, validated identifiers, event submission."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import Request

from metatrail.errors import EventError
from metatrail.server.errors import ApiError
from metatrail.server.services import Services
from metatrail.server.writer import Overloaded
from metatrail.store.base import IngestResult

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
EVENT_ID_PATTERN = r"^[0-9a-f]{64}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
HASH_PATTERN = r"^[0-9a-fA-F]{8,128}(\.dir)?$"
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9+._-]{0,31}:[^\x00-\x1f]{1,2048}$"
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["eventTime", "producer", "run", "job"],
    "properties": {
        "eventType": {"type": "string", "enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "eventTime": {"type": "string", "format": "date-time"},
        "producer": {"type": "string"},
        "schemaURL": {"type": "string"},
        "run": {"type": "object", "required": ["runId"],
                "properties": {"runId": {"type": "string", "format": "uuid"}, "facets": {"type": "object"}}},
        "job": {"type": "object", "required": ["namespace", "name"],
                "properties": {"namespace": {"type": "string"}, "name": {"type": "string"},
                               "facets": {"type": "object"}}},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["namespace", "name"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["namespace", "name"]}},
    },
}


def services(request: Request) -> Services:
    """The application's :class:`Services`."""
    svc: Services = request.app.state.services
    return svc


def json_body(schema: Mapping[str, Any], description: str = "") -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON request body (for routes that parse their body themselves)."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {"application/json": {"schema": dict(schema)}}}}


async def submit(svc: Services, events: Sequence[Mapping[str, Any]], site: str | None) -> IngestResult:
    """Hand validated events to the writer and wait until they are committed; 503 when overloaded or the store
    fails (the client retries: ingest is idempotent)."""
    try:
        future = svc.writer.submit(events, site)
    except Overloaded as exc:
        raise ApiError(503, "overloaded", f"{exc}; retry later", headers={"Retry-After": "1"}) from None
    try:
        # A job written inline comes back resolved: skip the hop through the loop's self-pipe.
        return future.result() if future.done() else await asyncio.wrap_future(future)
    except EventError as exc:
        raise ApiError(422, "invalid_event", str(exc)) from None
    except Exception as exc:  # the events were valid: a store failure is temporary from the client's view
        raise ApiError(503, "store_unavailable", f"the store could not write the events ({type(exc).__name__}); "
                       "retry later", headers={"Retry-After": "1"}) from None
