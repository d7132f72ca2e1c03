"""Every Airflow-version difference the plugin depends on, in one module.

Supported: Airflow 3.2 and later (tested on 3.3); on older versions the plugin switches itself off (logged once)
instead of recording half of what happens. Airflow 3.0 and 3.1 have no ``on_task_instance_skipped`` hook (it came in
3.2.0), so a task that skips itself would be recorded as started and never ended. Airflow 2.x task-instance hooks
take an ORM ``TaskInstance`` with database access and a ``session`` argument.

Everything here is imported lazily by the listener, inside a hook, in a process where Airflow is already loaded.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from metatrail.logsafe import log_once


@functools.cache
def airflow_version() -> str:
    """The installed Airflow version (``"unknown"`` when it cannot be told)."""
    try:
        from airflow import __version__

        return str(__version__)
    except Exception:  # a broken install must not break the host
        return "unknown"


MINIMUM_VERSION = (3, 2)  # on_task_instance_skipped (module docstring)


def supports(version: str) -> bool:
    """Whether an Airflow version string (``"3.2.0"``, ``"3.3.0rc1"``, ``"3.10.0.dev0"``) is supported."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= MINIMUM_VERSION


@functools.cache
def is_supported() -> bool:
    """True on Airflow 3.2 and later; logs once (and the plugin records nothing) on older versions."""
    ok = supports(airflow_version())
    if not ok:
        log_once("airflow-version", "metatrail: Airflow %s is not supported (needs %d.%d or later: older versions "
                 "report no end of a task that skips itself); recording nothing", airflow_version(),
                 *MINIMUM_VERSION)
    return ok


F = TypeVar("F", bound=Callable[..., Any])


def hookimpl() -> Callable[[F], F]:
    """Airflow's pluggy ``hookimpl`` marker (project ``"airflow"``; the core and Task SDK markers are the same)."""
    from airflow.listeners import hookimpl as marker

    return cast("Callable[[F], F]", marker)


def hook_lineage_reader_base() -> type:
    """The ``HookLineageReader`` base class; registering a subclass makes Airflow's hook-lineage collector live."""
    try:
        from airflow.sdk.lineage import HookLineageReader
    except ImportError:  # Airflow 2.10/2.11 kept it in core
        from airflow.lineage.hook import HookLineageReader  # type: ignore[no-redef]
    return HookLineageReader


def hook_lineage_collector() -> Any:
    """The process's hook-lineage collector (a no-op collector when no reader is registered)."""
    from airflow.sdk.lineage import get_hook_lineage_collector

    return get_hook_lineage_collector()


def hook_lineage_limit() -> int | None:
    """How many inputs (and, separately, outputs) the collector takes before it drops the rest
    (``[lineage] max_assets_per_collector``, read by Airflow when ``airflow.sdk.lineage`` is imported)."""
    from airflow.sdk import lineage

    limit = getattr(lineage, "MAX_COLLECTED_ASSETS", None)
    return limit if isinstance(limit, int) else None


def airflow_conf() -> Any:
    """Airflow's configuration parser (``airflow.cfg`` plus ``AIRFLOW__SECTION__KEY`` environment variables)."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:
        from airflow.configuration import conf
    return conf


@functools.cache
def redactor() -> Callable[[Any, str | None], Any]:
    """Airflow's secrets masker ``redact(value, name)``, so parameters never carry a secret Airflow knows about.

    Falls back to the identity (logged once) when no masker can be imported; the masker lives in private modules
    whose path has moved between releases.
    """
    for module in ("airflow.sdk._shared.secrets_masker", "airflow.sdk.execution_time.secrets_masker",
                   "airflow._shared.secrets_masker"):
        try:
            imported = __import__(module, fromlist=["redact"])
            redact: Callable[..., Any] = imported.redact
            return lambda value, name: redact(value, name)
        except (ImportError, AttributeError):
            continue
    log_once("airflow-redact", "metatrail: Airflow's secrets masker not found; parameters are recorded unmasked")
    return lambda value, name: value


def is_runtime_task_instance(task_instance: Any) -> bool:
    """True for the Task SDK's ``RuntimeTaskInstance``: the hook runs in the task's own process.

    Elsewhere (scheduler, API server) the hooks get an ORM ``TaskInstance``, which has no rendered task.
    """
    return type(task_instance).__name__ == "RuntimeTaskInstance"


def decorated_operator_base() -> type | None:
    """The TaskFlow ``DecoratedOperator`` class, whose arguments and return value are the task's data."""
    try:
        from airflow.sdk.bases.decorator import DecoratedOperator
    except ImportError:
        return None
    return DecoratedOperator
