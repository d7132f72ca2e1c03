"""Test DAG: a start hook that overruns its time cap while the task itself is quick.

``use`` takes a value whose ``repr`` is slow (``$MT_TEST_SLOW_REPR_S`` seconds, as a handle that summarises remote
contents when printed): recording its parameters makes the start hook overrun the cap, and the task ends before that
hook does, so its end hook arrives while the worker is still busy. ``settle`` outlasts the slow hook, so the process
lives until everything queued has run. Nothing here knows about metatrail.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime

from airflow.sdk import dag, task

SLOW_S = float(os.environ.get("MT_TEST_SLOW_REPR_S", "0"))


@dataclass
class Batch:
    """A task's result handed on through XCom."""

    name: str

    def __repr__(self) -> str:
        time.sleep(SLOW_S)
        return f"Batch({self.name})"


@dag(dag_id="mt_slow_start", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["metatrail-test"])
def mt_slow_start() -> None:
    @task
    def make() -> Batch:
        return Batch("b1")

    @task
    def use(batch: Batch) -> str:
        return batch.name

    @task
    def settle(name: str) -> str:
        time.sleep(2 * SLOW_S)
        return name

    settle(use(make()))


mt_slow_start()
