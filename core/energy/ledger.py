"""Per-task bookkeeping between samples: the registered tasks, and the split of each sampled interval among them.

:class:`TrackedTask` is one registered task as the monitor sees it. :class:`IntervalSplit` attributes one
sampled interval ``[prev, cur]`` to the tasks registered over it: CPU-side domains by CPU time under both
policies (:func:`metatrail.energy.attribution.split_cpu`), GPUs per device
(:func:`metatrail.energy.attribution.split_gpu`). When tasks stopped inside the interval, it is cut at their stop
times with counters interpolated to each (:mod:`metatrail.energy.window`): a stopped task takes part only up to
its stop, and the tasks still running share the rest without it. Used by the monitor's sampler thread, under its
lock; light to import (psutil and the facet module load on first use).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attribution import CpuPolicy
    from .cputime import ProcessTree
    from .facet import TaskAccount
    from .meter import Reading
    from .nvml import GpuProcesses
    from .processes import TaskProcesses
    from .window import TaskCpuSource, WindowEnd


@dataclass(frozen=True, slots=True)
class TaskToken:
    """The opaque handle ``task_started`` returns."""

    id: int
    execution_id: str


@dataclass(slots=True)
class TrackedTask:
    """One registered task as the monitor sees it: identity, stop mark, process tree, account.

    ``last_cpu`` is the tree's cumulative CPU time at the last sample and ``last_root`` the root process's part
    of it; ``start_root_cpu``/``stop_root_cpu`` the root's, read at the start and the stop (only when the root
    is the monitor's process).
    """

    token: TaskToken
    pid: int
    include_children: bool
    start_wall: float
    start_mono: float
    generation: int
    tree: ProcessTree | None = None
    account: TaskAccount | None = None
    last_cpu: float | None = None
    last_root: float | None = None
    baselined: bool = False
    queued: bool = True
    """Still in the start queue: the sampler has not seen the task yet."""
    stop: float | None = None
    """Set once, by ``task_stopped`` (monitor clock); the sampler treats the task as stopped once it sees it."""
    start_root_cpu: float | None = None
    stop_root_cpu: float | None = None
    end: WindowEnd | None = None
    """Set once, under the monitor lock, when the window is closed; the account is final from then on."""
    reported: bool = False
    source: TaskProcesses | None = None
    """The host-fed processes of a task that has no root the monitor follows (``pid`` is then a pseudo id)."""

    def attach(self) -> None:
        """Create the process-tree reader and the accumulator (in the sampler, not in ``task_started``)."""
        from .cputime import ProcessTree
        from .facet import TaskAccount

        if self.tree is None:
            if self.source is not None:
                from .processes import ProcessGroup

                self.tree = ProcessGroup(self.source, self.pid)
            else:
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


def stop_time(task: TrackedTask) -> float:
    """The stop time of a task known to be stopped (its start time if, impossibly, it is not)."""
    return task.stop if task.stop is not None else task.start_mono


@dataclass(slots=True)
class Sample:
    """One reading of every meter and of node busy CPU time, at monitor time ``t``."""

    t: float
    readings: dict[str, Reading]
    busy_s: float | None


@dataclass(slots=True)
class IntervalSplit:
    """Attributes the interval ending at one sample (number ``seq``) to the registered tasks."""

    policy: CpuPolicy
    n_cpus: int
    seq: int
    gpu: dict[str, GpuProcesses]
    known: tuple[str, ...]

    def span(
        self,
        prev: Sample,
        cur: Sample,
        active: list[TrackedTask],
        stops: list[TrackedTask],
        cpu_now: dict[int, float | None],
    ) -> dict[int, WindowEnd]:
        """Attribute ``[prev, cur]``, split at the stop times of ``stops`` (sorted) with counters interpolated
        to each; a stopped task takes part only up to its stop. Returns how each stopped window was closed."""
        from .window import WindowEnd, cpu_at_stop, linear

        span = cur.t - prev.t
        before = {t.token.id: t.last_cpu for t in active}
        remaining = list(active)
        start = prev
        ends: dict[int, WindowEnd] = {}
        i = 0
        while i < len(stops):
            at = min(max(stop_time(stops[i]), prev.t), cur.t)
            group = [stops[i]]
            i += 1
            while i < len(stops) and min(max(stop_time(stops[i]), prev.t), cur.t) == at:
                group.append(stops[i])
                i += 1
            fraction = (at - prev.t) / span if span > 0 else 1.0
            cpu_at = {t.token.id: linear(before[t.token.id], cpu_now[t.token.id], fraction) for t in remaining}
            sources: dict[int, TaskCpuSource] = {}
            for s in group:
                sid = s.token.id
                final = getattr(s.proc, "final_seconds", None)  # set only by readers that can know it
                if final is not None:
                    # The host closed the task's process set and none is alive: its CPU time is complete.
                    earlier = before[sid]
                    cpu_at[sid], sources[sid] = max(final, earlier if earlier is not None else 0.0), "read-at-stop"
                    continue
                cpu_at[sid], sources[sid] = cpu_at_stop(
                    stop_root_s=s.stop_root_cpu,
                    before_s=before[sid],
                    before_root_s=s.last_root,
                    after_s=cpu_now[sid],
                    after_root_s=s.proc.last_root_seconds,
                    fraction=fraction,
                )
            if at > start.t:
                point = cur if at >= cur.t else interpolated_sample(prev, cur, at, fraction)
                self.interval(start, point, remaining, cpu_at)
                for t in remaining:
                    value = cpu_at[t.token.id]
                    t.last_cpu = value if value is not None else t.last_cpu
                start = point
            inside = prev.t < at < cur.t
            for s in group:
                remaining.remove(s)
                s.acct.last_sample = at
                ends[s.token.id] = WindowEnd(
                    at=stop_time(s),
                    interpolated=inside,
                    span_s=span if inside else None,
                    task_cpu=sources[s.token.id] if at > prev.t else None,
                    known=self.known,
                )
        if remaining and cur.t > start.t:
            self.interval(start, cur, remaining, cpu_now)
        return ends

    def _cpu_deltas(self, active: list[TrackedTask], cpu_now: dict[int, float | None]) -> dict[int, float]:
        deltas: dict[int, float] = {}
        by_pid: dict[int, list[TrackedTask]] = collections.defaultdict(list)
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

    def interval(
        self, prev: Sample, cur: Sample, active: list[TrackedTask], cpu_now: dict[int, float | None]
    ) -> None:
        """Attribute ``[prev, cur]`` to ``active`` (all registered over all of it); ``cpu_now`` are their
        cumulative CPU times at ``cur``, their ``last_cpu`` those at ``prev``."""
        dt = max(0.0, cur.t - prev.t)
        if dt <= 0:
            return
        from .attribution import other_policy, split_cpu
        from .facet import DomainAccount
        from .window import reading_delta

        capacity = dt * self.n_cpus
        deltas = self._cpu_deltas(active, cpu_now)
        for t in active:
            if cpu_now[t.token.id] is not None and t.last_cpu is not None:
                t.acct.cpu_s = (t.acct.cpu_s or 0.0) + deltas[t.token.id]
        busy = None if cur.busy_s is None or prev.busy_s is None else max(0.0, cur.busy_s - prev.busy_s)
        ids = [t.token.id for t in active]
        by_id = {t.token.id: t for t in active}
        for key, r in cur.readings.items():
            old = prev.readings.get(key)
            estimated = key.startswith("estimated:")
            domain = key.split(":", 1)[1] if estimated else key
            delta, reason = reading_delta(old, r)
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
                self._split_gpu(domain, delta, dt, self.gpu.get(key), active)
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
                acc.count_interval(self.seq)
                acc.covered_s += dt

    def _split_gpu(
        self, key: str, delta: float, dt: float, procs: GpuProcesses | None, active: list[TrackedTask]
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
            acc.count_interval(self.seq)
            acc.covered_s += dt
            acc.basis(split.basis if t.token.id in split.tasks else "none")
            if split.basis == "equal-split" and procs is not None and procs.reason:
                acc.note(procs.reason)


def interpolated_sample(prev: Sample, cur: Sample, at: float, fraction: float) -> Sample:
    """The sample at time ``at`` (``fraction`` of the way from ``prev`` to ``cur``), counters interpolated."""
    from .window import interpolate_reading, linear

    readings = {k: interpolate_reading(prev.readings.get(k), r, fraction) for k, r in cur.readings.items()}
    return Sample(at, readings, linear(prev.busy_s, cur.busy_s, fraction))
