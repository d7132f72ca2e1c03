"""Tasks that leave their task-runner process without ending and come back under the same try: a sensor in
``mode="reschedule"`` (a new process per poke, ``up_for_reschedule`` between pokes) and a deferrable operator
(``deferred`` while its trigger waits, then resumed). Airflow calls no end hook when such a process stops, only
``before_stopping``, and ``on_task_instance_running`` again where the try resumes. Each try must still be ONE
execution, started when its first pass started, ended once, completed.

Run twice: ``airflow dags test`` (every pass in its one process, the trigger run inline) and a deployed Airflow
with a triggerer (every pass in a task-runner process of its own).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import AIRFLOW, HERE, AirflowHome, DagRun, by_job, dags_test, facet, read_events
from olspec import assert_valid
from test_deployed import RUN_S, STARTUP_S, Components, _healthy

from metatrail.model import uuid7_from
from metatrail.store.projection import parse_event_time

DAGFILE = HERE / "dags_resume" / "mt_resume.py"
LEAVING = ("wait_for_pokes", "wait_deferred")  # tasks whose one try runs in several passes
PASSES = {"wait_for_pokes": ("poke", "poke"), "wait_deferred": ("execute", "resume")}
DEPLOYED_RUN_ID = "mt_resume_deployed"
DEPLOYED_LOGICAL = "2024-01-02T00:00:00+00:00"


@pytest.fixture(scope="module")
def resume_run(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> DagRun:
    """``airflow dags test`` of ``mt_resume``: all passes in one process."""
    run = dags_test(airflow_home, tmp_path_factory.mktemp("resume"), "mt_resume", "2024-01-01T00:00:00+00:00",
                    dagfile=DAGFILE, env={"AIRFLOW__CORE__DAGS_FOLDER": str(DAGFILE.parent)})
    assert run.proc.returncode == 0, run.output[-5000:]
    return run


def _passes(data: Path) -> dict[str, list[tuple[str, int, float]]]:
    """``{task: [(phase, pid, time), ...]}`` from the DAG's own notes, in order."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for line in (data / "processes.txt").read_text().splitlines():
        task_id, phase, pid, at = line.split(":")
        out.setdefault(task_id, []).append((phase, int(pid), float(at)))
    return out


def _check_one_execution_per_try(events: list[dict[str, Any]], store: Path, data: Path, run_id: str,
                                 logical: float, *, whole_duration: tuple[str, ...] = LEAVING,
                                 ) -> dict[str, list[dict[str, Any]]]:
    """What both ways of running must show; returns the events by job. ``whole_duration``: the tasks whose end
    event's ``durationSeconds`` spans every pass (a new process of a rescheduled sensor knows only its own start)."""
    for event in events:
        assert_valid(event)
    jobs = by_job(events)
    passes = _passes(data)
    pipeline_id = uuid7_from(logical, f"mt_resume.{run_id}")
    from metatrail.store import open_store

    with open_store(f"sqlite:///{store}") as s:
        for task_id in LEAVING:
            assert [p[0] for p in passes[task_id]] == list(PASSES[task_id])
            mine = jobs[f"mt_resume.{task_id}"]
            execution_id = uuid7_from(logical, f"mt_resume.{run_id}.{task_id}.1.-1")
            assert {e["run"]["runId"] for e in mine} == {execution_id}, "a pass became an execution of its own"
            assert {facet(e)["tryNumber"] for e in mine} == {1}
            assert all(e["run"]["facets"]["parent"]["run"]["runId"] == pipeline_id for e in mine)
            types = [e["eventType"] for e in mine]
            assert set(types) == {"START", "COMPLETE"}, f"{task_id}: {types}"  # no FAIL / ABORT for a pause
            assert types.count("COMPLETE") == 1 and types[-1] == "COMPLETE"
            done = mine[-1]
            assert facet(done)["extra"]["airflowState"] == "success"
            assert "metatrail_energy" in done["run"]["facets"]
            # The store: one run, completed, started when the first pass started, lasting until the last ended.
            run = s.get_run(execution_id)
            assert run is not None
            assert run["state"] == "completed"
            first_code, last_code = passes[task_id][0][2], passes[task_id][-1][2]
            assert run["started_at"] == min(parse_event_time(e["eventTime"]) for e in mine if e["eventType"] == "START")
            assert run["started_at"] <= first_code + 0.01, "started_at is a later pass's start, not the first's"
            assert run["ended_at"] >= last_code - 0.01
            # The end event's own duration spans every pass too (not only the last one's).
            if task_id in whole_duration:
                duration = facet(done)["durationSeconds"]
                assert duration == pytest.approx(run["ended_at"] - run["started_at"], abs=0.01)
                assert duration >= last_code - first_code
        pipeline = s.get_run(pipeline_id)
        assert pipeline is not None
        assert pipeline["state"] == "completed"
        assert sorted(c["stage"] for c in pipeline["children"]) == ["after", "wait_deferred", "wait_for_pokes"]
        assert all(c["state"] == "completed" for c in pipeline["children"])
    assert [e["eventType"] for e in jobs["mt_resume.after"]] == ["START", "COMPLETE"]
    return jobs


