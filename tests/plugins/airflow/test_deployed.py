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

from metatrail.hashing import hash_path
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


class Components:
    """Airflow components of one deployment, started as subprocesses (each its own process group, logging to a file
    of its own in ``work``), over the metatrail store ``work/store/metatrail.db`` and the DAGs' data folder
    ``work/data``; ``env`` adds to or replaces Airflow's settings."""

    def __init__(self, airflow_home: AirflowHome, work: Path, **env: str) -> None:
        self.work, self.data, self.store = work, work / "data", work / "store" / "metatrail.db"
        self.data.mkdir()
        self.store.parent.mkdir()
        self.port = _free_port()
        self.env = {**airflow_home.env,
                    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                    "AIRFLOW__CORE__PARALLELISM": "2",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
                    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                    "METATRAIL_STORE": f"sqlite:///{self.store}",
                    "METATRAIL_HASH_CACHE": str(self.store.parent / "hashcache.db"),
                    "MT_TEST_DATA": str(self.data), **env}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []

    def start(self, name: str, *args: str) -> None:
        log = self.work / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as fh:
            self.procs[name] = subprocess.Popen([AIRFLOW, *args], env=self.env, cwd=self.work, stdout=fh,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_api_server(self) -> None:
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port))

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        return _wait(what, check, timeout, self.logs)

    def wait_for_the_end_event(self, dag_id: str) -> None:
        """The scheduler stores its DAG-run events from its writer thread: wait for them before stopping it."""
        self.wait("the DAG run's end event", lambda: any(
            e["job"]["name"] == dag_id and e["eventType"] in ("COMPLETE", "FAIL") for e in read_events(self.store)),
            60)

    def stop(self) -> dict[str, int]:
        """Stop every component; their pids by name."""
        pids = {name: p.pid for name, p in self.procs.items()}
        _stop(list(self.procs.values()))
        return pids

    def result(self, state: Any, pids: dict[str, int]) -> dict[str, Any]:
        return {"state": state, "store": self.store, "data": self.data, "pids": pids, "logs": self.logs}


@pytest.fixture(scope="module")
def deployed(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start the three components, wait for the DAG run to finish and its events to be stored, stop them."""
    airflow = Components(airflow_home, tmp_path_factory.mktemp("deployed"))
    state = None
    try:
        airflow.start_api_server()
        airflow.start("dag-processor", "dag-processor")
        # The scheduler starts once the API server answers: a task launched before that fails to start.
        airflow.wait("the API server", lambda: _healthy(airflow.port), STARTUP_S)
        airflow.start("scheduler", "scheduler", "--skip-serve-logs")
        state = airflow.wait("the DAG run to finish", lambda: _dag_run_state(airflow_home.db), STARTUP_S + RUN_S)
        airflow.wait_for_the_end_event("mt_deployed")
    finally:
        pids = airflow.stop()
    return airflow.result(state, pids)


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
    """produced.txt is known from produce's return value and consume's argument; hooked.txt only from the
    hook-lineage collector of each task's own process (ObjectStoragePath write, then read)."""
    jobs = _jobs(deployed)
    data = deployed["data"]

    def versions(datasets: list[dict[str, Any]]) -> dict[str, str]:
        return {d["name"]: d["facets"]["version"]["datasetVersion"] for d in datasets}

    produced = versions(jobs["mt_deployed.produce"][-1]["outputs"])
    consumed = versions(jobs["mt_deployed.consume"][-1]["inputs"])
    names = {str(data / "produced.txt"), str(data / "hooked.txt")}
    assert set(produced) == names
    assert consumed == produced
    hooked = hash_path(data / "hooked.txt").hash
    assert hooked is not None and produced[str(data / "hooked.txt")] == hooked.value
