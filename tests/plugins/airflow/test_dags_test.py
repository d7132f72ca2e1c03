"""``airflow dags test`` of the golden DAG with the plugin active (installed through its entry point, no DAG change):
golden events, spec validity, derived ids, parameters, content hashes, retries, mapping, skips.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import GOLDEN, DagRun, by_job, facet
from golden import assert_golden, normalise
from olspec import assert_valid

from metatrail.hashing import hash_path
from metatrail.model import uuid7_from

LOGICAL = dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()
# Mapped instances run in no fixed order under `dags test`; they are checked on their own, not in the golden file.
UNORDERED_JOBS = {"mt_pipeline.shard"}


def test_every_event_is_valid_openlineage(pipeline_run: DagRun) -> None:
    events = pipeline_run.events()
    assert len(events) == 18  # 1 DAG run + 8 task-instance tries, START and end each
    for event in events:
        assert_valid(event)


def test_events_match_the_reviewed_golden_file(pipeline_run: DagRun) -> None:
    events = [e for e in pipeline_run.events() if e["job"]["name"] not in UNORDERED_JOBS]
    assert_golden(normalise(events, paths={str(pipeline_run.data): "<data>"}), GOLDEN / "mt_pipeline.json")


def test_ids_derive_from_airflow_identity(pipeline_run: DagRun) -> None:
    """Scheduler and task runner compute the same ids without talking: check them against the formula."""
    jobs = by_job(pipeline_run.events())
    pipeline_id = uuid7_from(LOGICAL, f"mt_pipeline.{pipeline_run.run_id}")
    assert {e["run"]["runId"] for e in jobs["mt_pipeline"]} == {pipeline_id}
    for name, events in jobs.items():
        if name == "mt_pipeline":
            continue
        task_id = name.split(".", 1)[1]
        for e in events:
            f = facet(e)
            index = f["extra"].get("mapIndex", -1)
            key = f"mt_pipeline.{pipeline_run.run_id}.{task_id}.{f['tryNumber']}.{index}"
            assert e["run"]["runId"] == uuid7_from(LOGICAL, key)
            parent = e["run"]["facets"]["parent"]
            assert parent["run"]["runId"] == pipeline_id
            assert (parent["job"]["namespace"], parent["job"]["name"]) == ("airflow", "mt_pipeline")


def test_parameters_conf_and_operator_are_recorded(pipeline_run: DagRun) -> None:
    jobs = by_job(pipeline_run.events())
    transform = facet(jobs["mt_pipeline.transform"][0])
    assert transform["params"]["op_args.0"] == str(pipeline_run.data / "raw.csv")  # rendered from the XCom
    assert transform["params"]["params.rows"] == 4
    assert transform["params"]["conf.label"] == "golden"
    assert transform["extra"]["operator"].endswith("._PythonDecoratedOperator")
    load = facet(jobs["mt_pipeline.load"][0])
    assert load["params"]["template.bash_command"] == (
        f"wc -l < {pipeline_run.data}/clean.csv > {pipeline_run.data}/report.txt")
    assert load["extra"]["operator"] == "airflow.providers.standard.operators.bash.BashOperator"
    run = facet(jobs["mt_pipeline"][0])
    assert run["kind"] == "pipeline_run"
    assert run["params"] == {"conf.label": "golden", "conf.threshold": 3}
    assert run["extra"]["airflowRunId"] == pipeline_run.run_id


def _datasets(event: dict[str, Any], side: str) -> dict[str, str | None]:
    return {d["name"]: d["facets"]["metatrail_artifact"]["hash"] for d in event.get(side, [])}


def test_inputs_and_outputs_carry_dvc_hashes_of_the_real_files(pipeline_run: DagRun) -> None:
    data = pipeline_run.data
    md5 = {name: hash_path(data / name).hash.value for name in ("raw.csv", "clean.csv", "report.txt")}  # type: ignore[union-attr]
    jobs = by_job(pipeline_run.events())
    done = {name: events[-1] for name, events in jobs.items()}
    # extract: output only known from its return value; transform: argument path in, ObjectStoragePath + outlet out;
    # load: declared inlet and outlet of a BashOperator.
    assert _datasets(done["mt_pipeline.extract"], "outputs") == {str(data / "raw.csv"): md5["raw.csv"]}
    assert _datasets(done["mt_pipeline.transform"], "inputs") == {str(data / "raw.csv"): md5["raw.csv"]}
    assert _datasets(done["mt_pipeline.transform"], "outputs") == {str(data / "clean.csv"): md5["clean.csv"]}
    assert _datasets(done["mt_pipeline.load"], "inputs") == {str(data / "clean.csv"): md5["clean.csv"]}
    assert _datasets(done["mt_pipeline.load"], "outputs") == {str(data / "report.txt"): md5["report.txt"],
                                                             "daily/report.txt": None}
    assert (data / "report.txt").read_text().strip() == "4"  # the task did its work unchanged


def test_a_remote_outlet_is_named_but_never_downloaded(pipeline_run: DagRun) -> None:
    load = by_job(pipeline_run.events())["mt_pipeline.load"][-1]
    remote = [d for d in load["outputs"] if d["namespace"] != "file"]
    assert [(d["namespace"], d["name"]) for d in remote] == [("s3://mt-reports", "daily/report.txt")]
    artifact = remote[0]["facets"]["metatrail_artifact"]
    assert (artifact["kind"], artifact["hash"], artifact["hashError"]) == ("remote", None, "remote: not downloaded")


def test_a_retried_task_is_two_executions_with_the_failure_recorded(pipeline_run: DagRun) -> None:
    flaky = by_job(pipeline_run.events())["mt_pipeline.flaky"]
    tries = {(facet(e)["tryNumber"], e["eventType"]) for e in flaky}
    assert tries == {(1, "START"), (1, "FAIL"), (2, "START"), (2, "COMPLETE")}
    fail = next(e for e in flaky if e["eventType"] == "FAIL")
    assert fail["run"]["facets"]["errorMessage"]["message"] == "ValueError: first try fails"
    assert "first try fails" in fail["run"]["facets"]["errorMessage"]["stackTrace"]
    assert facet(fail)["extra"]["airflowState"] == "up_for_retry"
    assert len({e["run"]["runId"] for e in flaky}) == 2


def test_mapped_instances_are_distinct_executions_of_one_stage(pipeline_run: DagRun) -> None:
    shard = by_job(pipeline_run.events())["mt_pipeline.shard"]
    by_index: dict[int, set[str]] = {}
    for e in shard:
        f = facet(e)
        assert f["stage"] == "shard"
        by_index.setdefault(f["extra"]["mapIndex"], set()).add(e["run"]["runId"])
        assert f["params"]["op_kwargs.index"] == f["extra"]["mapIndex"] + 1
    assert sorted(by_index) == [0, 1]
    assert all(len(ids) == 1 for ids in by_index.values())
    assert by_index[0] != by_index[1]


def test_a_task_that_skips_itself_is_completed_with_state_skipped(pipeline_run: DagRun) -> None:
    events = by_job(pipeline_run.events())["mt_pipeline.nothing_to_do"]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert facet(events[-1])["extra"]["airflowState"] == "skipped"
    assert events[-1]["outputs"] == []


def test_energy_is_attributed_to_each_task_try(pipeline_run: DagRun) -> None:
    for event in pipeline_run.events():
        if event["eventType"] in ("COMPLETE", "FAIL") and facet(event)["kind"] == "execution":
            energy = event["run"]["facets"].get("metatrail_energy")
            assert energy is not None, event["job"]["name"]
            assert energy["wall_s"] >= 0


def test_the_run_left_no_warning_from_metatrail(pipeline_run: DagRun) -> None:
    assert "metatrail:" not in pipeline_run.output, pipeline_run.output[-3000:]


def test_runs_are_queryable_from_the_store(pipeline_run: DagRun) -> None:
    from metatrail.store import open_store

    pipeline_id = uuid7_from(LOGICAL, f"mt_pipeline.{pipeline_run.run_id}")
    with open_store(pipeline_run.store_url) as store:
        run = store.get_run(pipeline_id)
        assert run is not None
        assert run["state"] == "completed"
        stages = sorted(c["stage"] for c in run["children"])
    assert stages == sorted(["extract", "transform", "load", "shard", "shard", "flaky", "flaky", "nothing_to_do"])
