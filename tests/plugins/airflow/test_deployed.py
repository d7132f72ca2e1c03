"""A deployed Airflow: API server, dag-processor and scheduler (LocalExecutor, SQLite metadata DB, loopback only),
one short ``@once`` DAG run. Shows where the hooks fire: task-instance hooks in each task's own process (the process
that ran the task's code), DAG-run hooks in the scheduler, and ids that agree although no two of them talk.

Not ``airflow standalone``: it serves logs on every interface.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import AIRFLOW, AirflowHome, by_job, facet, read_events
from olspec import assert_valid

from metatrail.model import uuid7_from

STARTUP_S = 240  # API server healthy and DAG parsed, on a loaded 2-core machine
RUN_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Any, timeout: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _dag_run_state(db: Path) -> str | None:
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT state FROM dag_run WHERE dag_id='mt_deployed'").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row and row[0] in ("success", "failed") else None


@pytest.fixture(scope="module")
def deployed(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start the three components, wait for the DAG run to finish and its events to be stored, stop them."""
    work = tmp_path_factory.mktemp("deployed")
    data, store = work / "data", work / "store" / "metatrail.db"
    data.mkdir()
    store.parent.mkdir()
    port = _free_port()
    env = {**airflow_home.env,
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__PARALLELISM": "2",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
           "METATRAIL_STORE": f"sqlite:///{store}",
           "METATRAIL_HASH_CACHE": str(store.parent / "hashcache.db"),
           "MT_TEST_DATA": str(data)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: list[Path] = []

    def start(name: str, *args: str) -> None:
        log = work / f"{name}.log"
        logs.append(log)
        with log.open("wb") as fh:
            procs[name] = subprocess.Popen([AIRFLOW, *args], env=env, cwd=work, stdout=fh, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    try:
        start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        start("dag-processor", "dag-processor")
        # The scheduler starts once the API server answers: a task launched before that fails to start.
        _wait("the API server", lambda: _healthy(port), STARTUP_S, logs)
        start("scheduler", "scheduler", "--skip-serve-logs")
        state = _wait("the DAG run to finish", lambda: _dag_run_state(airflow_home.db), STARTUP_S + RUN_S, logs)
        # The scheduler stores its DAG-run events from its writer thread; wait for them before stopping it.
        _wait("the DAG run's end event", lambda: any(
            e["job"]["name"] == "mt_deployed" and e["eventType"] in ("COMPLETE", "FAIL") for e in read_events(store)),
            60, logs)
    finally:
        pids = {name: p.pid for name, p in procs.items()}
        _stop(list(procs.values()))
    return {"state": state, "store": store, "data": data, "pids": pids, "logs": logs}


def _jobs(deployed: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Events by job; fails with the components' logs when a task recorded nothing."""
    jobs = by_job(read_events(deployed["store"]))
    missing = {"mt_deployed", "mt_deployed.produce", "mt_deployed.consume"} - set(jobs)
    if missing:
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in deployed["logs"])
        pytest.fail(f"no events for {sorted(missing)}\n{tails}")
    return jobs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 15)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # The LocalExecutor can wait forever for an idle worker on shutdown; this is our own process group.
            os.killpg(p.pid, 9)
            p.wait(30)


def test_the_dag_run_succeeds_with_the_plugin_loaded(deployed: dict[str, Any]) -> None:
    assert deployed["state"] == "success", "\n".join(p.read_text()[-2000:] for p in deployed["logs"])
    assert (deployed["data"] / "produced.txt").read_text() == "made by a deployed Airflow\n"


def test_task_hooks_fire_in_the_process_that_ran_the_task(deployed: dict[str, Any]) -> None:
    jobs = _jobs(deployed)
    components = set(deployed["pids"].values())
    task_pids = {}
    for task_id in ("produce", "consume"):
        events = jobs[f"mt_deployed.{task_id}"]
        assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
        ran_in = int((deployed["data"] / f"{task_id}.pid").read_text())
        assert {facet(e)["pid"] for e in events} == {ran_in}, "hooks ran outside the task's own process"
        task_pids[task_id] = ran_in
        assert "metatrail_energy" in events[-1]["run"]["facets"]
    assert task_pids["produce"] != task_pids["consume"]
    assert not components & set(task_pids.values())


def test_dag_run_hooks_fire_in_the_scheduler_and_ids_agree(deployed: dict[str, Any]) -> None:
    jobs = _jobs(deployed)
    for e in (e for es in jobs.values() for e in es):
        assert_valid(e)
    run_events = jobs["mt_deployed"]
    assert [e["eventType"] for e in run_events] == ["START", "COMPLETE"]
    assert {facet(e)["pid"] for e in run_events} == {deployed["pids"]["scheduler"]}
    logical = 1704067200.0  # 2024-01-01T00:00:00Z, the @once run's logical date
    pipeline_id = uuid7_from(logical, "mt_deployed.scheduled__2024-01-01T00:00:00+00:00")
    assert {e["run"]["runId"] for e in run_events} == {pipeline_id}
    for task_id in ("produce", "consume"):
        for e in jobs[f"mt_deployed.{task_id}"]:
            assert e["run"]["facets"]["parent"]["run"]["runId"] == pipeline_id  # computed in another process
            assert facet(e)["extra"]["runType"] == "scheduled"


def test_lineage_links_the_two_task_processes(deployed: dict[str, Any]) -> None:
    jobs = _jobs(deployed)
    produced = jobs["mt_deployed.produce"][-1]["outputs"]
    consumed = jobs["mt_deployed.consume"][-1]["inputs"]
    assert [d["name"] for d in produced] == [str(deployed["data"] / "produced.txt")]
    assert [d["facets"]["version"]["datasetVersion"] for d in consumed] == [
        d["facets"]["version"]["datasetVersion"] for d in produced]
