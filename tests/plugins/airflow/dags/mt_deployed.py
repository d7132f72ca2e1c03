"""Test DAG for a deployed Airflow (scheduler + dag-processor + API server, LocalExecutor): two tasks that write
the id of the process running their code next to their data, so the test can tell which process ran the hooks.
They also pass a file through ``ObjectStoragePath`` only (hook-level lineage, collected in each task's own process).

Scheduled ``@once`` and unpaused on creation: the scheduler starts it as soon as the DAG is parsed.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import ObjectStoragePath, dag, task

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")


@dag(dag_id="mt_deployed", schedule="@once", start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["metatrail-test"])
def mt_deployed() -> None:
    @task
    def produce() -> str:
        with open(os.path.join(DATA, "produce.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        with ObjectStoragePath(f"file://{DATA}/hooked.txt").open("w") as fh:
            fh.write("written through a hook\n")
        path = os.path.join(DATA, "produced.txt")
        with open(path, "w") as fh:
            fh.write("made by a deployed Airflow\n")
        return path

    @task
    def consume(path: str) -> int:
        with open(os.path.join(DATA, "consume.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        with ObjectStoragePath(f"file://{DATA}/hooked.txt").open("r") as hooked:
            hooked.read()
        with open(path) as fh:
            return len(fh.read())

    consume(produce())


mt_deployed()
