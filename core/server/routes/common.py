"""Helpers the route modules share: the services of a request, validated identifiers, event submission."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import Request

from metatrail.errors import EventError
from metatrail.openlineage.events import canonical_bytes
from metatrail.openlineage.validation import InvalidEvent, validate_event
from metatrail.server.errors import ApiError
from metatrail.server.services import Services
from metatrail.server.writer import Overloaded, PipelineForbidden
from metatrail.store.base import CanonicalEvent, IngestResult

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


def checked_event(event: Any, *, max_depth: int) -> tuple[str, CanonicalEvent]:
    """Validate one decoded event and serialise it once (canonically), for the checks and then for the store; return
    its kind and the event with its canonical bytes. Raises :class:`InvalidEvent`."""
    canonical = None
    if isinstance(event, dict):
        try:
            canonical = canonical_bytes(event)
        except (TypeError, ValueError) as exc:
            raise InvalidEvent(f"not JSON data: {exc}") from None
    kind = validate_event(event, max_depth=max_depth, text=canonical)
    assert canonical is not None  # validate_event refuses anything but a JSON object
    return kind, CanonicalEvent(event, canonical)


def checked_events(events: Sequence[Any], *, max_depth: int, max_errors: int | None = None) -> list[CanonicalEvent]:
    """:func:`checked_event` for each event of a batch, all or nothing: when any is invalid, raise an
    :class:`ApiError` (the status of the first problem) listing each problem (the first ``max_errors`` sought, at
    most 100 shown)."""
    checked: list[CanonicalEvent] = []
    errors: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        try:
            checked.append(checked_event(event, max_depth=max_depth)[1])
        except InvalidEvent as exc:
            errors.append({"index": i, "status": exc.status, "path": exc.path, "message": exc.reason})
            if max_errors is not None and len(errors) >= max_errors:
                break
    if errors:
        raise ApiError(errors[0]["status"], "invalid_events", f"{len(errors)} invalid event(s); nothing stored",
                       details=errors[:100])
    return checked


async def submit(svc: Services, events: Sequence[Mapping[str, Any]], site: str | None,
                 sites: Sequence[str | None] | None = None, *, pipelines: frozenset[str] | None = None) -> IngestResult:
    """Hand validated events to the writer (received from ``site``, or ``sites``: one per event) and wait until they
    are committed, all in one transaction; 503 when overloaded or the store fails (the client retries: ingest is
    idempotent), and when the writer commits nothing for ``write_wait_s`` (they stay queued, see :func:`_committed`).
    ``pipelines``: what a restricted writer may read; 403 ``pipeline_forbidden`` (nothing stored) when one of the
    events' runs is stored under another pipeline."""
    try:
        future = svc.writer.submit(events, site, sites, pipelines=pipelines)
    except Overloaded as exc:
        raise ApiError(503, "overloaded", f"{exc}; retry later", headers={"Retry-After": "1"}) from None
    try:
        # A job written inline comes back resolved: skip the hop through the loop's self-pipe.
        if future.done():
            return future.result()
        return await _committed(svc, asyncio.wrap_future(future))
    except ApiError:
        raise
    except EventError as exc:
        raise ApiError(422, "invalid_event", str(exc)) from None
    except PipelineForbidden as exc:
        raise ApiError(403, "pipeline_forbidden", str(exc)) from None
    except Exception:  # the events were valid: a store failure is temporary from the client's view
        # What failed is in the server's log (the writer logs it); internals are not the client's business.
        raise ApiError(503, "store_unavailable", "the store could not write the events; retry later",
                       headers={"Retry-After": "1"}) from None


async def _committed(svc: Services, waiting: asyncio.Future[IngestResult]) -> IngestResult:
    """The job's result, waited for as long as the writer goes on committing (a queue of other requests' events is
    worked through, however long it is); 503 ``store_busy`` once it has committed nothing for ``write_wait_s``: a
    store that does not take writes (a lock held elsewhere, a database connection gone silent) must not hold every
    request for ever. The job stays queued and is written when the store takes writes (a retry stores nothing
    twice)."""
    progress = svc.writer.transactions
    while True:
        done, _ = await asyncio.wait((waiting,), timeout=svc.config.write_wait_s)  # never cancels the job
        if done:
            return waiting.result()
        if svc.writer.transactions == progress:
            waiting.add_done_callback(_retrieved)
            raise ApiError(503, "store_busy", f"the store has taken no write for {svc.config.write_wait_s:g} s; "
                           "retry later (the events stay queued: a retry stores nothing twice)",
                           headers={"Retry-After": "5"})
        progress = svc.writer.transactions


def _retrieved(waiting: asyncio.Future[IngestResult]) -> None:
    # Nobody awaits the job any more: take its outcome, so that asyncio does not log a failure as never retrieved.
    if not waiting.cancelled():
        waiting.exception()
