"""Fixtures for the Airflow plugin tests: one Airflow home and metadata DB per test session, real ``airflow`` CLI
runs, and the events they left in a metatrail store.

Airflow starts slowly on a loaded 2-core machine (``airflow dags test`` takes 10-30 s), so every test shares the one
``airflow db migrate``, each DAG is run once per session and several tests read that run's events.
Run with ``nox -s airflow`` (the Airflow environment); the plugin is active there because the package's
``airflow.plugins`` entry point is installed, exactly as for a user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import contextlib

from airflow_support import DAGS, AirflowHome, DagRun, base_env, dags_test


def pytest_configure(config: pytest.Config) -> None:
    # Test modules import airflow.sdk in-process; Airflow creates its home on import, so point it somewhere
    # disposable before any of them is collected.
    home = Path(tempfile.gettempdir()) / "metatrail-airflow-import-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> AirflowHome:
    """One migrated Airflow home (SQLite metadata DB) for the whole session."""
    path = tmp_path_factory.mktemp("airflow_home")
    (path / "plugins").mkdir()
    home = AirflowHome(path, base_env(path))
    done = home.run("db", "migrate", timeout=600)
    assert done.returncode == 0, f"airflow db migrate failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return home


@pytest.fixture(scope="session")
def pipeline_run(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> DagRun:
    """``mt_pipeline`` (the golden DAG: files, params, conf, mapping, a retry, a skip) run once per session."""
    run = dags_test(airflow_home, tmp_path_factory.mktemp("pipeline"), "mt_pipeline", "2024-01-01T00:00:00+00:00",
                    dagfile=DAGS / "mt_pipeline.py", conf={"label": "golden", "threshold": 3})
    assert run.proc.returncode == 0, run.output[-5000:]
    return run


@pytest.fixture
def clean_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is stopped (TERM, then KILL) when the test ends, whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                continue
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 9)
            p.wait(10)
