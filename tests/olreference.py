"""The reference event builder: every part of a RunEvent made with ``openlineage-python``'s classes (which check
types and URLs as they are built) and serialised by its ``Serde``. ``metatrail.openlineage.events.build_run_event``
builds the same dict from cached parts at a fraction of the cost; tests hold the two equal."""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    processing_engine_run,
)
from openlineage.client.serde import Serde

from metatrail import __version__
from metatrail.model import ArtifactRef
from metatrail.openlineage.events import SCHEMA_URL, iso_time
from metatrail.openlineage.facets import (
    PRODUCER,
    MetatrailArtifactDatasetFacet,
    MetatrailEnergyRunFacet,
    MetatrailExecutionRunFacet,
)


def _facet_body(facet: Any) -> dict[str, Any]:
    body = {a.name: getattr(facet, a.name) for a in attr.fields(type(facet)) if not a.name.startswith("_")}
    body["_producer"] = PRODUCER
    body["_schemaURL"] = facet._get_schema()
    return body


def _dataset_facets(ref: ArtifactRef) -> dict[str, Any]:
    if ref.hash is None:
        return {}
    return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=ref.hash.value,
                                                                          producer=PRODUCER)}


def reference_run_event(event_type: str, *, run_id: str, namespace: str, job_name: str, event_time: float,
                        integration: str, job_type: str, execution_facet: MetatrailExecutionRunFacet,
                        integration_version: str | None = None, parent: tuple[str, str, str] | None = None,
                        inputs: Iterable[ArtifactRef] = (), outputs: Iterable[ArtifactRef] = (),
                        error: BaseException | str | None = None,
                        energy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``build_run_event``'s contract, built the slow, checked way."""
    run_facets: dict[str, Any] = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=integration_version or __version__, name=integration.title(),
            openlineageAdapterVersion=__version__, producer=PRODUCER),
    }
    if parent is not None:
        p_run, p_ns, p_name = parent
        run_facets["parent"] = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=p_run), job=parent_run.Job(namespace=p_ns, name=p_name),
            root=parent_run.Root(run=parent_run.RootRun(runId=p_run),
                                 job=parent_run.RootJob(namespace=p_ns, name=p_name)),
            producer=PRODUCER)
    if error is not None:
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            stack = "".join(traceback.format_exception(error)) or None
        else:
            message, stack = str(error), None
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=message or "failed", programmingLanguage="python", stackTrace=stack, producer=PRODUCER)
    input_refs, output_refs = list(inputs), list(outputs)
    outs = []
    for ref in output_refs:
        out_facets: dict[str, Any] = {}
        if ref.size is not None:
            out_facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                size=ref.size, fileCount=ref.nfiles, producer=PRODUCER)
        outs.append(OutputDataset(namespace=ref.namespace, name=ref.name, facets=_dataset_facets(ref),
                                  outputFacets=out_facets))
    event = RunEvent(
        eventType=RunState(event_type), eventTime=iso_time(event_time), run=Run(runId=run_id, facets=run_facets),
        job=Job(namespace=namespace, name=job_name, facets={"jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration=integration.upper(), jobType=job_type, producer=PRODUCER)}),
        producer=PRODUCER,
        inputs=[InputDataset(namespace=r.namespace, name=r.name, facets=_dataset_facets(r)) for r in input_refs],
        outputs=outs,
    )
    body: dict[str, Any] = Serde.to_dict(event)
    body["run"]["facets"]["metatrail_execution"] = _facet_body(execution_facet)
    if energy is not None:
        body["run"]["facets"]["metatrail_energy"] = {**energy, "_producer": PRODUCER,
                                                     "_schemaURL": MetatrailEnergyRunFacet._get_schema()}
    for ds_list, refs in (("inputs", input_refs), ("outputs", output_refs)):
        for ds, ref in zip(body.get(ds_list, []), refs, strict=True):
            ds.setdefault("facets", {})["metatrail_artifact"] = _facet_body(MetatrailArtifactDatasetFacet(
                uri=ref.uri, kind=ref.kind, algorithm=ref.hash.name if ref.hash else None,
                hash=ref.hash.value if ref.hash else None, size=ref.size, nfiles=ref.nfiles,
                hashError=ref.hash_error, producer=PRODUCER))
    body["schemaURL"] = SCHEMA_URL
    return body
