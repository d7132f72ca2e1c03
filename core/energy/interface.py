"""The contract between the Recorder and energy metering (the attachment point every host plugin gets for free).

The Recorder calls, for every execution it records (unless energy is disabled by ``METATRAIL_ENERGY=0``)::

    monitor = metatrail.energy.get_monitor()          # lazily created, one per process; never raises
    token = monitor.task_started(execution_id, pid=os.getpid(), include_children=True)   # host task's thread
    ...                                               # the task runs
    stopped = monitor.task_stopped(token)             # host task's thread: marks the stop, returns at once
    ...                                               # later, on another thread (the Recorder's writer)
    facet = monitor.task_report(stopped)              # -> dict | None, the ``metatrail_energy`` run facet body

``task_finished(token)`` is ``task_report(task_stopped(token))`` in one call, for callers that do not mind
waiting.

Hosts whose task has no single root process pass ``source=`` to ``task_started`` instead of relying on ``pid``:
a :class:`metatrail.energy.processes.TaskProcesses` they feed with the task's processes as they come and go
(Snakemake's controller, ``metatrail run`` with the exact CPU time of its reaped command), or an
:class:`metatrail.energy.accounting.AccountedEnergy` whose report replaces the node's figures (a cluster job,
Slurm ``sacct``). Every monitor accepts the keyword; the disabled one ignores it.

Rules an implementation keeps:

* No call raises.
* ``task_started`` and ``task_stopped`` run on the host task's critical path and stay cheap: no hardware
  probing, no file or ``/proc`` reads, no waiting for the meters to finish starting, and no lock the sampling
  thread may hold for longer than a few microseconds. ``task_stopped`` does at most one clock read and, only
  when the task's root is the calling process, one CPU-time read of it (``time.process_time()``, plus
  ``os.times()`` for its reaped children; neither releases the GIL). It returns an opaque object, or ``None`` for
  an unknown or already stopped token.
* ``task_report`` may be called any time later, on any thread, once per stopped object, and returns the
  payload for the window ``[start, stop]``, not ``[start, report]``: how late it is called does not change
  the figures. It may wait for the sample that closes the window, but at most a bounded time (the monitor's
  ``report_timeout_s``, by default twice the sampling interval and at least 1 s); past that it reports what it
  has with a reason. It returns the JSON-serialisable payload of the ``metatrail_energy`` run facet (without
  ``_producer``/``_schemaURL``, which the event builder adds), or ``None`` when energy metering is off or the
  object is unknown.
* A value that could not be measured is ``None`` with a reason in the payload, never 0.

How a late report stays honest (the :class:`~metatrail.energy.monitor.EnergyMonitor` method): at the stop the task
is only marked (stop time, and its root's CPU time when that is the calling process). The sampler's next sample,
taken promptly because the stop wakes it (for a task a sample covered that ran ``min_sample_gap_s`` or longer, at
most that long after the previous sample, also in a burst of short tasks), closes the window: it splits the interval
it ends at the stop time, interpolating the node counters and node busy time linearly to the stop (and the task's
CPU time too when it was not read at the stop), attributes ``[last sample, stop]`` to the task together with the
tasks that were running then, and ``[stop, sample]`` to the others only, so concurrent tasks' shares are right from
the stop on. The task then leaves the monitor; nothing is added to its account afterwards. The payload flags
this with ``end_interpolated``, the interval length ``end_interpolation_s`` (which bounds the interpolation
error) and ``end_task_cpu`` (``read-at-stop`` or ``interpolated``). If no sample closes the window within
``report_timeout_s``, the report covers the task up to its last sample before the stop and says so in
``errors``; ``coverage`` shows the part left out.

A monitor may also offer ``hurry()`` (the Recorder calls it when present, when a caller waits in ``flush``): the
reports of the tasks stopped so far are awaited now, so the next sample is taken at once rather than at the pacing
gap. It must be cheap and never raise.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TaskEnergyMonitor(Protocol):
    """What the Recorder needs from an energy monitor (see the module docstring for the rules)."""

    def task_started(
        self, execution_id: str, *, pid: int, include_children: bool = True, source: object = None
    ) -> object:
        """Begin attributing energy to the process tree rooted at ``pid`` (or to ``source``: processes the host
        feeds in, or energy from a batch system's accounting); returns an opaque token."""
        ...

    def task_stopped(self, token: object) -> object:
        """Mark the task stopped now (cheap, on the caller's thread); returns the object to report, or None."""
        ...

    def task_report(self, stopped: object) -> dict[str, Any] | None:
        """The energy facet payload for the stopped task's window ``[start, stop]`` (bounded wait, any thread)."""
        ...

    def task_finished(self, token: object) -> dict[str, Any] | None:
        """``task_report(task_stopped(token))``: stop and report in one call."""
        ...
