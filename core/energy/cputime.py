"""CPU time of the node and of task process trees: the inputs of CPU-side attribution.

* Node busy time ``B``: from ``/proc/stat`` (``psutil.cpu_times()`` elsewhere), user + nice + system + irq +
  softirq (``guest`` is already inside ``user`` on Linux). ``steal`` is left out: it is time the hypervisor
  gave to other guests, not work of this node's processes, so counting it would charge tasks for a neighbour's
  load.
* Task time ``c``: the root process's user + system, plus (with children) the reaped children's
  ``children_user``/``children_system`` and the live descendants' own times. Live descendants are found
  through ``/proc/<pid>/task/<tid>/children`` (a few microseconds per process, no scan of the whole process
  table) and, where the kernel lacks that file, through psutil's ``children(recursive=True)``. Descendants
  that are themselves registered task roots are skipped, so a nested task is not counted twice while it runs.
  The files read at every sample (``/proc/stat``, the host's threads' ``children``, other processes' ``stat``) are
  kept open and re-read (:mod:`metatrail.energy.procfs`): each system call gives the GIL up, and the host's
  busy thread pays for every hand-back. The host's children are those of the threads ``threading`` knows, less
  metatrail's own: a process started by a thread of C code is not seen alive, and counts once its parent reaps it
  (in the parent's reaped-children time).
* metatrail's own helper processes (the Recorder's writer process, a child of the host) are never part of a task's
  tree: :func:`exclude_own_process` names them. Otherwise a task running in the host's process would be charged
  for storing its own records. (Threads of ours inside the host's process cannot be told apart this way: their
  CPU time stays in the host process's. Nor can a helper once reaped: its CPU time then joins the host's
  reaped-children time; the Recorder reaps its writer when it closes, after the host's tasks.)
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Collection

import psutil

from .procfs import ChildrenReader, ProcGone, StatFiles, child_pids, read_node_stat

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def node_busy_seconds() -> float:
    """Busy CPU seconds of the whole node since boot (all CPUs together).

    Read from the first line of ``/proc/stat``, kept open (the sampler reads it every sample, and psutil's general
    parser costs several times more); psutil where that file is not Linux's."""
    line = read_node_stat()
    if line is not None:
        fields = line.split()
        if len(fields) >= 8 and fields[0] == b"cpu":
            try:
                # user nice system idle iowait irq softirq [steal guest guest_nice], in clock ticks
                user, nice, system, irq, softirq = (int(fields[i]) for i in (1, 2, 3, 6, 7))
                return (user + nice + system + irq + softirq) / _CLOCK_TICKS
            except ValueError:
                pass
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


_PROC_STAT = os.path.exists("/proc/self/stat")
_STAT_FILES = StatFiles()
_OWN_PROCESSES: set[int] = set()


def exclude_own_process(pid: int) -> None:
    """Leave process ``pid`` (and its descendants) out of every task's tree: one of metatrail's own."""
    _OWN_PROCESSES.add(pid)


def forget_own_process(pid: int) -> None:
    """``pid`` has been reaped (the number may be reused): stop leaving it out."""
    _OWN_PROCESSES.discard(pid)


def own_processes() -> frozenset[int]:
    """The pids :func:`exclude_own_process` named (for tests and diagnostics)."""
    return frozenset(_OWN_PROCESSES)


class _Gone(Exception):
    """The process no longer exists (or cannot be read)."""


def _own_seconds(pid: int, with_reaped: bool) -> float:
    """User + system CPU seconds of process ``pid`` (plus its reaped children's with ``with_reaped``).

    This process: :func:`own_process_seconds`. Another: its ``/proc/<pid>/stat``, kept open and read with one
    system call (psutil builds a process object and parses more, several times the cost, and the sampler and the
    hosts' process tracking read every task process at every look). psutil where ``/proc`` is not Linux's. Raises
    :class:`_Gone` when the process has gone or cannot be read."""
    if pid == os.getpid():
        return own_process_seconds(with_reaped)
    elif _PROC_STAT:
        try:
            data = _STAT_FILES.read(pid)
            # Fields after the command name (which may hold spaces and parentheses): state is field 3, utime,
            # stime, cutime and cstime are fields 14 to 17 (proc(5)), in clock ticks.
            fields = data[data.rindex(b")") + 2:].split()
            ticks = [int(f) for f in fields[11:15]]
        except (ProcGone, ValueError) as exc:
            raise _Gone(str(exc)) from exc
        if len(ticks) < 4:
            raise _Gone(f"short /proc/{pid}/stat")
        user, system, c_user, c_system = (t / _CLOCK_TICKS for t in ticks)
    else:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error as exc:
            raise _Gone(str(exc)) from exc
        user, system, c_user, c_system = t.user, t.system, t.children_user, t.children_system
    own = user + system
    if with_reaped:
        own += c_user + c_system
    return float(own)


