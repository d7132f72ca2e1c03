"""``airflow dags test`` of DAGs that bring the plugin something awkward: a start hook that overruns its cap while
the task is quick (``dags/mt_slow_start.py``), an error quoting a secret, a template field with DataFrame
semantics, a file updated in place (``dags/mt_hazards.py``). The tasks' outcome is Airflow's own in each case; these
tests check what metatrail recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import DAGS, AirflowHome, DagRun, by_job, dags_test, facet

from metatrail.hashing import hash_path

PASSWORD = "conn-pw-S3CRET"


@pytest.fixture(scope="module")
def hazards_run(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> DagRun:
    run = dags_test(airflow_home, tmp_path_factory.mktemp("hazards"), "mt_hazards", "2024-04-01T00:00:00+00:00",
                    dagfile=DAGS / "mt_hazards.py",
                    env={"AIRFLOW_CONN_MT_DB": f"postgresql://dbuser:{PASSWORD}@db.example/app"})
    assert airflow_home.task_states("mt_hazards", run.run_id) == {
        ("call_api", -1): "failed", ("load", -1): "success", ("prepare", -1): "success",
        ("overwrite", -1): "success"}, run.output[-5000:]
    return run


def _task_events(run: DagRun, task_id: str) -> list[dict[str, Any]]:
    return by_job(run.events()).get(f"{run.dag_id}.{task_id}", [])


def test_a_secret_in_the_error_is_masked_as_airflow_masks_it(hazards_run: DagRun) -> None:
    events = _task_events(hazards_run, "call_api")
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    error = events[-1]["run"]["facets"]["errorMessage"]
    assert error["message"] == ("RuntimeError: 401 Client Error: Unauthorized for url: "
                                "https://api.example/v1/items?api_key=***")
    assert "api_key=***" in error["stackTrace"]
    assert PASSWORD not in json.dumps(hazards_run.events())


def test_a_dataframe_like_template_field_costs_nothing_else(hazards_run: DagRun) -> None:
    events = _task_events(hazards_run, "load")
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    params = facet(events[0])["params"]
    assert params["template.table"] == "sales_20240401"
    assert "template.frame" in params
    assert "truth value of a DataFrame" not in hazards_run.output  # nothing of ours tripped over it


def test_a_file_updated_in_place_is_an_output_with_its_new_content(hazards_run: DagRun) -> None:
    out = hazards_run.data / "out.csv"
    assert out.read_text() == "A,B\n"  # the task did its work unchanged
    end = _task_events(hazards_run, "overwrite")[-1]
    assert end["eventType"] == "COMPLETE"
    outputs = {d["name"]: d["facets"]["metatrail_artifact"]["hash"] for d in end["outputs"]}
    assert outputs == {str(out): hash_path(out).hash.value}  # type: ignore[union-attr]


def test_an_end_hook_behind_an_overrunning_start_hook_is_recorded(airflow_home: AirflowHome, tmp_path: Path) -> None:
    run = dags_test(airflow_home, tmp_path, "mt_slow_start", "2024-04-02T00:00:00+00:00",
                    dagfile=DAGS / "mt_slow_start.py",
                    env={"AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP": ".*",
                         "AIRFLOW__METATRAIL__HOOK_TIMEOUT": "1", "MT_TEST_SLOW_REPR_S": "3"})
    assert run.proc.returncode == 0, run.output[-5000:]
    events = _task_events(run, "use")
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"], run.output[-5000:]
    from metatrail.store import open_store

    with open_store(run.store_url) as store:
        recorded = store.get_run(events[-1]["run"]["runId"])
        dag_run = store.get_run(by_job(run.events())["mt_slow_start"][-1]["run"]["runId"])
    assert recorded is not None and recorded["state"] == "completed"
    assert dag_run is not None and dag_run["state"] == "completed"
    # it was the case this test is about: the end hook came while the start hook was still running
    assert "metatrail: on_task_instance_running took longer than 1.0s" in run.output
    assert "metatrail: on_task_instance_success queued behind on_task_instance_running" in run.output
