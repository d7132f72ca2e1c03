"""Test DAG for a deployed Airflow (scheduler + dag-processor + API server, LocalExecutor): two tasks that write
the id of the process running their code next to their data, so the test can tell which process ran the hooks.

Scheduled ``@once`` and unpaused on creation: the scheduler starts it as soon as the DAG is parsed.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import dag, task

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")


@dag(dag_id="mt_deployed", schedule="@once", start_date=datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["metatrail-test"])
def mt_deployed() -> None:
    @task
    def produce() -> str:
        with open(os.path.join(DATA, "produce.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        path = os.path.join(DATA, "produced.txt")
        with open(path, "w") as fh:
            fh.write("made by a deployed Airflow\n")
        return path

    @task
    def consume(path: str) -> int:
        with open(os.path.join(DATA, "consume.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        with open(path) as fh:
            return len(fh.read())

    consume(produce())


mt_deployed()