def own_process_seconds(with_reaped: bool) -> float:
    """This process's CPU seconds (plus its reaped children's with ``with_reaped``), without releasing the GIL.

    Its own part from ``time.process_time()`` (the kernel's nanosecond count): ``os.times()`` rounds down to clock
    ticks (10 ms), and a task of a few milliseconds in the host's process, whose CPU time is read at its start
    and stop, came out as 0 or 10 ms. Reaped children only exist in ``os.times()``, in ticks; they change when a
    child is reaped, by that child's whole CPU time."""
    own = time.process_time()
    if with_reaped:
        t = os.times()
        own += t.children_user + t.children_system
    return own


def _has_no_children() -> bool:
    """Whether this process certainly has no child process, live or exited (one system call, nothing reaped:
    ``WNOWAIT`` leaves an exited child for its owner to wait for)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    except (OSError, AttributeError):  # not Linux, or waitid refused: look in /proc instead
        return False
    return False


def _own_children(me: int) -> list[int] | None:
    """Direct children of this process, ``me`` (:class:`~metatrail.energy.procfs.ChildrenReader`, one per process)."""
    global _own_reader
    reader = _own_reader
    if reader is None or reader.pid != me:
        with _own_reader_lock:
            reader = _own_reader
            if reader is None or reader.pid != me:  # forked: the parent's reader closed its files at the fork
                reader = _own_reader = ChildrenReader(me)
    return reader.children()


_own_reader: ChildrenReader | None = None
_own_reader_lock = threading.Lock()


class ProcessTree:
    """The CPU time of one task's process tree, read repeatedly (see the module docstring)."""

    def __init__(self, pid: int, include_children: bool = True) -> None:
        self.pid = pid
        self.include_children = include_children
        self.root: int | None
        """The root's pid while it can be read; None when it had gone before the first read."""
        try:
            _own_seconds(pid, False)
            self.root = pid
        except _Gone:
            self.root = None
        self._procs: dict[int, bool] = {}  # live descendants as of the last read
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
        me = os.getpid()
        if self.pid == me and _has_no_children():
            return []  # the common case of a task in the host's own process; the /proc walk reads a file per thread
        out: list[int] = []
        seen: set[int] = set()
        stack = [self.pid]
        while stack:
            parent = stack.pop()
            kids = _own_children(me) if parent == me else child_pids(parent)
            if kids is None:
                return self._descendants_psutil(skip)
            for k in kids:
                if k not in skip and k not in _OWN_PROCESSES and k not in seen:
                    seen.add(k)  # listed once, however many files named it
                    out.append(k)
                    stack.append(k)
        return out

    def _descendants_psutil(self, skip: Collection[int]) -> list[int]:
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        left_out = set(skip) | _OWN_PROCESSES
        if left_out:  # a left-out process's descendants go with it
            for k in list(kids):
                if k.pid in left_out:
                    with contextlib.suppress(psutil.Error):
                        left_out.update(c.pid for c in k.children(recursive=True))
        return [k.pid for k in kids if k.pid not in left_out]

    def seconds(self, skip: Collection[int] = ()) -> float | None:
        """Cumulative CPU seconds of the tree now; the last value if the root is gone; None if never read."""
        if self.root is None:
            self.lost = True
            return self.last_seconds
        try:
            total = _own_seconds(self.pid, self.include_children)
        except _Gone:
            self.lost = True
            return self.last_seconds
        root_part = total
        if self.include_children:
            live = self.descendants(skip)
            procs: dict[int, bool] = {}
            for pid in live:
                try:
                    total += _own_seconds(pid, True)
                except _Gone:
                    continue
                procs[pid] = True
            for pid in self._procs.keys() - procs.keys():
                _STAT_FILES.forget(pid)  # gone, or no longer under the root: its kept file is not needed
            self._procs = procs
        self.last_seconds = total
        self.last_root_seconds = root_part
        return total

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is the root or a live descendant known from the last read."""
        return pid == self.pid or pid in self._procs
