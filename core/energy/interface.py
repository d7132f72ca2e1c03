"""The contract between the Recorder and energy metering (the attachment point every host plugin gets for free).

The Recorder calls, for every execution it records (unless energy is disabled by ``METATRAIL_ENERGY=0``)::

    monitor = metatrail.energy.get_monitor()          # lazily created, one per process; never raises
    token = monitor.task_started(execution_id, pid=os.getpid(), include_children=True)
    ...                                               # the task runs
    facet = monitor.task_finished(token)              # -> dict | None, the ``metatrail_energy`` run facet body

Rules an implementation keeps:
* Neither call raises; ``task_started`` returns within a few milliseconds (no hardware probing on the hot path
  beyond reading counters; probing happens once, lazily, on first use).
* ``task_finished`` returns the JSON-serialisable payload of the ``metatrail_energy`` run facet (without
  ``_producer``/``_schemaURL``, which the event builder adds), or ``None`` when energy metering is off.
* A value that could not be measured is ``None`` with a reason in the payload, never 0.
"""

from __future__ import annotations

from typing import Any, Protocol


class TaskEnergyMonitor(Protocol):
    """What the Recorder needs from an energy monitor."""

    def task_started(self, execution_id: str, *, pid: int, include_children: bool = True) -> object:
        """Begin attributing energy to the process tree rooted at ``pid``; returns an opaque token."""
        ...

    def task_finished(self, token: object) -> dict[str, Any] | None:
        """Stop attributing and return the energy facet payload (see module docstring)."""
        ...
