"""Test DAG: a three-stage file pipeline (extract → transform → load) plus the task shapes the plugin must tell
apart: a mapped task, a task that fails once and succeeds on retry, a task that skips itself.

Data lives in ``$MT_TEST_DATA``. Nothing here knows about metatrail: the plugin records it implicitly.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import Asset, ObjectStoragePath, dag, task
from airflow.sdk.exceptions import AirflowSkipException

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")


@dag(dag_id="mt_pipeline", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     params={"rows": 4}, tags=["metatrail-test"])
def mt_pipeline() -> None:
    @task
    def extract(params: dict | None = None) -> str:
        """Writes raw.csv (``rows`` lines) and returns its path: an output known only from the return value."""
        path = os.path.join(DATA, "raw.csv")
        with open(path, "w") as fh:
            fh.writelines(f"{i},{i * i}\n" for i in range((params or {}).get("rows", 4)))
        return path

    @task(outlets=[Asset(f"file://{DATA}/clean.csv")])
    def transform(raw: str, factor: int = 10) -> str:
        """Reads its argument path; writes clean.csv through ObjectStoragePath (hook lineage) and a declared outlet."""
        with open(raw) as fh:
            rows = [line.strip().split(",") for line in fh]
        out = ObjectStoragePath(f"file://{DATA}/clean.csv")
        out.write_text("".join(f"{a},{int(b) * factor}\n" for a, b in rows))
        return str(out)

    load = BashOperator(
        task_id="load",
        bash_command=f"wc -l < {{{{ ti.xcom_pull(task_ids='transform') | replace('file://', '') }}}} "
                     f"> {DATA}/report.txt",
        inlets=[Asset(f"file://{DATA}/clean.csv")],
        # a remote outlet as well: named in lineage, never downloaded
        outlets=[Asset(f"file://{DATA}/report.txt"), Asset("s3://mt-reports/daily/report.txt")],
    )

    @task
    def shard(index: int) -> int:
        return index * 2

    @task(retries=1, retry_delay=timedelta(seconds=0))
    def flaky(**context: object) -> str:
        """Fails on its first try, succeeds on the second: two executions of one stage."""
        if context["ti"].try_number == 1:  # type: ignore[attr-defined]
            raise ValueError("first try fails")
        return "recovered"

    @task
    def nothing_to_do() -> None:
        raise AirflowSkipException("no new data")

    transform(extract()) >> load
    shard.expand(index=[1, 2])
    flaky()
    nothing_to_do()


mt_pipeline()
