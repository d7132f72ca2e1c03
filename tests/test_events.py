"""Every kind of event we produce validates against the OpenLineage spec, our facet schemas, and Marquez's rules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from olspec import assert_valid, marquez_errors, spec_errors

from metatrail.model import ArtifactRef, HashInfo, uuid7
from metatrail.openlineage.events import build_run_event, event_id
from metatrail.openlineage.facets import MetatrailExecutionRunFacet, load_schema
from metatrail.recorder import Recorder
from metatrail.store import open_store

INPUTS = [ArtifactRef("data/raw.csv", "file", "/work/data/raw.csv", hash=HashInfo("md5", "a" * 32), size=10),
          ArtifactRef("s3://bucket/key.parquet", "s3://bucket", "key.parquet", kind="remote",
                      hash_error="remote: not downloaded"),
          ArtifactRef("gone.txt", "file", "/work/gone.txt", kind="missing", hash_error="missing")]
OUTPUTS = [ArtifactRef("model", "file", "/work/model", kind="directory", hash=HashInfo("md5", "b" * 32 + ".dir"),
                       size=1234, nfiles=3)]


def _facet(kind: str = "execution") -> MetatrailExecutionRunFacet:
    return MetatrailExecutionRunFacet(pipeline="p", kind=kind, site="s", integration="PYTHON",
                                      stage="st" if kind == "execution" else None, params={"lr": 0.1, "n": [1, 2]},
                                      codeVersion={"gitCommit": "c" * 40, "repoPath": "/work"})


@pytest.mark.parametrize("event_type", ["START", "RUNNING", "COMPLETE", "FAIL", "ABORT"])
@pytest.mark.parametrize("with_parent", [True, False])
def test_execution_events_are_valid(event_type: str, with_parent: bool) -> None:
    event = build_run_event(
        event_type, run_id=uuid7(), namespace="ns", job_name="p.st", event_time=1.8e9, integration="SNAKEMAKE",
        job_type="TASK", execution_facet=_facet(), parent=(uuid7(), "ns", "p") if with_parent else None,
        inputs=INPUTS, outputs=OUTPUTS if event_type != "START" else [],
        error=ValueError("bad value") if event_type == "FAIL" else None,
    )
    assert_valid(event)
    assert event["run"]["facets"]["metatrail_execution"]["params"] == {"lr": 0.1, "n": [1, 2]}
    if event_type == "FAIL":
        assert event["run"]["facets"]["errorMessage"]["message"] == "ValueError: bad value"
        assert "Traceback" not in event["run"]["facets"]["errorMessage"]["message"]


def test_pipeline_run_events_are_valid() -> None:
    for event_type in ("START", "COMPLETE", "FAIL"):
        event = build_run_event(event_type, run_id=uuid7(), namespace="ns", job_name="p", event_time=1.8e9,
                                integration="AIRFLOW", job_type="DAG", execution_facet=_facet("pipeline_run"),
                                error="dag failed" if event_type == "FAIL" else None)
        assert_valid(event)
        assert event["job"]["facets"]["jobType"]["jobType"] == "DAG"


def test_null_hash_is_kept_with_its_reason() -> None:
    event = build_run_event("START", run_id=uuid7(), namespace="ns", job_name="p.st", event_time=1.8e9,
                            integration="PYTHON", job_type="TASK", execution_facet=_facet(), inputs=INPUTS)
    facets = [i["facets"] for i in event["inputs"]]
    assert facets[0]["version"]["datasetVersion"] == "a" * 32
    assert facets[1]["metatrail_artifact"]["hash"] is None
    assert facets[1]["metatrail_artifact"]["hashError"] == "remote: not downloaded"
    assert "version" not in facets[2]
    assert (event["inputs"][1]["namespace"], event["inputs"][1]["name"]) == ("s3://bucket", "key.parquet")


def test_the_validator_catches_broken_events() -> None:
    event = build_run_event("START", run_id=uuid7(), namespace="ns", job_name="p.st", event_time=1.8e9,
                            integration="PYTHON", job_type="TASK", execution_facet=_facet())
    broken = {**event, "run": {**event["run"], "runId": "not-a-uuid"}}
    assert spec_errors(broken)
    facet = dict(event["run"]["facets"]["metatrail_execution"], kind="bogus")
    bad_facet = {**event, "run": {**event["run"], "facets": {"metatrail_execution": facet}}}
    assert any("metatrail_execution" in e for e in spec_errors(bad_facet))
    assert marquez_errors({**event, "job": {"namespace": "ns", "name": None}})


def test_event_identity_ignores_key_order() -> None:
    event = build_run_event("START", run_id=uuid7(), namespace="ns", job_name="p.st", event_time=1.8e9,
                            integration="PYTHON", job_type="TASK", execution_facet=_facet())
    reordered = dict(reversed(list(event.items())))
    assert event_id(event) == event_id(reordered)
    assert event_id(event) != event_id({**event, "eventType": "COMPLETE"})


def test_shipped_schemas_name_their_facets() -> None:
    for name, key in (("MetatrailExecutionRunFacet", "metatrail_execution"),
                      ("MetatrailArtifactDatasetFacet", "metatrail_artifact")):
        schema = load_schema(name)
        assert schema["properties"][key]["$ref"] == f"#/$defs/{name}"
        assert schema["$id"].endswith(f"/{name}.json")


def test_recorded_events_are_valid(tmp_path: Path) -> None:
    """End to end: what the Recorder writes to the store validates, including hashes of real files."""
    (tmp_path / "in.txt").write_text("input")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "a").write_text("a")
    recorder = Recorder()
    run = recorder.pipeline_run_started("pipe", params={"seed": 1})
    ex = recorder.execution_started("pipe", "one", pipeline_run=run, inputs=[tmp_path / "in.txt"],
                                    params={"obj": object()})
    recorder.execution_finished(ex, outputs=[tmp_path / "outdir", "s3://b/k"])
    ex2 = recorder.execution_started("pipe", "two", pipeline_run=run)
    recorder.execution_failed(ex2, error=RuntimeError("nope"))
    recorder.pipeline_run_finished(run, status="failed", error="stage two failed")
    assert recorder.flush(30)
    with open_store(recorder.settings.store) as store:
        events = [e.body for e in store.iter_events()]
    recorder.close()
    assert len(events) == 6
    for event in events:
        assert_valid(event)
    assert {e["eventType"] for e in events} == {"START", "COMPLETE", "FAIL"}


def _refs(draw_hash: bool, size: int | None, nfiles: int | None, error: str | None) -> ArtifactRef:
    return ArtifactRef("a.txt", "file", "/w/a.txt", kind="directory" if nfiles else "file",
                       hash=HashInfo("md5", "d" * 32) if draw_hash else None, size=size, nfiles=nfiles,
                       hash_error=error)


@settings(max_examples=150, deadline=None)
@given(event_type=st.sampled_from(["START", "RUNNING", "COMPLETE", "FAIL", "ABORT", "OTHER"]),
       with_parent=st.booleans(), integration=st.sampled_from(["PYTHON", "airflow", "Snakemake"]),
       version=st.one_of(st.none(), st.text(max_size=8)),
       refs=st.lists(st.builds(_refs, st.booleans(), st.one_of(st.none(), st.integers(0, 2**40)),
                               st.one_of(st.none(), st.integers(1, 9)), st.one_of(st.none(), st.text(max_size=10))),
                     max_size=3),
       error=st.one_of(st.none(), st.text(max_size=20), st.just(ValueError("bad"))),
       energy=st.one_of(st.none(), st.just({"joules": {"cpu": 1.5}, "method": "estimated"})),
       kind=st.sampled_from(["execution", "pipeline_run"]))
def test_fast_builder_equals_the_openlineage_python_reference(
        event_type: str, with_parent: bool, integration: str, version: str | None, refs: list[ArtifactRef],
        error: BaseException | str | None, energy: dict[str, Any] | None, kind: str) -> None:
    """The events we store are assembled from cached parts; built with openlineage-python's classes and Serde
    instead, every one is identical."""
    from olreference import reference_run_event

    from metatrail.openlineage.events import execution_facet

    common: dict[str, Any] = dict(
        run_id=uuid7(), namespace="ns", job_name="p.st", event_time=1.8e9 + 0.123456, integration=integration,
        job_type="TASK", integration_version=version, parent=(uuid7(), "ns", "p") if with_parent else None,
        inputs=refs, outputs=refs[::-1], error=error, energy=energy)
    facet = _facet(kind)
    expected = reference_run_event(event_type, execution_facet=facet, **common)
    assert build_run_event(event_type, execution_facet=facet, **common) == expected
    body = execution_facet(pipeline="p", kind=kind, site="s", integration="PYTHON",
                           stage="st" if kind == "execution" else None, params={"lr": 0.1, "n": [1, 2]},
                           codeVersion={"gitCommit": "c" * 40, "repoPath": "/work"})
    assert build_run_event(event_type, execution_facet=body, **common) == expected
    if energy is None:  # (a made-up energy body: the energy facet has its own tests)
        assert_valid(expected)


def test_fast_builder_refuses_what_openlineage_python_refuses() -> None:
    from metatrail.openlineage.events import execution_facet

    body = execution_facet(pipeline="p", kind="execution", site="s", integration="PYTHON")
    with pytest.raises(ValueError):
        build_run_event("START", run_id="not-a-uuid", namespace="ns", job_name="p", event_time=1.8e9,
                        integration="PYTHON", job_type="TASK", execution_facet=body)
    with pytest.raises(ValueError):
        build_run_event("BEGUN", run_id=uuid7(), namespace="ns", job_name="p", event_time=1.8e9,
                        integration="PYTHON", job_type="TASK", execution_facet=body)
    with pytest.raises(TypeError):
        execution_facet(pipeline="p", kind="execution", site="s", integration="PYTHON", colour="red")
    with pytest.raises(TypeError):
        execution_facet(pipeline="p", kind="execution")


def test_constants_are_openlineage_pythons_own() -> None:
    """The builder writes schema URLs and the execution facet's fields from constants (it never imports
    openlineage-python); they are the ones openlineage-python's classes and our facet class declare."""
    import attr
    from openlineage.client.event_v2 import RunState
    from openlineage.client.facet_v2 import (
        dataset_version_dataset,
        error_message_run,
        job_type_job,
        output_statistics_output_dataset,
        parent_run,
        processing_engine_run,
    )

    from metatrail.openlineage.events import EXECUTION_FIELDS
    from metatrail.openlineage.names import RUN_STATES, SPEC_FACET_VERSIONS, spec_facet_url

    classes = [processing_engine_run.ProcessingEngineRunFacet, job_type_job.JobTypeJobFacet,
               parent_run.ParentRunFacet, error_message_run.ErrorMessageRunFacet,
               dataset_version_dataset.DatasetVersionDatasetFacet,
               output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet]
    assert {c.__name__ for c in classes} == set(SPEC_FACET_VERSIONS)
    for cls in classes:
        assert spec_facet_url(cls.__name__) == cls._get_schema()
    assert {s.value for s in RunState} == RUN_STATES
    fields = [a for a in attr.fields(MetatrailExecutionRunFacet) if not a.name.startswith("_")]
    assert [name for name, _ in EXECUTION_FIELDS] == [a.name for a in fields]
    for (_, default), a in zip(EXECUTION_FIELDS, fields, strict=True):
        expected = a.default.factory() if isinstance(a.default, attr.Factory) else a.default  # type: ignore[arg-type]
        actual = default() if callable(default) else default
        assert actual == expected or (a.default is attr.NOTHING and actual is not None and not callable(default))


def test_recording_never_imports_openlineage_python(tmp_path: Path) -> None:
    """Recording and storing an event in a fresh interpreter leaves openlineage-python unimported (its client
    package costs about half a second of CPU per process)."""
    import subprocess
    import sys

    data = tmp_path / "input.txt"
    data.write_text("data\n")
    script = ("import sys, metatrail\n"
              "r = metatrail.get_recorder()\n"
              f"r.execution_failed(r.execution_started('p', 's', inputs=[{str(data)!r}]), error=ValueError('x'))\n"
              "assert r.flush(60) and r.written == 2, r.written\n"
              "print(sorted(m for m in sys.modules if m.startswith('openlineage')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "METATRAIL_STORE": f"sqlite:///{tmp_path / 'm.db'}",
                              "METATRAIL_WRITER": "thread"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
