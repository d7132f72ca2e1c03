"""Airflow's own bundled example DAGs, unmodified, run with ``airflow dags test`` and the plugin active: what each
recorded, all into one store as a user's Airflow would.

The files are copied from the installed Airflow into a DAG folder of their own: Airflow's example folder holds DAGs
that need extra packages (Kubernetes, plugins) and ``dags test`` parses the whole bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

import airflow
import airflow.providers.standard
from airflow_support import AirflowHome, DagRun, by_job, dags_test, facet
from olspec import assert_valid

EXAMPLES = {  # dag_id: (file, folder inside the installed package)
    "example_bash_operator": ("example_bash_operator.py", Path(airflow.providers.standard.__file__).parent),
    "example_dynamic_task_mapping": ("example_dynamic_task_mapping.py", Path(airflow.__file__).parent),
    "example_failed_dag": ("example_failed_dag.py", Path(airflow.__file__).parent),
}


@pytest.fixture(scope="module")
def examples(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("examples")
    dags = work / "dags"
    dags.mkdir()
    runs: dict[str, DagRun] = {}
    for day, (dag_id, (name, package)) in enumerate(EXAMPLES.items(), start=1):
        shutil.copy(package / "example_dags" / name, dags / name)
        runs[dag_id] = dags_test(airflow_home, work, dag_id, f"2024-03-{day:02d}T00:00:00+00:00",
                                 dagfile=dags / name, env={"AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
    store = next(iter(runs.values())).store
    return {"runs": runs, "jobs": by_job(next(iter(runs.values())).events()), "store": store}


def _ends(jobs: dict[str, list[dict[str, Any]]], dag_id: str) -> dict[str, dict[str, Any]]:
    """The end event of each task of one DAG (single-try tasks only), by task id."""
    return {name.split(".", 1)[1]: events[-1] for name, events in jobs.items() if name.startswith(dag_id + ".")}


def test_examples_ran_as_airflow_intends(examples: dict[str, Any]) -> None:
    codes = {dag_id: run.proc.returncode for dag_id, run in examples["runs"].items()}
    # example_failed_dag fails on purpose; `dags test` exits 1 for a failed run
    assert codes == {"example_bash_operator": 0, "example_dynamic_task_mapping": 0, "example_failed_dag": 1}, {
        d: r.output[-2000:] for d, r in examples["runs"].items()}
    for run in examples["runs"].values():
        assert "metatrail:" not in run.output, run.output[-3000:]


def test_every_recorded_event_is_valid(examples: dict[str, Any]) -> None:
    events = [e for es in examples["jobs"].values() for e in es]
    assert len(events) > 30
    for e in events:
        assert_valid(e)


def test_bash_example_records_rendered_commands_and_the_skip(examples: dict[str, Any]) -> None:
    jobs = examples["jobs"]
    ends = _ends(jobs, "example_bash_operator")
    # EmptyOperator tasks (run_this_last) never reach a task runner, so no hook fires for them
    assert set(ends) == {"runme_0", "runme_1", "runme_2", "run_after_loop", "also_run_this", "this_will_skip",
                         "describe_dag_folder", "show_dag_folder_stats"}
    runme = facet(ends["runme_0"])
    assert runme["params"]["template.bash_command"] == 'echo "example_bash_operator__runme_0__20240301" && sleep 1'
    assert runme["params"]["params.example_key"] == "example_value"
    assert facet(ends["this_will_skip"])["extra"]["airflowState"] == "skipped"
    assert {e["eventType"] for e in ends.values()} == {"COMPLETE"}
    assert [e["eventType"] for e in jobs["example_bash_operator"]] == ["START", "COMPLETE"]


def test_mapping_example_records_one_execution_per_map_index(examples: dict[str, Any]) -> None:
    add_one = examples["jobs"]["example_dynamic_task_mapping.add_one"]
    done = {facet(e)["extra"]["mapIndex"]: e for e in add_one if e["eventType"] == "COMPLETE"}
    assert sorted(done) == [0, 1, 2]
    assert {i: facet(e)["params"]["op_kwargs.x"] for i, e in done.items()} == {0: 1, 1: 2, 2: 3}
    assert len({e["run"]["runId"] for e in done.values()}) == 3
    sum_it = examples["jobs"]["example_dynamic_task_mapping.sum_it"]
    assert [e["eventType"] for e in sum_it] == ["START", "COMPLETE"]
    # The reduce task gets a lazy sequence of add_one's XComs: described by what it holds, never read by the plugin
    # (reading it asks the API server), and without a warning (test_examples_ran_as_airflow_intends).
    assert facet(sum_it[0])["params"] == {
        "op_args.0": "<LazyXComSequence of XCom 'return_value' of task 'add_one': length not read>"}
    assert not facet(sum_it[0]).get("warnings")


def test_failed_example_records_the_error_and_the_failed_dag_run(examples: dict[str, Any]) -> None:
    jobs = examples["jobs"]
    fail = jobs["example_failed_dag.fail_task"][-1]
    assert fail["eventType"] == "FAIL"
    assert fail["run"]["facets"]["errorMessage"]["message"] == (
        "RuntimeError: This is a test exception for stacktrace rendering")
    assert facet(fail)["extra"]["airflowState"] == "failed"
    run_end = jobs["example_failed_dag"][-1]
    assert run_end["eventType"] == "FAIL"
    assert run_end["run"]["facets"]["errorMessage"]["message"] == "task_failure"
    from metatrail.store import open_store

    with open_store(f"sqlite:///{examples['store']}") as store:
        states = {r["pipeline"]: r["state"] for r in store.list_runs(kind="pipeline_run")}
    assert states == {"example_bash_operator": "completed", "example_dynamic_task_mapping": "completed",
                      "example_failed_dag": "failed"}