# -- airflow dags test ------------------------------------------------------------------------------------------
def test_dags_test_records_one_completed_execution_per_try(airflow_home: AirflowHome, resume_run: DagRun) -> None:
    states = airflow_home.task_states("mt_resume", resume_run.run_id)
    assert states == {(t, -1): "success" for t in ("wait_for_pokes", "wait_deferred", "after")}
    logical = dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()
    _check_one_execution_per_try(resume_run.events(), resume_run.store, resume_run.data, resume_run.run_id, logical)


def test_dags_test_passes_that_left_do_not_stay_metered(resume_run: DagRun) -> None:
    """Under ``dags test`` every pass runs in the one process: a pass that left without an end hook must not stay
    registered with the energy meter, or every later task's CPU time is split with phantom tasks."""
    jobs = by_job(resume_run.events())
    for task_id in (*LEAVING, "after"):
        energy = jobs[f"mt_resume.{task_id}"][-1]["run"]["facets"]["metatrail_energy"]
        assert not [e for e in energy.get("errors", []) if "concurrent tasks" in e], (task_id, energy["errors"])
        assert energy["max_concurrent_tasks"] <= 2, (task_id, energy["max_concurrent_tasks"])


def test_dags_test_left_no_warning_from_metatrail(resume_run: DagRun) -> None:
    assert "metatrail:" not in resume_run.output, resume_run.output[-3000:]


# -- deployed, with a triggerer -----------------------------------------------------------------------------------
def _run_state(db: Path) -> str | None:
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT state FROM dag_run WHERE dag_id='mt_resume' AND run_id=?",
                               (DEPLOYED_RUN_ID,)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row and row[0] in ("success", "failed") else None


def _parsed_since(db: Path, since: dt.datetime) -> bool:
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT last_parsed_time FROM dag WHERE dag_id='mt_resume'").fetchone()
    except sqlite3.Error:
        return False
    if not row or not row[0]:
        return False
    parsed = dt.datetime.fromisoformat(str(row[0]))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)) >= since


@pytest.fixture(scope="module")
def deployed_resume(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """API server, dag-processor, triggerer and scheduler (LocalExecutor) over a DAG folder holding only
    ``mt_resume``; one triggered run, waited for until its events are stored."""
    airflow = Components(airflow_home, tmp_path_factory.mktemp("deployed_resume"),
                         AIRFLOW__CORE__DAGS_FOLDER=str(DAGFILE.parent))

    def cli(*args: str) -> None:
        done = subprocess.run([AIRFLOW, *args], env=airflow.env, cwd=airflow.work, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    began = dt.datetime.now(dt.UTC)
    state = None
    try:
        airflow.start_api_server()
        airflow.start("dag-processor", "dag-processor")
        airflow.start("triggerer", "triggerer", "--skip-serve-logs")
        airflow.wait("the API server", lambda: _healthy(airflow.port), STARTUP_S)
        airflow.wait("mt_resume to be parsed", lambda: _parsed_since(airflow_home.db, began), STARTUP_S)
        airflow.start("scheduler", "scheduler", "--skip-serve-logs")
        cli("dags", "unpause", "mt_resume")
        cli("dags", "trigger", "mt_resume", "--run-id", DEPLOYED_RUN_ID, "--logical-date", DEPLOYED_LOGICAL)
        state = airflow.wait("the DAG run to finish", lambda: _run_state(airflow_home.db), RUN_S)
        airflow.wait_for_the_end_event("mt_resume")
    finally:
        pids = airflow.stop()
    return airflow.result(state, pids)


def test_deployed_passes_run_in_processes_of_their_own(deployed_resume: dict[str, Any]) -> None:
    assert deployed_resume["state"] == "success", "\n".join(p.read_text()[-2000:] for p in deployed_resume["logs"])
    passes = _passes(deployed_resume["data"])
    for task_id in LEAVING:
        pids = [pid for _, pid, _ in passes[task_id]]
        assert len(set(pids)) == len(pids), f"{task_id}: passes shared a process, nothing left one: {pids}"


def test_deployed_records_one_completed_execution_per_try(deployed_resume: dict[str, Any]) -> None:
    events = read_events(deployed_resume["store"])
    logical = dt.datetime.fromisoformat(DEPLOYED_LOGICAL).timestamp()
    # A deferred task resumes with Airflow's first start_date; a rescheduled poke knows only its own start.
    jobs = _check_one_execution_per_try(events, deployed_resume["store"], deployed_resume["data"], DEPLOYED_RUN_ID,
                                        logical, whole_duration=("wait_deferred",))
    passes = _passes(deployed_resume["data"])
    for task_id in LEAVING:
        mine = jobs[f"mt_resume.{task_id}"]
        # Each pass's process stored its START at before_stopping (no end hook came); the last one ended the try.
        pass_pids = [pid for _, pid, _ in passes[task_id]]
        assert sorted(facet(e)["pid"] for e in mine if e["eventType"] == "START") == sorted(pass_pids)
        assert facet(mine[-1])["pid"] == pass_pids[-1]
