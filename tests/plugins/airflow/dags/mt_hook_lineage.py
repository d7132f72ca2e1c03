"""Test DAG: datasets known only from Airflow's hook-lineage collector. The tasks read and write files through
``ObjectStoragePath`` and nothing else tells what they touched: no inlets, no outlets, no arguments, no return values.

* ``copy_through_hooks`` reads source.txt and writes copied.txt;
* ``reread`` reads source.txt again through the same module-level path object: Airflow's collector keys an entry by
  (asset, context object), so under ``airflow dags test`` (one process, one collector) this only counts up the entry
  ``copy_through_hooks`` made;
* ``fill`` writes more files than the collector takes (``[lineage] max_assets_per_collector``, 100 by default);
  ``after_full`` then writes late.txt, which Airflow drops.

Data lives in ``$MT_TEST_DATA``. Nothing here knows about metatrail.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import ObjectStoragePath, dag, task

DATA = os.environ.get("MT_TEST_DATA", "/tmp/mt-airflow-data")
FILLERS = 100
SOURCE = ObjectStoragePath(f"file://{DATA}/source.txt")


@dag(dag_id="mt_hook_lineage", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
     tags=["metatrail-test"])
def mt_hook_lineage() -> None:
    @task
    def seed() -> None:
        """Writes source.txt with plain ``open``: no lineage."""
        with open(os.path.join(DATA, "source.txt"), "w") as fh:
            fh.write("read through a hook\n")

    @task
    def copy_through_hooks() -> None:
        with SOURCE.open("r") as src:
            text = src.read()
        with ObjectStoragePath(f"file://{DATA}/copied.txt").open("w") as dst:
            dst.write(text.upper())

    @task
    def reread() -> None:
        with SOURCE.open("r") as src:
            src.read()

    @task
    def fill() -> None:
        for i in range(FILLERS):
            with ObjectStoragePath(f"file://{DATA}/filler-{i:03d}.txt").open("w") as dst:
                dst.write(f"{i}\n")

    @task
    def after_full() -> None:
        with ObjectStoragePath(f"file://{DATA}/late.txt").open("w") as dst:
            dst.write("written after the collector was full\n")

    seed() >> copy_through_hooks() >> reread() >> fill() >> after_full()


mt_hook_lineage()
