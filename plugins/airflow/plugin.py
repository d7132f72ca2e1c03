"""The ``AirflowPlugin`` that Airflow finds through the ``airflow.plugins`` entry point: install metatrail with the
``airflow`` extra and every Airflow component loads it; nothing else to configure.

It contributes the listener and a hook-lineage reader. Registering any reader is what switches Airflow's hook-lineage
collector from a no-op to a live one, so ``ObjectStoragePath`` reads/writes and instrumented hooks report the
datasets a task touched.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from metatrail.plugins.airflow.compat import hook_lineage_reader_base
from metatrail.plugins.airflow.listener import MetatrailListener

#: The one listener of this process (benchmarks read its ``timings``).
LISTENER = MetatrailListener()


class MetatrailHookLineageReader(hook_lineage_reader_base()):  # type: ignore[misc]
    """Marks hook lineage as wanted; the listener reads the collector itself, per task-instance try."""


class MetatrailPlugin(AirflowPlugin):
    """Records every DAG run and task-instance try with metatrail (see the package docstring)."""

    # Unique: Airflow's entry-point loader stops at the first duplicate plugin name.
    name = "metatrail"
    listeners = [LISTENER]
    hook_lineage_readers = [MetatrailHookLineageReader]
