"""Test DAG for fault containment: three small tasks whose results the tests compare with and without faults.

``$MT_TEST_FAULT`` injects a fault into metatrail inside the Airflow process that parses this file (``airflow dags
test`` runs the tasks in that same process):

* ``raise``: the plugin's translation code raises in every task-instance and DAG-run hook;
* ``hang``: the plugin's translation code blocks for ten minutes (the hook time cap must cut it short);
* ``slow_store``: every store write blocks for ten minutes (the flush bounds must cut it short).

A store that cannot be written needs no injection: the tests point ``METATRAIL_STORE`` under a regular file.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag, task

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")
FAULT = os.environ.get("MT_TEST_FAULT", "")


def _inject(fault: str) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    def block(*args: Any, **kwargs: Any) -> Any:
        time.sleep(600)

    if fault == "raise":
        from metatrail.plugins.airflow import adapter

        adapter.task_params = boom
        adapter.declared_artifacts = boom
    elif fault == "hang":
        from metatrail.plugins.airflow import adapter

        adapter.task_params = block
    elif fault == "slow_store":
        from metatrail.store.sql import SqlStore
        from metatrail.store.sqlite_writer import SqliteWriter

        SqlStore.ingest = block  # type: ignore[method-assign]
        SqliteWriter.ingest = block  # type: ignore[method-assign]  # the Recorder's writer on an embedded store


if FAULT:
    _inject(FAULT)


@dag(dag_id="mt_faults", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["metatrail-test"])
def mt_faults() -> None:
    @task
    def write() -> str:
        path = os.path.join(DATA, "written.txt")
        with open(path, "w") as fh:
            fh.write("payload\n")
        return path

    @task
    def measure(path: str) -> int:
        with open(path) as fh:
            return len(fh.read()) * 6

    shell = BashOperator(task_id="shell", bash_command=f"cat {DATA}/written.txt > {DATA}/copied.txt")

    measure(write()) >> shell


mt_faults()
