"""The per-process node energy monitor: implements ``TaskEnergyMonitor`` (``core/energy/interface.py``).

One :class:`EnergyMonitor` per process. Tasks register a root pid (and, by default, its children);
a daemon sampler thread reads every meter every ``interval_s`` (default 1 s, ``METATRAIL_ENERGY_INTERVAL``)
and splits each interval's energy among the tasks registered over the whole interval with the pure functions
of :mod:`metatrail.energy.attribution`. Both CPU policies are computed; the chosen one (``policy`` argument >
``METATRAIL_ENERGY_POLICY`` > ``busy-share``) is reported and the other is kept as the attribution
uncertainty.

Cost rules: construction does nothing; :meth:`EnergyMonitor.task_started` appends to a queue and wakes the
sampler (no hardware access, no lock shared with sampling). The first call starts the sampler thread, which
probes the meters once (RAPL tree, NVML init) and then takes the task's baseline sample immediately. The
thread sleeps without a timeout (and background GPU power sampling is suspended) while no task is registered.
:meth:`EnergyMonitor.task_finished` takes the final sample in the caller's thread and returns the facet
payload. Neither call raises.

Limits, stated in the payload where they apply: the gap between task start and its first sample is not counted
(see ``coverage``); the monitor's own CPU time is part of the host process's; CPU time of a task process that
exits between samples without being reaped by the tree is lost; several concurrent tasks registering the same
process share its CPU time equally (``shared_process``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the modules below load in the sampler thread, off the host task's path
    from . import DisabledMonitor
    from .attribution import CpuPolicy
    from .cputime import ProcessTree
    from .estimate import CpuEstimateMeter
    from .facet import TaskAccount
    from .interface import TaskEnergyMonitor
    from .meter import EnergyMeter, Reading
    from .nvml import GpuProcesses, NvmlMeter

log = logging.getLogger("metatrail.energy")
DEFAULT_INTERVAL_S = 1.0
METER_NAME = "metatrail.energy"


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


@dataclass(frozen=True, slots=True)
class TaskToken:
    """The opaque handle ``task_started`` returns."""

    id: int
    execution_id: str


@dataclass(slots=True)
class _Task:
    token: TaskToken
    pid: int
    include_children: bool
    start_wall: float
    start_mono: float
    tree: ProcessTree | None = None
    account: TaskAccount | None = None
    last_cpu: float | None = None
    baselined: bool = False

    def attach(self) -> None:
        """Create the process-tree reader and the accumulator (in the sampler, not in ``task_started``)."""
        from .cputime import ProcessTree
        from .facet import TaskAccount

        if self.tree is None:
            self.tree = ProcessTree(self.pid, self.include_children)
        if self.account is None:
            self.account = TaskAccount(self.token.execution_id, self.start_wall, self.start_mono)

    @property
    def proc(self) -> ProcessTree:
        """The process-tree reader (after :meth:`attach`)."""
        assert self.tree is not None
        return self.tree

    @property
    def acct(self) -> TaskAccount:
        """The accumulator (after :meth:`attach`)."""
        assert self.account is not None
        return self.account


@dataclass(slots=True)
class _Sample:
    t: float
    readings: dict[str, Reading]
    busy_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)


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
        probe_timeout_s: float = 10.0,
    ) -> None:
        self._meter_arg = list(meters) if meters is not None else None
        self._interval_arg = interval_s
        self._policy_arg = policy
        self.region = region
        self.pue = pue
        self._clock = clock
        self._busy_seconds = busy_seconds
        self._n_cpus = n_cpus
        self.probe_timeout_s = probe_timeout_s
        self._ids = itertools.count(1)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._pid = os.getpid()
        self._pending: collections.deque[_Task] = collections.deque()
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._prev: _Sample | None = None
        self.meters: list[EnergyMeter] = []
        self.config_errors: list[str] = []
        self.interval_s = DEFAULT_INTERVAL_S
        self.policy: CpuPolicy = "busy-share"
        self._nvml: NvmlMeter | None = None
        self._estimate: CpuEstimateMeter | None = None
        self._missing: dict[str, str] = {}
        self._meter_info: dict[str, Any] = {"name": METER_NAME, "version": _meter_version(), "backends": []}

    # -- the TaskEnergyMonitor interface -------------------------------------------------------------------
    def task_started(self, execution_id: str, *, pid: int, include_children: bool = True) -> object:
        """Register the process tree rooted at ``pid``; returns a token; never raises."""
        token = TaskToken(next(self._ids), execution_id)
        try:
            if os.getpid() != self._pid:  # forked: the parent's thread does not exist here
                self._reset_runtime()
            self._pending.append(_Task(token, pid, include_children, time.time(), self._clock()))
            self._ensure_thread()
            self._wake.set()
        except Exception:
            log.exception("energy: task_started failed for %s (energy will be missing)", execution_id)
        return token

    def task_finished(self, token: object) -> dict[str, Any] | None:
        """Take the final sample and return the ``metatrail_energy`` facet payload; never raises."""
        if not isinstance(token, TaskToken):
            return None
        try:
            if not self._ready.wait(self.probe_timeout_s):
                return self._abandon(token, f"energy meters still initialising after {self.probe_timeout_s} s")
            with self._lock:
                return self._sample(finishing=token.id)
        except Exception as exc:
            log.exception("energy: task_finished failed for %s", token.execution_id)
            self._abandon(token, "")
            from .facet import failure_payload

            return failure_payload(
                f"energy monitor error: {type(exc).__name__}: {exc}",
                interval_s=self.interval_s,
                meter=self._meter_info,
            )

    def close(self) -> None:
        """Stop the sampler thread and close the meters (tests, interpreter shutdown)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        for m in self.meters:
            m.close()

    # -- sampler thread ------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="metatrail-energy", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        # Give the GIL back first, so the task_started that started this thread returns before the probing
        # (imports, sysfs, NVML) begins.
        time.sleep(0.001)
        try:
            self._open_meters()
        except Exception:
            log.exception("energy: opening meters failed")
        finally:
            self._ready.set()
        suspended = False
        while not self._closed:
            with self._lock:
                idle = not self._tasks and not self._pending
                if idle:
                    self._prev = None  # the next interval starts from a fresh baseline
            if idle:
                if not suspended:
                    for m in self.meters:
                        m.suspend()
                    suspended = True
                self._wake.wait()
                self._wake.clear()
            else:
                if suspended:
                    for m in self.meters:
                        m.resume()
                    suspended = False
                self._wake.wait(self._max_wait())
                self._wake.clear()
            if self._closed:
                break
            try:
                with self._lock:
                    self._sample(finishing=None)
            except Exception:
                log.exception("energy: sampling failed")

    def _max_wait(self) -> float:
        limits = [self.interval_s] + [m.max_read_interval_s / 2 for m in self.meters if m.available]
        return max(0.01, min(limits))

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
                    self._missing["gpu"] = m.unavailable_reason or "NVML unavailable"
            elif isinstance(m, CpuEstimateMeter):
                self._estimate = m if m.available else None
            elif not m.available:
                for domain in ("cpu", "dram"):
                    self._missing.setdefault(domain, m.unavailable_reason or f"{m.name} unavailable")
        self.meters = [m for m in meters if m.available]
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

    def _sample(self, finishing: int | None) -> dict[str, Any] | None:
        while self._pending:
            queued = self._pending.popleft()
            queued.attach()
            self._tasks[queued.token.id] = queued
        now = self._clock()
        readings = self._read_all()
        try:
            busy: float | None = self._busy_seconds() if self._busy_seconds is not None else None
        except Exception:
            busy = None
        roots = {t.proc.pid for t in self._tasks.values()}
        cpu_now = {tid: t.proc.seconds(skip=roots - {t.proc.pid}) for tid, t in self._tasks.items()}
        active = [t for t in self._tasks.values() if t.baselined]
        gpu = self._nvml.processes() if self._nvml is not None and active else {}
        current = _Sample(now, readings, busy)
        if self._prev is not None and active:
            self._account_interval(self._prev, current, active, cpu_now, gpu)
        for tid, t in self._tasks.items():
            if not t.baselined:
                t.baselined = True
                t.acct.first_sample = now
            t.last_cpu = cpu_now[tid] if cpu_now[tid] is not None else t.last_cpu
            t.acct.last_sample = now
            t.acct.max_concurrent = max(t.acct.max_concurrent, len(self._tasks))
        self._prev = current
        if finishing is None:
            return None
        if finishing not in self._tasks:
            return None
        task = self._tasks.pop(finishing)
        if task.proc.lost:
            task.acct.error(
                f"process {task.proc.pid} ended before the task finished: CPU time after the last sample is missing"
            )
        for e in self.config_errors:
            task.acct.error(e)
        from .facet import build_payload

        return build_payload(
            task.acct,
            end_mono=now,
            policy=self.policy,
            interval_s=self.interval_s,
            meter=self._meter_info,
            missing=self._missing,
            known=tuple(readings),
            estimate_parameters=self._estimate.parameters if self._estimate else None,
            region=self.region,
            pue=self.pue,
        )

    def _task_cpu_deltas(self, active: list[_Task], cpu_now: dict[int, float | None]) -> dict[int, float]:
        deltas: dict[int, float] = {}
        by_pid: dict[int, list[_Task]] = collections.defaultdict(list)
        for t in active:
            by_pid[t.proc.pid].append(t)
        for group in by_pid.values():
            for t in group:
                now, before = cpu_now[t.token.id], t.last_cpu
                delta = max(0.0, now - before) if now is not None and before is not None else 0.0
                if len(group) > 1:
                    t.acct.shared_process = True
                    t.acct.error(
                        f"{len(group)} concurrent tasks registered process {t.proc.pid}: "
                        "its CPU time is split equally among them"
                    )
                    delta /= len(group)
                deltas[t.token.id] = delta
        return deltas

    def _account_interval(
        self,
        prev: _Sample,
        cur: _Sample,
        active: list[_Task],
        cpu_now: dict[int, float | None],
        gpu: dict[str, GpuProcesses],
    ) -> None:
        dt = max(0.0, cur.t - prev.t)
        if dt <= 0:
            return
        import psutil

        from .attribution import other_policy, split_cpu
        from .facet import DomainAccount

        n_cpus = self._n_cpus or psutil.cpu_count() or os.cpu_count() or 1
        capacity = dt * n_cpus
        deltas = self._task_cpu_deltas(active, cpu_now)
        busy = None if cur.busy_s is None or prev.busy_s is None else max(0.0, cur.busy_s - prev.busy_s)
        ids = [t.token.id for t in active]
        by_id = {t.token.id: t for t in active}
        for key, r in cur.readings.items():
            old = prev.readings.get(key)
            estimated = key.startswith("estimated:")
            domain = key.split(":", 1)[1] if estimated else key
            delta, reason = self._delta(old, r)
            if delta is not None and busy is None and not key.startswith("gpu:"):
                delta, reason = None, "node CPU time unreadable: the interval cannot be split"
            for t in active:
                table = t.acct.estimates if estimated else t.acct.domains
                acc = table.get(domain)
                if acc is None:
                    acc = table[domain] = DomainAccount(method=r.method, sources=r.sources, detail=dict(r.detail))
                    acc.wraps_first = r.wraps
                acc.wraps_last = r.wraps
                acc.sampled_s += dt
                if delta is None:
                    acc.note(reason or "unreadable")
            if delta is None:
                continue
            if key.startswith("gpu:"):
                self._split_gpu_interval(domain, delta, dt, gpu.get(key), active, by_id)
                continue
            task_cpu = {i: deltas[i] for i in ids}
            assert busy is not None
            total = capacity if r.has_idle else busy
            chosen = split_cpu(delta, task_cpu, busy, total, self.policy)
            other = split_cpu(delta, task_cpu, busy, total, other_policy(self.policy))
            for i in ids:
                table = by_id[i].acct.estimates if estimated else by_id[i].acct.domains
                acc = table[domain]
                acc.value_j += chosen.tasks[i]
                acc.value_other_j += other.tasks[i]
                acc.node_j += delta
                idle_split = chosen if self.policy == "active-only" else other
                acc.idle_j += idle_split.idle_j
                acc.intervals += 1
                acc.covered_s += dt

    @staticmethod
    def _delta(old: Reading | None, new: Reading) -> tuple[float | None, str | None]:
        if new.joules is None:
            return None, new.reason
        if old is None or old.joules is None:
            return (
                None,
                old.reason if old is not None and old.reason else "no earlier reading to take a delta from",
            )
        if new.unusable > old.unusable:
            return None, "counter reset or wrap with unknown range: interval dropped"
        return max(0.0, new.joules - old.joules), None

    def _split_gpu_interval(
        self,
        key: str,
        delta: float,
        dt: float,
        procs: GpuProcesses | None,
        active: list[_Task],
        by_id: dict[int, _Task],
    ) -> None:
        from .attribution import split_gpu

        def owner(pid: int) -> int | None:
            for t in active:
                if t.proc.owns(pid):
                    return t.token.id
            return None

        memory = procs.memory if procs is not None else None
        sm = procs.sm_util if procs is not None else None
        split = split_gpu(delta, owner, memory, sm, [t.token.id for t in active])
        for t in active:
            acc = t.acct.domains[key]
            acc.value_j += split.tasks.get(t.token.id, 0.0)
            acc.node_j += delta
            acc.intervals += 1
            acc.covered_s += dt
            acc.basis(split.basis if t.token.id in split.tasks else "none")
            if split.basis == "equal-split" and procs is not None and procs.reason:
                acc.note(procs.reason)

    def _abandon(self, token: TaskToken, reason: str) -> dict[str, Any] | None:
        with self._lock:
            self._tasks.pop(token.id, None)
            remaining = [t for t in self._pending if t.token.id != token.id]
            self._pending.clear()
            self._pending.extend(remaining)
        if not reason:
            return None
        from .facet import failure_payload

        return failure_payload(reason, interval_s=self.interval_s, meter=self._meter_info)


if TYPE_CHECKING:
    _check_enabled: TaskEnergyMonitor = EnergyMonitor()
    _check_disabled: TaskEnergyMonitor = DisabledMonitor()
