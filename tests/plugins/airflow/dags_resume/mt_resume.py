"""Test DAG: tasks that leave their task-runner process without ending, then come back under the same try.

* ``wait_for_pokes`` is a sensor in ``mode="reschedule"``: every poke is a new task-runner process, the task is
  ``up_for_reschedule`` between pokes, and the second poke succeeds;
* ``wait_deferred`` defers once (``TaskDeferred`` with a trigger of :data:`PAUSE_S`): its process stops as ``deferred``,
  the trigger fires, and the task resumes in ``resume`` (a new process when deployed; the same one under
  ``airflow dags test``, which runs the trigger inline) and succeeds;
* ``after`` runs downstream of both.

Every pass of task code appends ``<task>:<phase>:<pid>:<unix time>`` to ``$MT_TEST_DATA/processes.txt``. Schedule
``None``: ``airflow dags test`` runs it, and the deployed test triggers it. It lives outside the shared DAG folder so
that the other deployed test's scheduler never sees it, and this one's never sees theirs. Nothing here knows about
metatrail.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from airflow.providers.standard.sensors.python import PythonSensor
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import BaseOperator, dag, task

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")
POKES_TO_SUCCEED = 2
# The pause before a poke or a resume comes back. Airflow's own race sets its floor: a task-runner process lingers a
# few seconds after its task left (5 s seen on a loaded 2-core machine, with or without metatrail), and when the next
# pass is already queued once the executor reports the old process finished, the scheduler takes that report for a
# state changed behind its back and fails the task.
PAUSE_S = 10


def _note(what: str) -> None:
    with open(os.path.join(DATA, "processes.txt"), "a") as fh:
        fh.write(f"{what}:{os.getpid()}:{time.time()}\n")


def _poke() -> bool:
    _note("wait_for_pokes:poke")
    with open(os.path.join(DATA, "processes.txt")) as fh:
        pokes = sum(1 for line in fh if line.startswith("wait_for_pokes:poke:"))
    return pokes >= POKES_TO_SUCCEED


class DeferOnce(BaseOperator):
    """Waits ``seconds`` in the triggerer, then finishes in ``resume``."""

    def __init__(self, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    def execute(self, context: Any) -> None:
        _note(f"{self.task_id}:execute")
        self.defer(trigger=TimeDeltaTrigger(dt.timedelta(seconds=self.seconds)), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> str:
        _note(f"{self.task_id}:resume")
        return "resumed"


@dag(dag_id="mt_resume", schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False,
     is_paused_upon_creation=False, tags=["metatrail-test"])
def mt_resume() -> None:
    sensor = PythonSensor(task_id="wait_for_pokes", python_callable=_poke, mode="reschedule", poke_interval=PAUSE_S,
                          timeout=300)
    deferred = DeferOnce(task_id="wait_deferred", seconds=PAUSE_S)

    @task
    def after() -> None:
        _note("after:run")

    [sensor, deferred] >> after()


mt_resume()
