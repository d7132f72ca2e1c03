"""Test DAG: independent tasks that each bring something awkward to the plugin.

* ``call_api`` fails with an error whose message quotes a connection's password (as ``requests`` quotes a URL with
  an ``api_key``); Airflow masks it in its own task log;
* ``load`` is a custom operator whose template field holds a value with DataFrame semantics (``==`` answers with a
  frame, ``bool()`` raises);
* ``overwrite`` rewrites a file that exists before it runs, given as an argument and returned (an in-place update).

Data lives in ``$MT_TEST_DATA``; the connection is ``$AIRFLOW_CONN_MT_DB``. The DAG run fails (``call_api``).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, dag, task

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")


class Frame:
    """Behaves like a pandas DataFrame under ``==`` and ``bool()``."""

    def __eq__(self, other: object) -> Frame:  # type: ignore[override]
        return Frame()

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        raise ValueError("The truth value of a DataFrame is ambiguous. Use a.empty, a.bool(), a.item(), a.any() or "
                         "a.all().")

    def __repr__(self) -> str:
        return "Frame(3 rows)"


class LoadOperator(BaseOperator):
    """Loads a frame into a table (here: only returns the table name)."""

    template_fields = ("frame", "table")

    def __init__(self, frame: Frame, table: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frame = frame
        self.table = table

    def execute(self, context: Any) -> str:
        return self.table


@dag(dag_id="mt_hazards", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["metatrail-test"])
def mt_hazards() -> None:
    @task
    def call_api(token: str) -> None:
        raise RuntimeError(f"401 Client Error: Unauthorized for url: https://api.example/v1/items?api_key={token}")

    @task
    def prepare() -> None:
        for name, text in (("in.csv", "a,b\n"), ("out.csv", "last run's output\n")):
            with open(os.path.join(DATA, name), "w") as fh:
                fh.write(text)

    @task
    def overwrite(src: str, dst: str) -> str:
        with open(src) as fin, open(dst, "w") as fout:
            fout.write(fin.read().upper())
        return dst

    call_api("{{ conn.mt_db.password }}")
    LoadOperator(task_id="load", frame=Frame(), table="sales_{{ ds_nodash }}")
    prepare() >> overwrite(os.path.join(DATA, "in.csv"), os.path.join(DATA, "out.csv"))


mt_hazards()
