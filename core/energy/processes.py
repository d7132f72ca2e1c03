"""Tasks whose processes the monitor cannot find by itself: a host feeds them in as they come and go.

The monitor follows a task's CPU time through the process tree of one root pid. Some hosts have no such root:
Snakemake's controller starts each job's processes from a pool thread, so a job is whatever processes the plugin
finds belonging to it, and they appear and exit while the job runs; ``metatrail run`` reaps its command itself
and so knows its exact final CPU time. Such a host passes a :class:`TaskProcesses` as ``source`` to
``task_started`` and tells it:

* :meth:`TaskProcesses.add` a process (and its tree) that belongs to the task, from now on. ``share=k`` says the
  process could not be told apart between ``k`` tasks: each of them gets ``1/k`` of its CPU time, and the facet
  flags the split (``shared_process`` and a sentence in ``errors``);
* :meth:`TaskProcesses.exited` a process has ended, with the **final** CPU seconds of its tree when the host
  knows them (from ``os.wait4``, or the controller's reaped-children counter); the tail between the monitor's
  last sample and the exit is then counted, not lost;
* :meth:`TaskProcesses.add_cpu` CPU seconds of processes of the task the host never saw alive (born and reaped
  between two of its looks);
* :meth:`TaskProcesses.close` no more processes will come (call it before ``task_stopped``): when none is alive
  any more the task's CPU time at its stop is then exact (``end_task_cpu: read-at-stop``).

CPU time of a process added after the task's first sample counts from the process's birth (it was born inside
the task). :class:`ProcessGroup` is the monitor's reader of a :class:`TaskProcesses` (sampler thread only).
Every method is thread-safe and never raises.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field

from .cputime import ProcessTree


@dataclass(slots=True)
class _Root:
    share: int
    final_s: float | None = None
    exited: bool = False


@dataclass(slots=True)
class _Snapshot:
    roots: dict[int, _Root]
    extra_s: float
    closed: bool
    notes: list[str] = field(default_factory=list)
    shared: bool = False


class TaskProcesses:
    """The processes of one task as its host learns them (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._roots: dict[int, _Root] = {}
        self._extra_s = 0.0
        self._closed = False
        self._notes: list[str] = []
        self._shared = False

    def add(self, pid: int, *, share: int = 1) -> None:
        """Count the tree rooted at ``pid`` for this task (``1/share`` of it, see the module docstring)."""
        share = max(1, int(share))
        with self._lock:
            if self._closed or pid in self._roots:
                return
            self._roots[pid] = _Root(share)
            if share > 1:
                self._shared = True

    def exited(self, pid: int, cpu_s: float | None = None) -> None:
        """``pid`` ended; ``cpu_s`` is its tree's final CPU seconds (own plus reaped descendants) if known."""
        with self._lock:
            root = self._roots.get(pid)
            if root is None or root.exited:
                return
            root.exited = True
            if cpu_s is not None and cpu_s >= 0:
                root.final_s = float(cpu_s)

    def add_cpu(self, seconds: float, *, share: int = 1) -> None:
        """Add CPU seconds of task processes never seen alive (``1/share`` of them, as for :meth:`add`)."""
        if seconds <= 0:
            return
        with self._lock:
            if self._closed:
                return
            self._extra_s += seconds / max(1, share)
            if share > 1:
                self._shared = True

    def note(self, message: str) -> None:
        """A sentence for the facet's ``errors`` (how a process was assigned, what could not be seen)."""
        with self._lock:
            if message not in self._notes and len(self._notes) < 10:
                self._notes.append(message)

    def close(self) -> None:
        """No more processes will be added (the task is ending)."""
        with self._lock:
            self._closed = True

    @property
    def pids(self) -> list[int]:
        """Every process added so far."""
        with self._lock:
            return list(self._roots)

    def snapshot(self) -> _Snapshot:
        """A consistent copy, for the reader."""
        with self._lock:
            roots = {pid: _Root(r.share, r.final_s, r.exited) for pid, r in self._roots.items()}
            return _Snapshot(roots, self._extra_s, self._closed, list(self._notes), self._shared)


class ProcessGroup(ProcessTree):
    """Reads a :class:`TaskProcesses` the way :class:`~metatrail.energy.cputime.ProcessTree` reads one tree.

    ``pid`` is a pseudo id (negative, unique per task) so that no other task's process is mistaken for it.
    ``final_seconds`` is set once the host closed the set and no process of it is alive: the task's CPU time
    is then complete.
    """

    def __init__(self, source: TaskProcesses, pseudo_pid: int) -> None:
        self.pid = pseudo_pid
        self.include_children = True
        self.root = None
        self._procs = {}
        self.last_seconds = None
        self.last_root_seconds = None
        self.lost = False
        self.source = source
        self._trees: dict[int, ProcessTree] = {}
        self._seen: dict[int, float] = {}  # pid -> its tree's CPU seconds when last read (whole, before the share)
        self.notes: list[str] = []
        self.shared = False

    def descendants(self, skip: Collection[int] = ()) -> list[int]:
        """Live processes of the group (roots and their descendants)."""
        out: list[int] = []
        for pid, tree in self._trees.items():
            if pid not in skip:
                out.append(pid)
                out.extend(tree.descendants(skip))
        return out

    def seconds(self, skip: Collection[int] = ()) -> float | None:
        """Cumulative CPU seconds of every process the host gave, each divided by its share (never None)."""
        snap = self.source.snapshot()
        self.notes, self.shared = snap.notes, snap.shared
        total = snap.extra_s
        live = 0
        for pid, root in snap.roots.items():
            seen = self._seen.get(pid)
            if not root.exited:
                tree = self._trees.get(pid)
                if tree is None:
                    tree = self._trees[pid] = ProcessTree(pid, True)
                value = tree.seconds(skip)
                if value is not None:
                    seen = self._seen[pid] = max(value, seen or 0.0)
                if tree.root is not None and not tree.lost:
                    live += 1
            else:
                self._trees.pop(pid, None)
                if root.final_s is not None:
                    seen = self._seen[pid] = max(root.final_s, seen or 0.0)
            if seen is not None:
                total += seen / root.share
        self.last_seconds = total
        self.final_seconds = total if snap.closed and live == 0 else None
        return total

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is one of the group's live processes (as of the last read)."""
        return any(tree.owns(pid) for tree in self._trees.values())
