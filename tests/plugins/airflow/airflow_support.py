"""Helpers of the Airflow plugin tests: a migrated Airflow home, ``airflow dags test`` runs, and reading back the
events they left in a metatrail store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DAGS = HERE / "dags"
GOLDEN = HERE / "golden"
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
JWT_SECRET = "metatrail-airflow-tests-not-a-secret-" + "0123456789abcdef" * 4  # >= 64 bytes for HS512


@dataclass
class AirflowHome:
    """A migrated Airflow home and the environment every ``airflow`` command of the session runs with."""

    path: Path
    env: dict[str, str]

    @property
    def db(self) -> Path:
        return self.path / "airflow.db"

    def run(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``airflow <args>`` to completion (output captured, never raises on a non-zero exit)."""
        full = {**self.env, **(env or {})}
        for key in [k for k, v in full.items() if v is None]:
            del full[key]
        return subprocess.run([AIRFLOW, *args], env=full, cwd=cwd or self.path, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def task_states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
        """``{(task_id, map_index): state}`` of one DAG run, read from Airflow's metadata DB."""
        with sqlite3.connect(self.db) as db:
            rows = db.execute("SELECT task_id, map_index, state FROM task_instance WHERE dag_id=? AND run_id=?",
                              (dag_id, run_id)).fetchall()
        return {(t, m): s for t, m, s in rows}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        """The ``return_value`` XCom a task pushed in one DAG run (JSON-decoded)."""
        with sqlite3.connect(self.db) as db:
            row = db.execute("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND "
                             "key='return_value'", (dag_id, run_id, task_id)).fetchone()
        assert row is not None, f"no XCom from {dag_id}.{task_id} in {run_id}"
        value = row[0]
        return json.loads(value) if isinstance(value, str | bytes) else value


def base_env(home: Path) -> dict[str, str]:
    """The environment of a user's Airflow: nothing of the developer's Airflow or metatrail settings leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "METATRAIL_", "PYTEST"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


@dataclass
class DagRun:
    """One finished ``airflow dags test`` run and what it left behind."""

    dag_id: str
    run_id: str
    logical_date: str
    store: Path
    data: Path
    proc: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.store}"

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def events(self) -> list[dict[str, Any]]:
        """Every event in this run's store, in log order ([] when the store was never created)."""
        return read_events(self.store)


def read_events(store: Path) -> list[dict[str, Any]]:
    """The events of an SQLite store file, through metatrail's own store API."""
    if not store.exists():
        return []
    from metatrail.store import open_store

    with open_store(f"sqlite:///{store}") as s:
        return [e.body for e in s.iter_events()]


def dags_test(home: AirflowHome, workdir: Path, dag_id: str, logical_date: str, *, dagfile: Path | None = None,
              conf: Mapping[str, Any] | None = None, env: Mapping[str, str | None] | None = None,
              timeout: float = 420) -> DagRun:
    """``airflow dags test`` one DAG into a fresh store under ``workdir``; returns the run (never asserts)."""
    store = workdir / "store" / "metatrail.db"
    data = workdir / "data"
    store.parent.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    args = ["dags", "test", dag_id, logical_date]
    if dagfile is not None:
        args += ["-f", str(dagfile)]
    if conf is not None:
        args += ["-c", json.dumps(conf)]
    run_env: dict[str, Any] = {"METATRAIL_STORE": f"sqlite:///{store}",
                               "METATRAIL_HASH_CACHE": str(store.parent / "hashcache.db"),
                               "MT_TEST_DATA": str(data), **(env or {})}
    started = time.monotonic()
    proc = home.run(*args, env=run_env, timeout=timeout, cwd=workdir)
    seconds = time.monotonic() - started
    # Airflow 3 names a test run after the time it was made, not its logical date: read it back.
    with sqlite3.connect(home.db) as db:
        row = db.execute("SELECT run_id FROM dag_run WHERE dag_id=? ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
    return DagRun(dag_id, row[0] if row else "", logical_date, store, data, proc, seconds)


def by_job(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped by job name, in log order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(e["job"]["name"], []).append(e)
    return out


def facet(event: Mapping[str, Any], name: str = "metatrail_execution") -> dict[str, Any]:
    """One run facet of an event."""
    value: dict[str, Any] = event["run"]["facets"][name]
    return value
