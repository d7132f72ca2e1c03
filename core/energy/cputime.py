"""CPU time of the node and of task process trees: the inputs of CPU-side attribution.

* Node busy time ``B``: ``psutil.cpu_times()`` user + nice + system + irq + softirq (``guest`` is already
  inside ``user`` on Linux). ``steal`` is left out: it is time the hypervisor gave to other guests, not work
  of this node's processes, so counting it would charge tasks for a neighbour's load.
* Task time ``c``: the root process's user + system, plus (with children) the reaped children's
  ``children_user``/``children_system`` and the live descendants' own times. Live descendants are found
  through ``/proc/<pid>/task/<tid>/children`` (a few microseconds per process, no scan of the whole process
  table) and, where the kernel lacks that file, through psutil's ``children(recursive=True)``. Descendants
  that are themselves registered task roots are skipped, so a nested task is not counted twice while it runs.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import psutil


def node_busy_seconds() -> float:
    """Busy CPU seconds of the whole node since boot (all CPUs together)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _own_seconds(proc: psutil.Process, with_reaped: bool) -> float:
    t = proc.cpu_times()
    own = t.user + t.system
    if with_reaped:
        own += t.children_user + t.children_system
    return float(own)


def _child_pids(pid: int) -> list[int] | None:
    """Children of ``pid`` from /proc; ``None`` when the kernel does not provide the children files."""
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"{base}/{tid}/children", "rb") as fh:
                out.extend(int(x) for x in fh.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"{base}/{tid}"):
                continue  # the thread ended between listdir and open
            return None
        except OSError:
            continue
    return out


class ProcessTree:
    """The CPU time of one task's process tree, read repeatedly (see the module docstring)."""

    def __init__(self, pid: int, include_children: bool = True) -> None:
        self.pid = pid
        self.include_children = include_children
        self.root: psutil.Process | None
        try:
            self.root = psutil.Process(pid)
        except (psutil.Error, ValueError):
            self.root = None
        self._procs: dict[int, psutil.Process] = {}
        self.last_seconds: float | None = None
        self.last_root_seconds: float | None = None
        """The root's own (plus, with children, reaped children's) part of ``last_seconds``."""
        self.lost = False
        self.final_seconds: float | None = None
        """The tree's CPU seconds once known to be complete (set only by readers that can know it)."""

    def descendants(self, skip: Collection[int] = ()) -> list[int]:
        """Live descendant pids (registered roots in ``skip`` and their subtrees left out)."""
        if self.root is None:
            return []
        out: list[int] = []
        stack = [self.pid]
        while stack:
            kids = _child_pids(stack.pop())
            if kids is None:
                return self._descendants_psutil(skip)
            for k in kids:
                if k not in skip:
                    out.append(k)
                    stack.append(k)
        return out

    def _descendants_psutil(self, skip: Collection[int]) -> list[int]:
        assert self.root is not None
        try:
            kids = self.root.children(recursive=True)
        except psutil.Error:
            return []
        return [k.pid for k in kids if k.pid not in skip]

    def seconds(self, skip: Collection[int] = ()) -> float | None:
        """Cumulative CPU seconds of the tree now; the last value if the root is gone; None if never read."""
        if self.root is None:
            self.lost = True
            return self.last_seconds
        try:
            total = _own_seconds(self.root, self.include_children)
        except psutil.Error:
            self.lost = True
            return self.last_seconds
        root_part = total
        if self.include_children:
            live = set(self.descendants(skip))
            for pid in list(self._procs):
                if pid not in live:
                    del self._procs[pid]
            for pid in live:
                proc = self._procs.get(pid)
                if proc is None:
                    try:
                        proc = self._procs[pid] = psutil.Process(pid)
                    except psutil.Error:
                        continue
                try:
                    total += _own_seconds(proc, True)
                except psutil.Error:
                    continue
        self.last_seconds = total
        self.last_root_seconds = root_part
        return total

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is the root or a live descendant known from the last read."""
        return pid == self.pid or pid in self._procs
