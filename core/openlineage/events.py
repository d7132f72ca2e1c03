"""Build OpenLineage 2-0-2 RunEvents for executions and pipeline runs.

The builder is pure: it takes our model objects and returns the event as a JSON-ready ``dict``, exactly as
``openlineage-python``'s classes and ``Serde`` would (``tests/olreference.py`` builds them that way; tests hold the two
equal), from the spec's names in :mod:`metatrail.openlineage.names`. It runs on the Recorder's writer thread or in its
writer process, never on a host task's critical path.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attr
import orjson

from metatrail import __version__
from metatrail.model import ArtifactRef, ErrorText
from metatrail.openlineage.names import PRODUCER, RUN_EVENT_SCHEMA, RUN_STATES, schema_url, spec_facet_url

SCHEMA_URL = RUN_EVENT_SCHEMA
OUR_FACETS = ("metatrail_execution", "metatrail_energy", "metatrail_artifact")


def iso_time(unix_ts: float) -> str:
    """An ISO 8601 UTC timestamp with microseconds, as OpenLineage ``eventTime`` wants."""
    return dt.datetime.fromtimestamp(unix_ts, tz=dt.UTC).isoformat(timespec="microseconds")


def canonical_bytes(event: Mapping[str, Any]) -> bytes:
    """The canonical UTF-8 text of an event: sorted keys, no spaces, non-ASCII as is. Its sha256 is the event's
    identity.

    orjson writes exactly what ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` writes for
    JSON data, six times faster; values orjson cannot write (integers beyond 64 bits, non-string keys) go through
    the standard library, which refuses NaN and infinities (events parsed from HTTP cannot hold them: orjson's parser
    refuses them there).
    """
    try:
        return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")


def canonical_json(event: Mapping[str, Any]) -> str:
    """:func:`canonical_bytes` as text."""
    return canonical_bytes(event).decode("utf-8")


def event_id(event: Mapping[str, Any]) -> str:
    """The identity of an event: sha256 of its canonical JSON (so the same event ingested twice is one row)."""
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


def _facet_body(facet: Any) -> dict[str, Any]:
    # Serde drops None values; our facets keep them, because null-with-a-reason is information.
    body = {a.name: getattr(facet, a.name) for a in attr.fields(type(facet)) if not a.name.startswith("_")}
    body["_producer"] = PRODUCER
    body["_schemaURL"] = facet._get_schema()
    return body


# Parts of events that repeat are made once per distinct value, from plain constants (metatrail.openlineage.names):
# building openlineage-python's attrs objects and serialising them for every event cost about 100 µs an event, and
# importing its client package half a second per process. ``tests/olreference.py`` builds the same events with
# openlineage-python's classes; tests hold the two equal.
def _header(facet: str) -> dict[str, str]:
    return {"_producer": PRODUCER, "_schemaURL": spec_facet_url(facet)}


@functools.lru_cache(maxsize=256)
def _engine_facet(integration: str, version: str) -> dict[str, Any]:
    return {**_header("ProcessingEngineRunFacet"), "version": version, "name": integration.title(),
            "openlineageAdapterVersion": __version__}


@functools.lru_cache(maxsize=256)
def _job_type_facet(integration: str, job_type: str) -> dict[str, Any]:
    return {**_header("JobTypeJobFacet"), "processingType": "BATCH", "integration": integration.upper(),
            "jobType": job_type}


@functools.lru_cache(maxsize=1024)
def _parent_facet(p_run: str, p_ns: str, p_name: str) -> dict[str, Any]:
    uuid.UUID(p_run)  # refuses a parent run id that is not a UUID, as openlineage-python's classes do
    run, job = {"runId": p_run, "facets": {}}, {"namespace": p_ns, "name": p_name, "facets": {}}
    return {**_header("ParentRunFacet"), "run": run, "job": job,
            "root": {"run": dict(run, facets={}), "job": dict(job, facets={})}}


@functools.cache
def _facet_header(kind: str) -> dict[str, str]:
    """``_producer``/``_schemaURL`` of the facets built per event."""
    ours = {"metatrail_artifact": "MetatrailArtifactDatasetFacet", "metatrail_execution": "MetatrailExecutionRunFacet",
            "metatrail_energy": "MetatrailEnergyRunFacet"}
    if kind in ours:
        return {"_producer": PRODUCER, "_schemaURL": schema_url(ours[kind])}
    return _header({"version": "DatasetVersionDatasetFacet",
                    "outputStatistics": "OutputStatisticsOutputDatasetFacet"}[kind])


_REQUIRED = object()
# The fields of the execution facet (the JSON Schema and MetatrailExecutionRunFacet, which tests hold equal to this), in
# schema order, with their defaults: a callable makes a fresh value.
EXECUTION_FIELDS: tuple[tuple[str, Any], ...] = (
    ("pipeline", _REQUIRED), ("kind", _REQUIRED), ("site", _REQUIRED), ("integration", _REQUIRED),
    ("stage", None), ("host", None), ("user", None), ("pid", None), ("integrationVersion", None),
    ("tryNumber", None), ("params", dict), ("codeVersion", None), ("exitCode", None), ("durationSeconds", None),
    ("warnings", list), ("extra", dict), ("metrics", dict),
)


def execution_facet(**fields: Any) -> dict[str, Any]:
    """The ``metatrail_execution`` facet body from its fields (see ``MetatrailExecutionRunFacet``); fields not
    given take their defaults. Null values are kept: null-with-a-reason is information."""
    body: dict[str, Any] = {}
    for name, default in EXECUTION_FIELDS:
        if name in fields:
            body[name] = fields.pop(name)
        elif default is _REQUIRED:
            raise TypeError(f"execution facet field {name!r} is required")
        else:
            body[name] = default() if callable(default) else default
    if fields:
        raise TypeError(f"unknown execution facet fields: {sorted(fields)}")
    body.update(_facet_header("metatrail_execution"))
    return body


def _dataset(ref: ArtifactRef, output: bool) -> dict[str, Any]:
    facets: dict[str, Any] = {}
    if ref.hash is not None:
        facets["version"] = {**_facet_header("version"), "datasetVersion": ref.hash.value}
    facets["metatrail_artifact"] = {
        "uri": ref.uri,
        "kind": ref.kind,
        "algorithm": ref.hash.name if ref.hash else None,
        "hash": ref.hash.value if ref.hash else None,
        "size": ref.size,
        "nfiles": ref.nfiles,
        "hashError": ref.hash_error,
        **_facet_header("metatrail_artifact"),
    }
    dataset: dict[str, Any] = {"namespace": ref.namespace, "name": ref.name, "facets": facets}
    if not output:
        dataset["inputFacets"] = {}
        return dataset
    out_facets: dict[str, Any] = {}
    if ref.size is not None:
        stats: dict[str, Any] = {**_facet_header("outputStatistics"), "size": ref.size}
        if ref.nfiles is not None:
            stats["fileCount"] = ref.nfiles
        out_facets["outputStatistics"] = stats
    dataset["outputFacets"] = out_facets
    return dataset


def build_run_event(
    event_type: str,
    *,
    run_id: str,
    namespace: str,
    job_name: str,
    event_time: float,
    integration: str,
    job_type: str,
    execution_facet: Any,
    integration_version: str | None = None,
    parent: tuple[str, str, str] | None = None,
    inputs: Iterable[ArtifactRef] = (),
    outputs: Iterable[ArtifactRef] = (),
    error: BaseException | ErrorText | str | None = None,
    energy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One RunEvent as a dict.

    ``parent`` is ``(run_id, namespace, job_name)`` of the pipeline run. ``error`` adds an ErrorMessageRunFacet
    (with the traceback of an exception). ``execution_facet`` is the facet object or its body
    (:func:`execution_facet`); ``energy`` is the ``metatrail_energy`` facet body.
    """
    if event_type not in RUN_STATES:
        raise ValueError(f"{event_type!r} is not an OpenLineage run state ({', '.join(sorted(RUN_STATES))})")
    state = event_type
    uuid.UUID(run_id)  # refuses a run id that is not a UUID, as openlineage-python's Run does
    run_facets: dict[str, Any] = {
        "processing_engine": dict(_engine_facet(integration, integration_version or __version__)),
        "metatrail_execution": (_facet_body(execution_facet) if attr.has(type(execution_facet))
                                else dict(execution_facet)),
    }
    if parent is not None:
        run_facets["parent"] = dict(_parent_facet(*parent))
    if error is not None:
        if isinstance(error, BaseException):
            error = ErrorText.of(error)
        if isinstance(error, ErrorText):
            message, stack = error.message, error.stack
        else:
            message, stack = str(error), None
        run_facets["errorMessage"] = {**_header("ErrorMessageRunFacet"), "message": message or "failed",
                                      "programmingLanguage": "python"}
        if stack is not None:
            run_facets["errorMessage"]["stackTrace"] = stack
    if energy is not None:
        run_facets["metatrail_energy"] = {**energy, **_facet_header("metatrail_energy")}
    return {
        "eventTime": iso_time(event_time),
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
        "run": {"runId": run_id, "facets": run_facets},
        "job": {"namespace": namespace, "name": job_name,
                "facets": {"jobType": dict(_job_type_facet(integration, job_type))}},
        "eventType": state,
        "inputs": [_dataset(ref, False) for ref in inputs],
        "outputs": [_dataset(ref, True) for ref in outputs],
    }


__all__ = ["build_run_event", "canonical_json", "event_id", "execution_facet", "iso_time", "schema_url"]
