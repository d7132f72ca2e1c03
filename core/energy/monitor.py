"""The per-process node energy monitor: implements ``TaskEnergyMonitor`` (``core/energy/interface.py``).

One :class:`EnergyMonitor` per process. Tasks register a root pid (and, by default, its children);
a daemon sampler thread reads every meter every ``interval_s`` (default 1 s, ``METATRAIL_ENERGY_INTERVAL``)
and splits each interval's energy among the tasks registered over it with the pure functions of
:mod:`metatrail.energy.attribution`. Both CPU policies are computed; the chosen one (``policy`` argument >
``METATRAIL_ENERGY_POLICY`` > ``busy-share``) is reported and the other is kept as the attribution
uncertainty.

Cost rules (the host task's thread does almost nothing): construction does nothing;
:meth:`EnergyMonitor.task_started` appends to a queue and wakes the sampler; :meth:`EnergyMonitor.task_stopped`
reads the clock (and, when the task's root is this process, its CPU time), marks the task and wakes the
sampler. Neither touches hardware, files or the monitor lock, nor waits for the meters to finish starting. The
first start starts the sampler thread, which probes the meters once (RAPL tree, NVML init) and then takes the
task's baseline sample. Starts and stops wake the sampler, which samples at most every ``min_sample_gap_s``
(20 ms) so that a burst of short tasks does not turn into a burst of samples. Once no task is registered it keeps
its last sample as the baseline, and the meters running, for a sampling wait (the interval, bounded by the meters'
counter wrap): a start meanwhile is paced like any other, so a host whose short tasks each end before the next
begins (Parsl's thread pool running small apps) does not get a sample, and a GPU power sampler stopped and started,
per task (1,000 such tasks of 0.2 ms, 1 ms apart, took about 950 samples and 85 us of sampler CPU per task when the
baseline was dropped at once, 12 samples and 10 us with it kept: ``bench/bench_energy_burst.py``). After that wait it
drops the baseline, suspends background GPU power sampling and sleeps without a timeout until the next start.

The gap adapts to bursts of tasks shorter than ``min_sample_gap_s`` (:data:`MAX_BURST_GAP_S`): when a sample closes two
or more tasks that no sample covered, all shorter than that, the gap doubles (up to 0.2 s, and never past the sampling
interval or the meters' own bound); when it closes none, the gap halves back towards ``min_sample_gap_s``; when it
closes one that ran longer, and once the monitor has been idle for a sampling wait, the gap is back at the floor. A
widened gap holds back only the samples no other task needs: a task still running ``min_sample_gap_s`` after its start
gets its first sample then, and a stopped task that a sample covered and that ran that long gets its closing sample at
the narrow pace, as without a burst. A sample costs the sampler about half a millisecond of CPU (and takes the GIL from
the host's threads), and in a burst of 3 ms tasks nearly every task started and stopped between two samples anyway; a
sample per 20 ms bought a measured interval for one task in ten, a sliver of its short run. What such a task keeps is
its CPU time read at its start and stop, when its root is this process and no other task registered that process
meanwhile (a host-fed task keeps the host's figure). Pacing serves many tasks, not a host waiting for one: a
:meth:`EnergyMonitor.hurry` (the Recorder's ``flush``) makes the next sample unpaced, so an Airflow task runner ending
its one try, or a process exiting, does not wait up to a gap for its windows to close.

Closing a window (:mod:`metatrail.energy.window`): the first sample after a stop splits its interval at the stop
time, with counters interpolated linearly to it; the task gets ``[last sample, stop]`` (shared with the tasks
running then), the others ``[stop, sample]``, and the task leaves the monitor. :meth:`EnergyMonitor.task_report`,
called later on any thread (the Recorder's writer), waits for that closing sample at most ``report_timeout_s``
and builds the facet payload; a late report therefore gives the same figures as a prompt one.
``task_finished`` does both steps. No call raises.

Limits, stated in the payload where they apply: the gap between task start and its first sample is not counted
(see ``coverage``); the last partial interval is interpolated (``end_interpolated``, ``end_interpolation_s``);
the monitor's own CPU time is part of the host process's; CPU time of a task process that exits between samples
without being reaped by the tree is lost; several concurrent tasks registering the same process share its CPU
time equally (``shared_process``).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .ledger import IntervalSplit, Sample, TaskToken, TrackedTask, stop_time

if TYPE_CHECKING:  # the modules below load in the sampler thread, off the host task's path
    from . import DisabledMonitor
    from .accounting import AccountedEnergy
    from .attribution import CpuPolicy
    from .estimate import CpuEstimateMeter
    from .interface import TaskEnergyMonitor
    from .meter import EnergyMeter, Reading
    from .nvml import NvmlMeter
    from .window import WindowEnd

log = logging.getLogger("metatrail.energy")
DEFAULT_INTERVAL_S = 1.0
MIN_SAMPLE_GAP_S = 0.02
MAX_BURST_GAP_S = 0.2
REPORT_TIMEOUT_FLOOR_S = 1.0
METER_NAME = "metatrail.energy"


def _unmeasured_because(meter: str) -> str:
    """A domain's reason when its meter is unavailable. The meter's own reason (what is missing, how to fix it: a
    few hundred characters) is in the facet once, under ``meter.backends``; repeated in every domain and estimate
    it made up a third of a task's facet."""
    return f"not measured: the {meter} meter is unavailable here (meter.backends says why)"


