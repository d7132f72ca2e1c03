"""Energy and carbon per task execution: meters behind one interface, attribution across concurrent tasks.

Public API::

    from metatrail.energy import get_monitor
    monitor = get_monitor()                     # process-wide, lazy, never raises
    token = monitor.task_started(execution_id, pid=os.getpid(), include_children=True)
    stopped = monitor.task_stopped(token)       # cheap, on the task's thread
    facet = monitor.task_report(stopped)        # later, any thread: the ``metatrail_energy`` run-facet body,
                                                # or None when off (``task_finished(token)`` does both)

Switches (read at the first ``get_monitor()`` call, not at import): ``METATRAIL_DISABLED=1`` or
``METATRAIL_ENERGY=0`` give a monitor that does nothing and returns ``None``. Other settings:
``METATRAIL_ENERGY_INTERVAL`` (s), ``METATRAIL_ENERGY_POLICY`` (``busy-share``/``active-only``),
``METATRAIL_POWERCAP_ROOT``, ``METATRAIL_RAPL_PSYS``,
``METATRAIL_CPU_TDP_PER_CORE_W``/``METATRAIL_CPU_TDP_W``, ``METATRAIL_CARBON_REGION``, ``METATRAIL_PUE``.
Modules: :mod:`.interface` (the Recorder's contract), :mod:`.meter` (the meter interface), :mod:`.rapl`,
:mod:`.nvml`, :mod:`.estimate`, :mod:`.attribution` (pure split functions), :mod:`.window` (closing a window
at the stop), :mod:`.ledger` (per-task bookkeeping of sampled intervals), :mod:`.monitor`, :mod:`.facet`,
:mod:`.carbon`, :mod:`.report`.

Importing this package imports nothing heavy: the monitor, psutil and pynvml load on first use.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .interface import TaskEnergyMonitor

__all__ = ["DisabledMonitor", "get_monitor", "reset_monitor"]

_lock = threading.Lock()
_monitor: TaskEnergyMonitor | None = None
_monitor_pid: int | None = None


def _renew_lock_in_child() -> None:
    # A thread of the parent may have been creating the monitor at the fork (the lock held while it imports): the
    # child's copy of the lock would stay locked for ever, and the child's first task start would hang on it.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_in_child)

_OFF = ("0", "false", "no", "off")


class DisabledMonitor:
    """The monitor used when energy metering is off: no I/O, every report is None."""

    def task_started(
        self, execution_id: str, *, pid: int, include_children: bool = True, source: object = None
    ) -> object:
        """Do nothing; return a placeholder token."""
        return None

    def task_stopped(self, token: object) -> object:
        """Do nothing; nothing to report."""
        return None

    def task_report(self, stopped: object) -> dict[str, Any] | None:
        """Always None: metering is off."""
        return None

    def task_finished(self, token: object) -> dict[str, Any] | None:
        """Always None: metering is off."""
        return None


def _switched_off() -> bool:
    if os.environ.get("METATRAIL_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return os.environ.get("METATRAIL_ENERGY", "1").strip().lower() in _OFF


def get_monitor() -> TaskEnergyMonitor:
    """The process-wide energy monitor (created on first call, again after a fork); never raises."""
    global _monitor, _monitor_pid
    monitor, pid = _monitor, os.getpid()
    if monitor is not None and _monitor_pid == pid:
        return monitor
    with _lock:
        if _monitor is None or _monitor_pid != pid:
            try:
                if _switched_off():
                    _monitor = DisabledMonitor()
                else:
                    from .monitor import EnergyMonitor

                    _monitor = EnergyMonitor()
            except Exception:
                logging.getLogger("metatrail.energy").exception("energy monitor unavailable")
                _monitor = DisabledMonitor()
            _monitor_pid = pid
        return _monitor


def reset_monitor() -> None:
    """Forget the process-wide monitor (closing it), so the next ``get_monitor()`` re-reads the
    environment."""
    global _monitor, _monitor_pid
    with _lock:
        old, _monitor, _monitor_pid = _monitor, None, None
    close = getattr(old, "close", None)
    if callable(close):
        close()
