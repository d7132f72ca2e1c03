"""Build OpenLineage 2-0-2 RunEvents for executions and pipeline runs, with ``openlineage-python``'s classes.

The builder is pure: it takes our model objects and returns the event as a JSON-ready ``dict``. It runs on the
Recorder's writer thread, never on a host task's critical path (building attrs objects costs ~1 ms an event).
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import json
import traceback
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attr
import orjson
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    processing_engine_run,
)
from openlineage.client.generated.base import JobFacet

from metatrail import __version__
from metatrail.model import ArtifactRef
from metatrail.openlineage.facets import (
    PRODUCER,
    MetatrailArtifactDatasetFacet,
    MetatrailEnergyRunFacet,
    MetatrailExecutionRunFacet,
    schema_url,
)

SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
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


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def to_plain(obj: Any) -> Any:
    """An ``openlineage-python`` object as JSON data, exactly as ``Serde.to_dict`` gives it (``None`` dropped from
    objects and lists, empty objects dropped from lists, enums as values), in one pass: Serde first copies the whole
    tree with ``attr.asdict``, then walks it again, which is most of the cost of an event."""
    if obj is None or isinstance(obj, str | int | float):
        return obj
    cls = type(obj)
    names = _FIELD_NAMES.get(cls, ())
    if names == ():
        names = _FIELD_NAMES[cls] = tuple(a.name for a in attr.fields(cls)) if attr.has(cls) else None
    if names is not None:
        out: dict[str, Any] = {}
        for name in names:
            value = to_plain(getattr(obj, name))
            if value is not None:
                out[name] = value
        return out
    if isinstance(obj, dict):
        return {k: p for k, p in ((k, to_plain(v)) for k, v in obj.items()) if p is not None}
    if isinstance(obj, list | tuple | set | frozenset):
        return [p for p in (to_plain(v) for v in obj if v is not None) if p is not None and p != {}]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dt.date):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    return obj


@functools.lru_cache(maxsize=256)
def _engine_facet(integration: str, version: str) -> processing_engine_run.ProcessingEngineRunFacet:
    # Facet objects are immutable in use; building one runs URL validators, so the few distinct ones are cached.
    return processing_engine_run.ProcessingEngineRunFacet(
        version=version, name=integration.title(), openlineageAdapterVersion=__version__, producer=PRODUCER)


@functools.lru_cache(maxsize=256)
def _job_type_facet(integration: str, job_type: str) -> job_type_job.JobTypeJobFacet:
    return job_type_job.JobTypeJobFacet(processingType="BATCH", integration=integration.upper(), jobType=job_type,
                                        producer=PRODUCER)


@functools.lru_cache(maxsize=1024)
def _parent_facet(p_run: str, p_ns: str, p_name: str) -> parent_run.ParentRunFacet:
    return parent_run.ParentRunFacet(
        run=parent_run.Run(runId=p_run),
        job=parent_run.Job(namespace=p_ns, name=p_name),
        root=parent_run.Root(run=parent_run.RootRun(runId=p_run), job=parent_run.RootJob(namespace=p_ns, name=p_name)),
        producer=PRODUCER,
    )


def _dataset_facets(ref: ArtifactRef) -> dict[str, Any]:
    facets: dict[str, Any] = {}
    if ref.hash is not None:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=ref.hash.value, producer=PRODUCER
        )
    return facets


def _artifact_facet(ref: ArtifactRef) -> MetatrailArtifactDatasetFacet:
    return MetatrailArtifactDatasetFacet(
        uri=ref.uri,
        kind=ref.kind,
        algorithm=ref.hash.name if ref.hash else None,
        hash=ref.hash.value if ref.hash else None,
        size=ref.size,
        nfiles=ref.nfiles,
        hashError=ref.hash_error,
        producer=PRODUCER,
    )


def build_run_event(
    event_type: str,
    *,
    run_id: str,
    namespace: str,
    job_name: str,
    event_time: float,
    integration: str,
    job_type: str,
    execution_facet: MetatrailExecutionRunFacet,
    integration_version: str | None = None,
    parent: tuple[str, str, str] | None = None,
    inputs: Iterable[ArtifactRef] = (),
    outputs: Iterable[ArtifactRef] = (),
    error: BaseException | str | None = None,
    energy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One RunEvent as a dict.

    ``parent`` is ``(run_id, namespace, job_name)`` of the pipeline run. ``error`` adds an ErrorMessageRunFacet
    (with the traceback of an exception). ``energy`` is the ``metatrail_energy`` facet body.
    """
    run_facets: dict[str, Any] = {
        "processing_engine": _engine_facet(integration, integration_version or __version__),
        "metatrail_execution": execution_facet,
    }
    if parent is not None:
        run_facets["parent"] = _parent_facet(*parent)
    if error is not None:
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            stack = "".join(traceback.format_exception(error)) or None
        else:
            message, stack = str(error), None
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=message or "failed", programmingLanguage="python", stackTrace=stack, producer=PRODUCER
        )
    job_facets: dict[str, JobFacet] = {"jobType": _job_type_facet(integration, job_type)}
    input_refs, output_refs = list(inputs), list(outputs)
    ol_inputs = [InputDataset(namespace=r.namespace, name=r.name, facets=_dataset_facets(r)) for r in input_refs]
    ol_outputs = []
    for ref in output_refs:
        out_facets: dict[str, Any] = {}
        if ref.size is not None:
            out_facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                size=ref.size, fileCount=ref.nfiles, producer=PRODUCER
            )
        ol_outputs.append(
            OutputDataset(namespace=ref.namespace, name=ref.name, facets=_dataset_facets(ref), outputFacets=out_facets)
        )
    event = RunEvent(
        eventType=RunState(event_type),
        eventTime=iso_time(event_time),
        run=Run(runId=run_id, facets=run_facets),
        job=Job(namespace=namespace, name=job_name, facets=job_facets),
        producer=PRODUCER,
        inputs=ol_inputs,
        outputs=ol_outputs,
    )
    body: dict[str, Any] = to_plain(event)
    body["run"]["facets"]["metatrail_execution"] = _facet_body(execution_facet)
    if energy is not None:
        body["run"]["facets"]["metatrail_energy"] = {
            **energy,
            "_producer": PRODUCER,
            "_schemaURL": MetatrailEnergyRunFacet._get_schema(),
        }
    for ds_list, refs in (("inputs", input_refs), ("outputs", output_refs)):
        for ds, ref in zip(body.get(ds_list, []), refs, strict=True):
            ds.setdefault("facets", {})["metatrail_artifact"] = _facet_body(_artifact_facet(ref))
    body["schemaURL"] = SCHEMA_URL
    return body


__all__ = ["build_run_event", "canonical_json", "event_id", "iso_time", "schema_url"]