def _meter_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except Exception:
        return "unknown"


def resolve_interval(argument: float | None = None) -> tuple[float, str | None]:
    """Sampling interval: argument > ``METATRAIL_ENERGY_INTERVAL`` > 1 s (bounded to 0.05..60 s)."""
    raw: object = argument if argument is not None else os.environ.get("METATRAIL_ENERGY_INTERVAL")
    if raw is None or raw == "":
        return DEFAULT_INTERVAL_S, None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_INTERVAL_S, f"METATRAIL_ENERGY_INTERVAL={raw!r} is not a number; used 1 s"
    bounded = min(max(value, 0.05), 60.0)
    note = None if bounded == value else f"energy interval {value} s out of range 0.05..60; used {bounded} s"
    return bounded, note


def resolve_policy(argument: str | None = None) -> tuple[CpuPolicy, str | None]:
    """CPU policy: argument > ``METATRAIL_ENERGY_POLICY`` > ``busy-share``."""
    from .attribution import POLICIES

    raw = argument or os.environ.get("METATRAIL_ENERGY_POLICY") or "busy-share"
    for p in POLICIES:
        if raw == p:
            return p, None
    return "busy-share", f"unknown energy policy {raw!r} (valid: {', '.join(POLICIES)}); used busy-share"


def default_meters() -> list[EnergyMeter]:
    """RAPL (``METATRAIL_POWERCAP_ROOT``, psys with ``METATRAIL_RAPL_PSYS=1``), NVML, and the CPU estimate."""
    from .estimate import CpuEstimateMeter
    from .nvml import NvmlMeter
    from .rapl import DEFAULT_ROOT, RaplMeter

    root = os.environ.get("METATRAIL_POWERCAP_ROOT") or DEFAULT_ROOT
    psys = os.environ.get("METATRAIL_RAPL_PSYS", "0").strip().lower() in ("1", "true", "yes")
    return [RaplMeter(root, include_psys=psys), NvmlMeter(), CpuEstimateMeter()]


_forks = 0
"""How many times this process is a forked child of the one that imported this module (an ``os.fork`` hook counts
them): a monitor compares it with its own count rather than ask ``os.getpid()``, a system call, at each start."""


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)


def _own_cpu_seconds(include_children: bool) -> float | None:
    """This process's CPU seconds (plus its reaped children's), read as the sampler reads them: the same two
    calls as :func:`metatrail.energy.cputime.own_process_seconds`, repeated here because that module imports psutil,
    which the host task's thread must not wait for (no lock, no file, the GIL kept)."""
    try:
        own = time.process_time()
        if include_children:
            t = os.times()
            own += t.children_user + t.children_system
    except OSError:
        return None
    return own


# Plain slotted classes, not dataclasses: they are created while the host task waits for its first energy call,
# and generating dataclass methods costs about a millisecond each.
class AccountedToken:
    """The token of a task whose energy comes from a batch system's accounting (not sampled here)."""

    __slots__ = ("reported", "source", "start_mono", "token")

    def __init__(self, token: TaskToken, source: Any, start_mono: float) -> None:
        self.token = token
        self.source = source
        self.start_mono = start_mono
        self.reported = False


class AccountedStop:
    """What ``task_stopped`` returns for an :class:`AccountedToken`."""

    __slots__ = ("at", "token")

    def __init__(self, token: AccountedToken, at: float) -> None:
        self.token = token
        self.at = at


class StoppedTask:
    """What ``task_stopped`` returns and ``task_report`` takes."""

    __slots__ = ("task",)

    def __init__(self, task: TrackedTask) -> None:
        self.task = task

    @property
    def execution_id(self) -> str:
        """The execution the stopped window belongs to."""
        return self.task.token.execution_id


def _each_meter(meters: Iterable[EnergyMeter], action: str) -> None:
    """Call ``suspend`` or ``resume`` on every meter; a meter that fails (NVML's power sampler cannot start its
    thread on a node out of threads, say) is logged once and the others go on: the sampler thread must not die of
    it, and a meter that did not resume is read on demand as before."""
    for meter in meters:
        try:
            getattr(meter, action)()
        except Exception as exc:
            from ..logsafe import log_once

            log_once(f"energy-{action}:{meter.name}:{type(exc).__name__}", "metatrail: energy meter %s could not "
                     "%s (%s: %s)", meter.name, action, type(exc).__name__, exc)


