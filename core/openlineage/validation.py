"""Server-side validation of incoming OpenLineage events: what a metatrail server accepts, and with which status.

The floor is Marquez 0.51's acceptance rules, so any event Marquez accepts is accepted here and any event it refuses is
refused with the same status (the fixtures in ``tests/data/openlineage-spec/marquez-fixtures`` name them):

* **400** (Marquez: JSON/deserialisation error or ``IllegalArgumentException``): the body is not a JSON object;
  ``eventTime`` (or ``nominalTime.nominalStartTime``) is present but not an ISO 8601 date-time with a ``T``; a
  dataset namespace does not match ``^[a-zA-Z:;=/0-9_\\-\\.@+]{1,1024}$``; a blank dataset name.
* **422** (Marquez: bean validation): a required field is missing or null (``eventTime``, ``producer``, ``run``,
  ``run.runId``, ``job``, ``job.namespace``/``name``, dataset ``namespace``/``name``, the non-null fields of the
  facets Marquez models: ``parent``, ``nominalTime``, ``jobType``, ``sql``, ``documentation``, ``schema``,
  ``symlinks``), or has the wrong JSON type.

On top of that floor, rules from the OpenLineage core schema that Marquez does not enforce, because they keep our
store sound: ``runId`` must be a UUID, ``eventType`` one of the spec's values, facets JSON objects, and (for the
store) no NUL character anywhere and nesting at most :data:`MAX_DEPTH` deep. Marquez's laxness is kept where real
producers rely on it: a missing ``schemaURL`` or ``eventType``, an ``eventTime`` without a zone, custom facets of any
shape. The kind of event (run, dataset, job) is chosen as Marquez does: by the text after the last ``/`` of
``schemaURL``; anything else is a RunEvent.

Pure functions, no I/O, no jsonschema: this runs once per ingested event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from metatrail.errors import EventError
from metatrail.store.projection import parse_event_time

MAX_DEPTH = 64
EVENT_TYPES = frozenset({"START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"})
RUN_EVENT, DATASET_EVENT, JOB_EVENT = "RunEvent", "DatasetEvent", "JobEvent"
# Marquez's pattern, plus the brackets of an IPv6 address in a URL authority (``http://[::1]:9000``, what the
# Recorder names a dataset read from such a URL): refusing them refused the project's own events.
DATASET_NAMESPACE = re.compile(r"^[a-zA-Z:;=/0-9_\-\.@+\[\]]{1,1024}$")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# The facets Marquez models, and the fields of each it requires to be non-null (besides _producer/_schemaURL).
_RUN_FACETS: dict[str, tuple[str, ...]] = {"parent": (), "nominalTime": ("nominalStartTime",)}
_JOB_FACETS: dict[str, tuple[str, ...]] = {
    "sql": ("query",), "documentation": ("description",), "jobType": ("processingType", "integration", "jobType"),
}
_DATASET_FACETS: dict[str, tuple[str, ...]] = {"documentation": ("description",), "schema": (), "symlinks": ()}


class InvalidEvent(EventError):
    """An event the server refuses; ``status`` is the HTTP status (400 or 422), ``path`` where the problem is."""

    def __init__(self, message: str, *, status: int = 422, path: str = "$") -> None:
        super().__init__(f"{path}: {message}")
        self.status = status
        self.path = path
        self.reason = message


def event_kind(event: Mapping[str, Any]) -> str:
    """``RunEvent``, ``DatasetEvent`` or ``JobEvent``, chosen as Marquez does (the ``schemaURL`` suffix)."""
    url = event.get("schemaURL")
    suffix = url.rstrip("/").rsplit("/", 1)[-1] if isinstance(url, str) else ""
    return suffix if suffix in (DATASET_EVENT, JOB_EVENT) else RUN_EVENT


def check_structure(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse nesting deeper than ``max_depth`` and NUL characters in any key or string (iteratively: a
    10,000-deep document must not exhaust the stack here)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "$")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                raise InvalidEvent(f"nested deeper than {max_depth} levels", path=path)
            for key, child in item.items():
                if "\x00" in key:
                    raise InvalidEvent("NUL character in a key", path=path)
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1, f"{path}.{key}"))
                elif isinstance(child, str) and "\x00" in child:
                    raise InvalidEvent("NUL character in a string", path=f"{path}.{key}")
        elif isinstance(item, list):
            if depth >= max_depth:
                raise InvalidEvent(f"nested deeper than {max_depth} levels", path=path)
            for i, child in enumerate(item):
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1, f"{path}[{i}]"))
                elif isinstance(child, str) and "\x00" in child:
                    raise InvalidEvent("NUL character in a string", path=f"{path}[{i}]")
        elif isinstance(item, str) and "\x00" in item:
            raise InvalidEvent("NUL character in a string", path=path)


def plainly_sound(text: bytes, *, max_depth: int = MAX_DEPTH) -> bool:
    """Whether the JSON ``text`` of a value shows, at C speed, what :func:`check_structure` would walk the decoded
    value to find: no NUL character and no nesting deeper than ``max_depth``. False means "walk it", not "invalid".

    JSON cannot carry a raw NUL (parsers refuse control characters in strings), only the escape ``\\u0000``, so a
    text without that escape holds none (a ``\\\\u0000`` that is not one makes this answer False, never wrongly
    True). Every level of nesting opens with its own ``{`` or ``[``, so their count bounds the depth (brackets inside
    strings only raise the count).
    """
    return b"\\u0000" not in text and text.count(b"{") + text.count(b"[") <= max_depth


def _object(parent: Mapping[str, Any], key: str, path: str, *, required: bool) -> Mapping[str, Any] | None:
    value = parent.get(key)
    if value is None:
        if required:
            raise InvalidEvent("must not be null", path=f"{path}.{key}")
        return None
    if not isinstance(value, dict):
        raise InvalidEvent(f"must be an object, not {type(value).__name__}", path=f"{path}.{key}")
    return value


def _text(parent: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str | None:
    value = parent.get(key)
    if value is None:
        if required:
            raise InvalidEvent("must not be null", path=f"{path}.{key}")
        return None
    if not isinstance(value, str):
        raise InvalidEvent(f"must be a string, not {type(value).__name__}", path=f"{path}.{key}")
    return value


def _time(parent: Mapping[str, Any], key: str, path: str) -> None:
    value = parent.get(key)
    if value is None:
        raise InvalidEvent("must not be null", path=f"{path}.{key}")
    try:
        parse_event_time(value)
    except EventError:
        # Marquez fails deserialisation here (a JSON error), hence 400 rather than 422.
        raise InvalidEvent(f"{value!r} is not an ISO 8601 date-time", status=400, path=f"{path}.{key}") from None
    except (ValueError, OverflowError, OSError):
        raise InvalidEvent(f"{value!r} is out of range", status=400, path=f"{path}.{key}") from None


def _facets(owner: Mapping[str, Any], key: str, path: str, modelled: Mapping[str, tuple[str, ...]]) -> None:
    facets = owner.get(key)
    if facets is None:
        return
    if not isinstance(facets, dict):
        raise InvalidEvent(f"must be an object, not {type(facets).__name__}", path=f"{path}.{key}")
    for name, facet in facets.items():
        if facet is None:
            continue  # a null facet deletes it (spec); Marquez skips it
        if not isinstance(facet, dict):
            raise InvalidEvent(f"a facet must be an object, not {type(facet).__name__}", path=f"{path}.{key}.{name}")
        required = modelled.get(name)
        if required is None:
            continue  # custom facets: any shape (and most facets are: their paths are only spelt out on error)
        where = f"{path}.{key}.{name}"
        for field in ("_producer", "_schemaURL", *required):
            if facet.get(field) is None:
                raise InvalidEvent("must not be null", path=f"{where}.{field}")
        if name == "parent":
            run = _object(facet, "run", where, required=True)
            job = _object(facet, "job", where, required=True)
            assert run is not None and job is not None
            run_id = _text(run, "runId", f"{where}.run")
            if run_id is not None and not UUID.fullmatch(run_id):
                raise InvalidEvent(f"{run_id!r} is not a UUID", path=f"{where}.run.runId")
            _text(job, "namespace", f"{where}.job")
            _text(job, "name", f"{where}.job")
        elif name == "nominalTime":
            _time(facet, "nominalStartTime", where)
        elif name == "schema":
            _named_list(facet, "fields", where, ("name",))
        elif name == "symlinks":
            _named_list(facet, "identifiers", where, ("namespace", "name"))


def _named_list(facet: Mapping[str, Any], key: str, path: str, required: tuple[str, ...]) -> None:
    items = facet.get(key)
    if items is None:
        return
    if not isinstance(items, list):
        raise InvalidEvent("must be an array", path=f"{path}.{key}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidEvent("must be an object", path=f"{path}.{key}[{i}]")
        for field in required:
            _text(item, field, f"{path}.{key}[{i}]")


def _dataset(ds: Any, path: str, *, extra_facets: tuple[str, ...] = ()) -> None:
    if not isinstance(ds, dict):
        raise InvalidEvent("a dataset must be an object", path=path)
    namespace = _text(ds, "namespace", path)
    name = _text(ds, "name", path)
    assert namespace is not None and name is not None
    if not DATASET_NAMESPACE.fullmatch(namespace):
        raise InvalidEvent(f"namespace {namespace[:80]!r} does not match {DATASET_NAMESPACE.pattern}", status=400,
                           path=f"{path}.namespace")
    if not name.strip():
        raise InvalidEvent("dataset name is blank", status=400, path=f"{path}.name")
    _facets(ds, "facets", path, _DATASET_FACETS)
    for key in extra_facets:
        _facets(ds, key, path, {})


def _datasets(event: Mapping[str, Any]) -> None:
    for side, extra in (("inputs", "inputFacets"), ("outputs", "outputFacets")):
        items = event.get(side)
        if items is None:
            continue
        if not isinstance(items, list):
            raise InvalidEvent("must be an array", path=f"$.{side}")
        for i, ds in enumerate(items):
            _dataset(ds, f"$.{side}[{i}]", extra_facets=(extra,))


def _job(event: Mapping[str, Any]) -> None:
    job = _object(event, "job", "$", required=True)
    assert job is not None
    for key in ("namespace", "name"):
        value = _text(job, key, "$.job")
        if value is not None and not value.strip():
            raise InvalidEvent("must not be blank", path=f"$.job.{key}")
    _facets(job, "facets", "$.job", _JOB_FACETS)


def validate_event(event: Any, *, max_depth: int = MAX_DEPTH, text: bytes | None = None) -> str:
    """Check one decoded event; return its kind (``RunEvent``/``DatasetEvent``/``JobEvent``).

    ``text`` is a JSON text of this very event (the body it was decoded from, or its canonical bytes): when
    :func:`plainly_sound` clears it, the walk of :func:`check_structure` is skipped, its answer being known.

    Raises :class:`InvalidEvent` with the HTTP status (400 or 422) and the path of the first problem found.
    """
    if not isinstance(event, dict):
        raise InvalidEvent(f"an event must be a JSON object, not {type(event).__name__}", status=400)
    if text is None or not plainly_sound(text, max_depth=max_depth):
        check_structure(event, max_depth=max_depth)
    # Marquez deserialises first: an unparseable time is a JSON error (400) even when other fields are missing.
    if event.get("eventTime") is not None:
        _time(event, "eventTime", "$")
    _text(event, "eventTime", "$")
    _text(event, "producer", "$")
    _text(event, "schemaURL", "$", required=False)
    kind = event_kind(event)
    if kind == DATASET_EVENT:
        for key in ("run", "job"):  # what a store would take for a run (or its job) is not checked on this kind
            if event.get(key) is not None:
                raise InvalidEvent(f"a DatasetEvent has no {key}", path=f"$.{key}")
        dataset = _object(event, "dataset", "$", required=True)
        _dataset(dataset, "$.dataset")
        return kind
    event_type = _text(event, "eventType", "$", required=False)
    if event_type is not None and event_type not in EVENT_TYPES:
        raise InvalidEvent(f"eventType {event_type[:40]!r} is not one of {', '.join(sorted(EVENT_TYPES))}",
                           path="$.eventType")
    if kind == RUN_EVENT:
        run = _object(event, "run", "$", required=True)
        assert run is not None
        run_id = _text(run, "runId", "$.run")
        if run_id is not None and not UUID.fullmatch(run_id):
            raise InvalidEvent(f"{run_id[:80]!r} is not a UUID", path="$.run.runId")
        _facets(run, "facets", "$.run", _RUN_FACETS)
    elif event.get("run") is not None:
        raise InvalidEvent("a JobEvent has no run", path="$.run")
    _job(event)
    _datasets(event)
    return kind


__all__ = ["EVENT_TYPES", "MAX_DEPTH", "InvalidEvent", "check_structure", "event_kind", "plainly_sound",
           "validate_event"]
