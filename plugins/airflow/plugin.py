"""The ``AirflowPlugin`` that Airflow finds through the ``airflow.plugins`` entry point: install metatrail with the
``airflow`` extra and every Airflow component loads it; nothing else to configure.

It contributes the listener and, while recording is on, a hook-lineage reader. Registering any reader is what
switches Airflow's hook-lineage collector from a no-op to a live one (``airflow.sdk.lineage.
get_hook_lineage_collector`` checks whether any loaded plugin lists one), so ``ObjectStoragePath`` reads/writes and
instrumented hooks report the datasets a task touched. With metatrail switched off the reader is not registered, so
Airflow keeps its no-op collector and the kill switch leaves Airflow exactly as without metatrail (as does an
unsupported Airflow version).
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from metatrail.config import is_disabled
from metatrail.logsafe import log_once
from metatrail.plugins.airflow.compat import hook_lineage_reader_base, is_supported
from metatrail.plugins.airflow.config import plugin_config
from metatrail.plugins.airflow.listener import MetatrailListener

#: The one listener of this process (benchmarks read its ``timings``).
LISTENER = MetatrailListener()


class MetatrailHookLineageReader(hook_lineage_reader_base()):  # type: ignore[misc]
    """Marks hook lineage as wanted; the listener reads the collector itself, per task-instance try."""


def recording_enabled() -> bool:
    """False under ``METATRAIL_DISABLED=1`` or ``[metatrail] disabled = True`` (the checks every hook makes)."""
    try:
        return not is_disabled() and not plugin_config().disabled
    except Exception as exc:  # the host must load its plugins whatever happens here
        log_once("plugin-enabled", "metatrail: could not read its configuration (%s); hook lineage stays off", exc)
        return False


class MetatrailPlugin(AirflowPlugin):
    """Records every DAG run and task-instance try with metatrail (see the package docstring)."""

    # Unique: Airflow's entry-point loader stops at the first duplicate plugin name.
    name = "metatrail"
    listeners = [LISTENER]
    hook_lineage_readers: list[Any] = []

    def on_load(self, *args: Any, **kwargs: Any) -> None:
        """Airflow calls this once per process, on the instance it keeps, before anything asks for hook-lineage
        readers: the configuration is read then, not when this module is imported."""
        if recording_enabled() and is_supported():
            self.hook_lineage_readers = [MetatrailHookLineageReader]