class EnergyMonitor:
    """Attributes node energy to concurrently running tasks (see the module docstring)."""

    def __init__(
        self,
        *,
        meters: Sequence[EnergyMeter] | None = None,
        interval_s: float | None = None,
        policy: str | None = None,
        region: str | None = None,
        pue: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        busy_seconds: Callable[[], float] | None = None,
        n_cpus: int | None = None,
        report_timeout_s: float | None = None,
        min_sample_gap_s: float = MIN_SAMPLE_GAP_S,
    ) -> None:
        self._meter_arg = list(meters) if meters is not None else None
        self._interval_arg = interval_s
        self._policy_arg = policy
        self.region = region
        self.pue = pue
        self._clock = clock
        self._busy_seconds = busy_seconds
        self._n_cpus = n_cpus
        self._report_timeout_arg = report_timeout_s
        self.min_sample_gap_s = max(0.0, min_sample_gap_s)
        self._ids = itertools.count(1)
        self._generations = itertools.count(1)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._pid = os.getpid()
        self._forks = _forks
        self._generation = next(self._generations)
        self._pending: collections.deque[TrackedTask] = collections.deque()
        self._pending_stopped = 0  # how many tasks at the head of _pending are known to have stopped (_first_need)
        self._live: dict[int, TrackedTask] = {}
        self._tasks: dict[int, TrackedTask] = {}
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._hurry = threading.Event()  # set by hurry(): the next sample is not paced
        self._ready = threading.Event()
        self._suspended = False  # the sampler suspended the meters (kept here: a restarted sampler goes on from it)
        self._window_closed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._prev: Sample | None = None
        self._sampled_at = 0.0  # time.monotonic() of the last sample (see _linger_left)
        self._gap = self.min_sample_gap_s  # the pacing gap now (see the module docstring)
        self._closed_until: dict[int, float] = {}  # pid -> latest stop of a closed task rooted there
        self._seq = 0
        self.meters: list[EnergyMeter] = []
        self.config_errors: list[str] = []
        self.interval_s = DEFAULT_INTERVAL_S
        self.policy: CpuPolicy = "busy-share"
        self._nvml: NvmlMeter | None = None
        self._estimate: CpuEstimateMeter | None = None
        self._shared_busy = False  # the estimate meter reads node busy time from the monitor's own source
        self._missing: dict[str, str] = {}
        self._meter_info: dict[str, Any] = {"name": METER_NAME, "version": _meter_version(), "backends": []}

    @property
    def report_timeout_s(self) -> float:
        """Longest wait of :meth:`task_report` for the sample that closes a window: the constructor argument,
        else twice the sampling interval, at least 1 s (a short interval on a loaded node must not make reports
        give up on a sampler that is merely late)."""
        if self._report_timeout_arg is not None:
            return max(0.0, self._report_timeout_arg)
        return max(2 * self.interval_s, REPORT_TIMEOUT_FLOOR_S)

    # -- the TaskEnergyMonitor interface -------------------------------------------------------------------
    def task_started(
        self, execution_id: str, *, pid: int, include_children: bool = True, source: object = None
    ) -> object:
        """Register the process tree rooted at ``pid``; returns a token; never raises.

        ``source`` replaces the tree: a :class:`~metatrail.energy.processes.TaskProcesses` the host feeds (the
        task's processes as they come and go), or an :class:`~metatrail.energy.accounting.AccountedEnergy`
        (energy from a batch system's accounting; the task is then not sampled here at all).
        """
        token = TaskToken(next(self._ids), execution_id)
        try:
            if _forks != self._forks:  # forked: the parent's thread does not exist here
                self._reset_runtime()
            if source is not None:
                from .accounting import AccountedEnergy
                from .processes import TaskProcesses

                if isinstance(source, AccountedEnergy):
                    return AccountedToken(token, source, self._clock())
                if not isinstance(source, TaskProcesses):
                    raise TypeError(f"unknown energy source {type(source).__name__}")
            task = TrackedTask(token, pid, include_children, time.time(), self._clock(), self._generation)
            if source is not None:
                task.pid, task.source = -token.id, source  # a pseudo id: no real process is the task's root
            elif pid == self._pid:
                task.start_root_cpu = _own_cpu_seconds(include_children)
            self._live[token.id] = task
            self._pending.append(task)
            self._ensure_thread()
            if not self._wake.is_set():
                self._wake.set()
        except Exception:
            log.exception("energy: task_started failed for %s (energy will be missing)", execution_id)
        return token

    def task_stopped(self, token: object) -> object:
        """Mark the task stopped now and return the handle for :meth:`task_report`; cheap; never raises.

        One clock read, plus this process's CPU time when the task's root is this process; no lock the sampler
        holds, no waiting. ``None`` for an unknown or already stopped token.
        """
        if isinstance(token, AccountedToken):
            return AccountedStop(token, self._clock())
        if not isinstance(token, TaskToken):
            return None
        try:
            task = self._live.pop(token.id, None)
            if task is None:
                return None
            if task.pid == self._pid:
                task.stop_root_cpu = _own_cpu_seconds(task.include_children)
            task.stop = self._clock()  # last: once the sampler sees this, the stop is complete
            if not self._wake.is_set():
                self._wake.set()
            return StoppedTask(task)
        except Exception:
            log.exception("energy: task_stopped failed for %s (energy will be missing)", token.execution_id)
            return None

    def task_report(self, stopped: object) -> dict[str, Any] | None:
        """The ``metatrail_energy`` payload for a stopped task's window ``[start, stop]``; never raises.

        Waits at most :attr:`report_timeout_s` for the sample that closes the window (see the module
        docstring); ``None`` for an unknown or already reported object.
        """
        if isinstance(stopped, AccountedStop):
            return self._accounted_report(stopped)
        if not isinstance(stopped, StoppedTask) or stopped.task.reported:
            return None
        task = stopped.task
        task.reported = True
        try:
            if task.generation != self._generation or _forks != self._forks:
                return self._failure("the process forked while the task ran: its energy is not measured here")
            failure = self._await_end(task)
            return failure if failure is not None else self._payload(task)
        except Exception as exc:
            log.exception("energy: task_report failed for %s", task.token.execution_id)
            self._abandon(task)
            return self._failure(f"energy monitor error: {type(exc).__name__}: {exc}")

    def task_finished(self, token: object) -> dict[str, Any] | None:
        """Stop the task and return its payload (``task_report(task_stopped(token))``); never raises."""
        return self.task_report(self.task_stopped(token))

    def hurry(self) -> None:
        """Someone waits for the reports of the tasks stopped so far (a host's flush: a task runner ending its one
        task, a process exiting): take the next sample now rather than at the pacing gap, so their windows close
        at once. Pacing bounds the sampler's cost over many tasks; a waiting host gains nothing from it. Cheap
        (no lock, no I/O); does nothing while no task is registered; never raises."""
        if self._live or self._tasks or self._pending:
            self._hurry.set()
            self._wake.set()

    def close(self) -> None:
        """Stop the sampler thread and close the meters (tests, interpreter shutdown)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        for m in self.meters:
            m.close()
        self._notify_closed()

    # -- reporting (any thread, typically the Recorder's writer) -------------------------------------------
    def _accounted_report(self, stopped: AccountedStop) -> dict[str, Any] | None:
        """The facet of a task whose energy comes from a batch system's accounting (see ``task_started``)."""
        if stopped.token.reported:
            return None
        stopped.token.reported = True
        try:
            interval, _ = resolve_interval(self._interval_arg)
            source: AccountedEnergy = stopped.token.source
            return source.report(
                wall_s=max(0.0, stopped.at - stopped.token.start_mono), interval_s=interval,
                meter=dict(self._meter_info), region=self.region, pue=self.pue,
            )
        except Exception as exc:
            log.exception("energy: accounted report failed for %s", stopped.token.token.execution_id)
            return self._failure(f"energy accounting error: {type(exc).__name__}: {exc}")

    def _await_end(self, task: TrackedTask) -> dict[str, Any] | None:
        """Wait, bounded, until the task's window is closed; force-close it at the deadline. Returns a failure
        payload when nothing can be reported, else None (``task.end`` is set)."""
        if task.end is not None:  # the common case once the writer reports a batch: closed by a sample already
            return None
        timeout = self.report_timeout_s
        deadline = time.monotonic() + timeout
        if task.end is None and not self._ready.wait(max(0.0, deadline - time.monotonic())):
            # Still probing: nothing can have sampled the task, and probing can take seconds (NVML).
            reason = f"energy meters still initialising {timeout:.1f} s after the task ended"
            if self._lock.acquire(timeout=0.05):  # the sampler takes it only to sample, never while probing
                try:
                    if task.end is None and task.queued:
                        from .window import WindowEnd

                        task.end = WindowEnd(at=stop_time(task), reason=reason)
                        return self._failure(reason)
                finally:
                    self._lock.release()
        with self._window_closed:
            while task.end is None and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._window_closed.wait(remaining)
        if task.end is not None:
            return None
        if not self._lock.acquire(timeout=max(0.05, deadline - time.monotonic())):
            return self._failure(f"the energy sampler did not answer within {timeout:.1f} s (a meter read may hang)")
        try:
            if task.end is None:
                self._close_late(task, timeout)
        finally:
            self._lock.release()
        return None

    def _close_late(self, task: TrackedTask, timeout: float) -> None:
        """Close a window no sample came for in time: it covers the task up to its last sample (under the lock)."""
        from .window import WindowEnd

        self._tasks.pop(task.token.id, None)
        stop = stop_time(task)
        last = task.account.last_sample if task.account is not None else None
        why = "the monitor was closed" if self._closed else f"no energy sample came within {timeout:.1f} s"
        left_out = "" if last is None else f": the last {max(0.0, stop - last):.3f} s before the stop are not counted"
        reason = f"{why} after the task stopped{left_out}"
        known = tuple(self._prev.readings) if self._prev is not None else ()
        if task.baselined:
            task.end = WindowEnd(at=stop, known=known, reason=reason)
        else:
            task.end = self._unsampled_end(task, known, [], reason)
        self._closed_until[task.pid] = max(self._closed_until.get(task.pid, stop), stop)

    def _shared_root(self, task: TrackedTask, overlaps: set[int]) -> bool:
        """Whether another task registered ``task``'s root process while it ran (one closed since its start, or one
        in ``overlaps``, :func:`_overlapping` of the tasks still registered or closing): the process's CPU time
        cannot then be told apart between them."""
        return self._closed_until.get(task.pid, task.start_mono) > task.start_mono or task.token.id in overlaps

    def _count_head(self, task: TrackedTask, now: float, overlaps: set[int]) -> None:
        """Count the CPU time a task in this process used between its start and its first sample (``now``), read
        at its start: the sampled intervals begin at that sample, and a task whose first sample came late in its
        run would otherwise keep only the part after it. Exact for the CPU time and so for the CPU estimate;
        measured domains have no reading at the start and stay partial (their coverage says so). Left out,
        as for a task no sample covered, when another task registered the same process meanwhile
        (``overlaps``: :func:`_overlapping` of the registered and closing tasks)."""
        from .facet import DomainAccount

        root_now = task.proc.last_root_seconds
        if root_now is None or task.start_root_cpu is None:
            return
        if self._shared_root(task, overlaps):
            return
        head = max(0.0, root_now - task.start_root_cpu)
        acct = task.acct
        acct.cpu_s = (acct.cpu_s or 0.0) + head
        if self._estimate is not None:
            est = acct.estimates.get("cpu")
            if est is None:
                est = acct.estimates["cpu"] = DomainAccount(method="estimated")
            value = self._estimate.watts_per_cpu * head
            est.value_j += value
            est.value_other_j += value
            est.count_interval(-task.token.id)  # the head counts as an interval of its own
            est.covered_s += max(0.0, now - task.start_mono)

    def _unsampled_end(
        self, task: TrackedTask, known: tuple[str, ...], closing: list[TrackedTask], reason: str | None = None,
        overlaps: set[int] | None = None,
    ) -> WindowEnd:
        """The end of a window no sample covered. Its CPU time is still known exactly when the task's root is
        this process (read at start and stop), unless another task registered that process meanwhile: then
        the process's CPU time cannot be told apart between them (``closing``: the others closed with it;
        ``overlaps``: :func:`_overlapping` of the registered and closing tasks, when the caller has it)."""
        from .window import WindowEnd

        stop = stop_time(task)
        if task.source is not None:
            # Host-fed processes were all born inside the task: once the host closed the set and none is alive,
            # their whole CPU time is the task's, sample or no sample.
            task.attach()
            total = task.proc.seconds()
            if task.proc.final_seconds is not None and total is not None:
                return WindowEnd(at=stop, known=known, reason=reason, task_cpu="read-at-stop", unsampled_cpu_s=total)
            return WindowEnd(at=stop, known=known, reason=reason)
        if task.start_root_cpu is None or task.stop_root_cpu is None:
            return WindowEnd(at=stop, known=known, reason=reason)
        if overlaps is None:
            overlaps = _overlapping(itertools.chain(self._tasks.values(), closing))
        if self._shared_root(task, overlaps):
            note = _shared_note(task.pid)
            return WindowEnd(at=stop, known=known, reason=f"{reason}; {note}" if reason else note)
        cpu = max(0.0, task.stop_root_cpu - task.start_root_cpu)
        return WindowEnd(at=stop, known=known, reason=reason, task_cpu="read-at-stop", unsampled_cpu_s=cpu)

    def _payload(self, task: TrackedTask) -> dict[str, Any]:
        from .facet import DomainAccount, TaskAccount, build_payload

        end = task.end
        assert end is not None
        acct = task.account or TaskAccount(task.token.execution_id, task.start_wall, task.start_mono)
        if end.unsampled_cpu_s is not None and acct.first_sample is None:
            # No sample covered the task, but its CPU time was read at start and stop: that is all the CPU
            # estimate needs (TDP per CPU x the task's CPU-seconds, the same figure the interval split gives).
            acct.cpu_s = end.unsampled_cpu_s
            if self._estimate is not None:
                acct.estimates["cpu"] = DomainAccount(
                    method="estimated", value_j=self._estimate.watts_per_cpu * end.unsampled_cpu_s, intervals=1
                )
        group = task.tree
        if task.source is not None and group is not None:
            from .processes import ProcessGroup

            if isinstance(group, ProcessGroup):
                acct.shared_process = acct.shared_process or group.shared
                for note in group.notes:
                    acct.error(note)
        if task.tree is not None and task.tree.lost:
            acct.error(
                f"process {task.tree.pid} ended before the task finished: CPU time after the last sample is missing"
            )
        for e in self.config_errors:
            acct.error(e)
        if end.reason:
            acct.error(end.reason)
        return build_payload(
            acct,
            end_mono=end.at,
            policy=self.policy,
            interval_s=self.interval_s,
            meter=self._meter_info,
            missing=self._missing,
            known=end.known,
            estimate_parameters=self._estimate.parameters if self._estimate else None,
            region=self.region,
            pue=self.pue,
            end=end,
        )

    def _failure(self, reason: str) -> dict[str, Any]:
        from .facet import failure_payload

        return failure_payload(reason, interval_s=self.interval_s, meter=self._meter_info)

    def _notify_closed(self) -> None:
        with self._window_closed:
            self._window_closed.notify_all()

    # -- sampler thread ------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None and (self._thread.is_alive() or self._closed):
            return
        with self._start_lock:
            # A sampler that died (a fault of ours the loop let through) is started again, with the meters it had:
            # without one, every report would wait its whole timeout for a sample that never comes. Not after close.
            if self._thread is None or (not self._thread.is_alive() and not self._closed):
                thread = threading.Thread(target=self._run, name="metatrail-energy", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        # Give the GIL back first, so the task_started that started this thread returns before the probing
        # (imports, sysfs, NVML) begins.
        time.sleep(0.001)
        if not self._ready.is_set():  # a restarted sampler (see _ensure_thread) keeps the meters it had
            try:
                self._open_meters()
            except Exception:
                log.exception("energy: opening meters failed")
            finally:
                self._ready.set()
        while not self._closed:
            with self._lock:
                idle = not self._tasks and not self._pending
                linger = 0.0
                if idle:
                    self._closed_until.clear()  # a later task cannot overlap the ones closed so far
                    linger = self._linger_left()
                    if linger <= 0:
                        self._prev = None  # the next interval starts from a fresh baseline
                        self._gap = self.min_sample_gap_s
            if idle and linger > 0:
                # The last sample is recent: keep it as the baseline and the meters running, so that the next
                # start is paced like any other. A host that starts a short task every few milliseconds, each
                # ended before the next began, otherwise took a sample (and suspended and resumed the meters) per
                # task.
                if not self._wake.wait(linger):
                    continue  # not cleared: a start that set it since the timeout is seen by the next wait
                self._wake.clear()
                if not self._pending and not self._tasks and not self._closed:
                    continue  # set by a start or stop the last sample already handled: no sample needed
            elif idle:
                if not self._suspended:
                    _each_meter(self.meters, "suspend")
                    self._suspended = True
                self._wake.wait()
                self._wake.clear()
            else:
                if self._suspended:
                    _each_meter(self.meters, "resume")
                    self._suspended = False
                self._wake.wait(self._max_wait())
                self._wake.clear()
            if self._closed:
                break
            self._pace()
            closed_any = True
            try:
                with self._lock:
                    closed_any = self._sample()
            except Exception:
                log.exception("energy: sampling failed")
            if closed_any:
                self._notify_closed()
        self._notify_closed()

    def _linger_left(self) -> float:
        """Seconds the sampler keeps its last sample as the baseline while no task is registered: until a
        sampling wait (:meth:`_max_wait`, which the meters' counter wrap bounds) has passed since it was taken."""
        if self._prev is None:
            return 0.0
        return self._sampled_at + self._max_wait() - time.monotonic()

    def _max_wait(self) -> float:
        limits = [self.interval_s] + [m.max_read_interval_s / 2 for m in self.meters if m.available]
        return max(0.01, min(limits))

    def _pace(self) -> None:
        # Starts and stops wake the sampler at once; in a burst of short tasks that would mean a sample per task.
        # A widened gap only holds back samples nobody needs yet: a stopped task that a sample covered gets its
        # closing sample, and a task running for ``min_sample_gap_s`` its first one, at the narrow pace.
        floor = self.min_sample_gap_s
        while not self._closed:
            if self._hurry.is_set():  # someone waits for the reports (see hurry)
                self._hurry.clear()
                return
            prev = self._prev
            if prev is None:
                return
            now = self._clock()
            due = prev.t + max(self._gap, floor)
            if due > prev.t + floor:
                due = min(due, max(prev.t + floor, self._first_need(now, floor)))
            wait = due - now
            if wait <= 0:
                return
            # Re-checked at least every ``floor`` (not at each start and stop: in a burst that would wake this
            # thread twice per task), so a need that arises meanwhile waits at most that long; a hurry at once.
            self._hurry.wait(min(wait, max(floor, 0.005)))

    def _first_need(self, now: float, floor: float) -> float:
        """When the next sample is needed by a task other than a burst's: now for a stopped task that a sample
        covered and that ran at least ``floor`` (a burst's task a sample happened to catch does not count: each
        such stop would call the next sample at once, and that sample catch the next task), ``start + floor`` for
        a task still waiting for its first; infinity if none."""
        with self._lock:
            if any(t.stop is not None and t.baselined and t.stop - t.start_mono >= floor
                   for t in self._tasks.values()):
                return now
            # The queue is in start order: the first task in it still running started first. Those before it have
            # stopped and stay stopped, so the next look starts past them (this runs every ``floor`` while the
            # queue grows: scanning all of it each time cost a burst's sampler as much as its samples).
            pending = self._pending
            i = self._pending_stopped
            while i < len(pending):
                t = pending[i]
                if t.stop is None and t.end is None:
                    self._pending_stopped = i
                    return t.start_mono + floor
                i += 1
            self._pending_stopped = i
        return math.inf

    def _adapt_gap(self, unsampled: Sequence[TrackedTask]) -> None:
        """Widen the pacing gap in a burst of tasks shorter than ``min_sample_gap_s``, narrow it otherwise (module
        docstring). ``unsampled``: the tasks the last sample closed that no sample had covered; one of them that
        ran longer than the floor means the gap was too wide for it, and the gap drops back to the floor."""
        floor = self.min_sample_gap_s
        if any(stop_time(t) - t.start_mono >= floor for t in unsampled):
            self._gap = floor
        elif len(unsampled) >= 2:
            ceiling = max(floor, min(MAX_BURST_GAP_S, self._max_wait()))
            self._gap = min(ceiling, max(self._gap * 2, floor))
        elif not unsampled:
            self._gap = max(floor, self._gap / 2)

    def _open_meters(self) -> None:
        from .cputime import node_busy_seconds
        from .estimate import CpuEstimateMeter
        from .nvml import NvmlMeter
        from .rapl import RaplMeter

        if self._busy_seconds is None:
            self._busy_seconds = node_busy_seconds
        self.interval_s, note = resolve_interval(self._interval_arg)
        if note:
            self.config_errors.append(note)
        self.policy, note = resolve_policy(self._policy_arg)
        if note:
            self.config_errors.append(note)
        meters = self._meter_arg if self._meter_arg is not None else default_meters()
        backends = []
        for m in meters:
            m.open()
            backends.append({"name": m.name, "available": m.available, "reason": m.unavailable_reason})
            if isinstance(m, NvmlMeter):
                self._nvml = m if m.available else None
                self.config_errors.extend(m.notes)
                if not m.available:
                    self._missing["gpu"] = _unmeasured_because(m.name)
            elif isinstance(m, CpuEstimateMeter):
                self._estimate = m if m.available else None
                self.config_errors.extend(m.notes)
            elif not m.available:
                for domain in ("cpu", "dram"):
                    self._missing.setdefault(domain, _unmeasured_because(m.name))
        self.meters = [m for m in meters if m.available]
        self._shared_busy = self._estimate is not None and self._estimate.busy_source is self._busy_seconds
        for m in meters:
            if not m.available:
                m.close()
        if not any(isinstance(m, RaplMeter) for m in meters):
            self._missing.setdefault("cpu", "no CPU energy meter configured")
        self._meter_info = {"name": METER_NAME, "version": _meter_version(), "backends": backends}

    # -- sampling ------------------------------------------------------------------------------------------
    def _read_all(self) -> dict[str, Reading]:
        readings: dict[str, Reading] = {}
        for m in self.meters:
            for key, r in m.read().items():
                readings[f"estimated:{key}" if r.method == "estimated" else key] = r
        return readings

    def _sample(self) -> bool:
        """Take one sample, attribute the time since the previous one, and close the windows of the tasks that
        stopped in it (sampler thread, under the lock). Returns whether a window was closed."""
        from .window import WindowEnd

        self._seq += 1
        unsampled: list[TrackedTask] = []  # stopped before their first sample
        self._pending_stopped = 0
        while self._pending:
            queued = self._pending.popleft()
            queued.queued = False
            if queued.end is not None:  # its report gave up waiting and closed it
                continue
            if queued.stop is not None:
                unsampled.append(queued)
                continue
            queued.attach()
            self._tasks[queued.token.id] = queued
        # Stops are read before the clock, so every stop seen here is at or before ``now``.
        stopping = sorted((t for t in self._tasks.values() if t.stop is not None), key=stop_time)
        now = self._clock()
        readings = self._read_all()
        estimate = self._estimate
        busy: float | None
        if estimate is not None and estimate.last_busy is not None and self._shared_busy:
            busy = estimate.last_busy  # the same /proc/stat line, read a moment ago by the estimate meter
        else:
            try:
                busy = self._busy_seconds() if self._busy_seconds is not None else None
            except Exception:
                busy = None
        roots = {t.proc.pid for t in self._tasks.values()}
        cpu_now = {tid: t.proc.seconds(skip=roots - {t.proc.pid}) for tid, t in self._tasks.items()}
        registered = len(self._tasks)
        for t in stopping:
            del self._tasks[t.token.id]
        sampled_stops = [t for t in stopping if t.baselined]
        unsampled.extend(t for t in stopping if not t.baselined)
        active = [t for t in self._tasks.values() if t.baselined] + sampled_stops
        gpu = self._nvml.processes() if self._nvml is not None and active else {}
        current = Sample(now, readings, busy)
        known = tuple(readings)
        ends: dict[int, WindowEnd] = {}
        if self._prev is not None and active:
            split = IntervalSplit(self.policy, self._cpu_count(), self._seq, gpu, known)
            ends = split.span(self._prev, current, active, sampled_stops, cpu_now)
        for t in sampled_stops:
            t.acct.max_concurrent = max(t.acct.max_concurrent, registered)
            t.end = ends.get(t.token.id) or WindowEnd(at=stop_time(t), known=known)
        closing = stopping + unsampled
        if unsampled:
            overlaps = _overlapping(itertools.chain(self._tasks.values(), closing))
            for t in unsampled:
                t.end = self._unsampled_end(t, known, closing, overlaps=overlaps)
        closed_until = self._closed_until
        for t in closing:
            stop = stop_time(t)
            if closed_until.get(t.pid, stop) <= stop:
                closed_until[t.pid] = stop
        heads: set[int] | None = None
        for tid, t in self._tasks.items():
            if not t.baselined:
                t.baselined = True
                t.acct.first_sample = now
                if t.source is not None:
                    # Host-fed processes were born inside the task: what they used before this first sample is
                    # the task's too, and goes into its first sampled interval.
                    cpu_now[tid] = 0.0
                elif t.start_root_cpu is not None:
                    if heads is None:
                        heads = _overlapping(itertools.chain(self._tasks.values(), closing))
                    self._count_head(t, now, heads)
            t.last_cpu = cpu_now[tid] if cpu_now[tid] is not None else t.last_cpu
            t.last_root = t.proc.last_root_seconds
            t.acct.last_sample = now
            t.acct.max_concurrent = max(t.acct.max_concurrent, registered)
        self._prev = current
        self._sampled_at = time.monotonic()  # the linger is real time, whatever clock the samples use
        self._adapt_gap(unsampled)
        return bool(stopping or unsampled)

    def _cpu_count(self) -> int:
        if not self._n_cpus:
            # Asked once: the node's logical CPUs do not change under a running workflow, and asking at every
            # sample was about a twentieth of the sample's cost.
            import psutil

            self._n_cpus = psutil.cpu_count() or os.cpu_count() or 1
        return int(self._n_cpus)

    def _abandon(self, task: TrackedTask) -> None:
        with self._lock:
            self._live.pop(task.token.id, None)
            self._tasks.pop(task.token.id, None)
            if task.queued:
                remaining = [t for t in self._pending if t is not task]
                self._pending.clear()
                self._pending.extend(remaining)
                self._pending_stopped = 0


@functools.lru_cache(maxsize=64)
def _shared_note(pid: int) -> str:
    """The reason of a task no sample covered whose process other tasks registered meanwhile (made once per process:
    in a burst on several threads every task has it)."""
    return (
        f"no energy sample covered the task and other tasks registered its process {pid} meanwhile: "
        "its CPU time cannot be told apart"
    )


def _overlapping(tasks: Iterable[TrackedTask]) -> set[int]:
    """Ids of the tasks whose ``[start, stop)`` overlaps another's with the same root process (a task still
    running stops at infinity). Sorted by start, a task overlaps an earlier one when the latest stop before it
    is past its start, and a later one when the next start is before its stop: O(n log n), where comparing
    every pair made a burst of a few thousand short tasks cost the sampler seconds."""
    by_root: dict[int, dict[int, TrackedTask]] = {}
    for t in tasks:
        # A task may come twice (a stop seen after its attach, before the sample's stop pass, puts it among both
        # the stopping and the unsampled tasks): counted once, it never overlaps itself.
        by_root.setdefault(t.pid, {})[t.token.id] = t
    out: set[int] = set()
    for unique in by_root.values():
        group = list(unique.values())
        if len(group) < 2:
            continue
        group.sort(key=lambda t: t.start_mono)
        latest_stop = -math.inf
        for i, t in enumerate(group):
            stop = math.inf if t.stop is None else t.stop
            if latest_stop > t.start_mono or (i + 1 < len(group) and group[i + 1].start_mono < stop):
                out.add(t.token.id)
            latest_stop = max(latest_stop, stop)
    return out


if TYPE_CHECKING:
    _check_enabled: TaskEnergyMonitor = EnergyMonitor()
    _check_disabled: TaskEnergyMonitor = DisabledMonitor()
