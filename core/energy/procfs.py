"""``/proc`` files kept open and re-read with ``pread``: what the energy sampler and the hosts' process tracking read
at every look.

A ``/proc`` file is a ``seq_file``: reading it from offset 0 again regenerates its content, so one open file serves
every later look. Opening one costs several times more than reading it, and every system call gives up the GIL: the
sampler thread then waits, up to a switch interval, for the host's busy thread to hand it back, and each hand-back
costs that thread two context switches. A look that opened, read and closed a file per thread of the host made
dozens of such hand-overs; kept open, it makes one or two per file.

* :func:`read_node_stat` — the first line of ``/proc/stat`` (node-wide CPU time);
* :class:`StatFiles` — ``/proc/<pid>/stat`` of other processes, one open file per pid. A file stays bound to the
  process it was opened for: once that process is gone, reads fail with ``ESRCH`` even if its pid is reused, so a
  reused pid is never read as the old process; the file is then opened again by pid;
* :class:`ChildrenReader` — a process's direct children from its threads' ``children`` files.

Kept files are bounded: :class:`StatFiles` and each :class:`ChildrenReader` keep at most a few dozen (fewer under a
low open-file limit) and open, read and close the rest at each look. They are closed in a forked child at once
(``os.register_at_fork``), before the child's own code can reuse their numbers, and the locks are made anew there
(one held by another thread at the fork would never be released in the child). Thread-safe. Linux only: elsewhere
:func:`read_node_stat` returns None and the readers find nothing; callers use psutil there.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

READ_SIZE = 1 << 16
STAT_FILES_KEPT = 128  # open /proc/<pid>/stat files at most (least recently read closed first)
CHILDREN_FILES_KEPT = 64  # open children files per reader at most (one per thread of the host)


class ProcGone(Exception):
    """The process no longer exists, or its ``/proc`` file cannot be read."""


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring errors (it may already be invalid)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def read_all(fd: int) -> bytes:
    """Everything from offset 0 of ``fd`` (``pread``: an open ``/proc`` file reads afresh), read until a read returns
    nothing: one read of a ``seq_file`` returns at most a page, whatever size was asked. Raises ``OSError``."""
    chunk = os.pread(fd, READ_SIZE, 0)
    if not chunk:
        return chunk
    chunks = [chunk]
    offset = len(chunk)
    while chunk := os.pread(fd, READ_SIZE, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def kept_files_budget(wanted: int) -> int:
    """How many files one keeper may keep open: ``wanted``, but at most a thirty-second of the soft open-file limit
    (the host's own files come first; a host has at most a few keepers)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return wanted
    return max(2, min(wanted, soft // 32))


def _open(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


# Every keeper, so a forked child closes their files and renews their locks before anything else runs.
_keepers: weakref.WeakSet[Any] = weakref.WeakSet()


# -- /proc/stat ----------------------------------------------------------------------------------------------------
_node_stat: list[int] = []  # [fd] once open
_node_lock = threading.Lock()


def read_node_stat() -> bytes | None:
    """The first line of ``/proc/stat`` (``cpu  user nice system idle ...``), or None where there is none."""
    with _node_lock:  # held while reading: no other thread closes the file (and its number is reused) meanwhile
        for _ in range(2):  # a failed read closes the file; the second try opens it afresh
            if not _node_stat:
                try:
                    _node_stat.append(_open("/proc/stat"))
                except OSError:
                    return None
            try:
                # Only the first line is wanted, and it is within the first page the kernel hands out.
                return os.pread(_node_stat[0], 1024, 0).split(b"\n", 1)[0]
            except OSError:
                close_quietly(_node_stat.pop())
    return None


# -- /proc/<pid>/stat ----------------------------------------------------------------------------------------------
class StatFiles:
    """``/proc/<pid>/stat`` of other processes, kept open (at most ``kept`` files, see :func:`kept_files_budget`; the
    least recently read are closed first)."""

    def __init__(self, kept: int = STAT_FILES_KEPT) -> None:
        self.kept = kept_files_budget(kept)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        _keepers.add(self)

    def read(self, pid: int) -> bytes:
        """The content of ``/proc/<pid>/stat`` now; raises :class:`ProcGone` when no process ``pid`` can be read."""
        with self._lock:  # held while reading: no other thread closes a kept file (and its number is reused) meanwhile
            fd = self._fds.get(pid)
            if fd is not None:
                try:
                    data = os.pread(fd, 4096, 0)
                    self._fds.move_to_end(pid)
                    return data
                except OSError:
                    # The process the file was opened for is gone (ESRCH). The caller found a live ``pid``: if the
                    # number was reused meanwhile, that is a new process, read by opening the file again.
                    del self._fds[pid]
                    close_quietly(fd)
            try:
                fd = _open(f"/proc/{pid}/stat")
            except OSError as exc:
                raise ProcGone(str(exc)) from exc
            try:
                data = os.pread(fd, 4096, 0)
            except OSError as exc:
                close_quietly(fd)
                raise ProcGone(str(exc)) from exc
            self._fds[pid] = fd
            while len(self._fds) > self.kept:
                close_quietly(self._fds.popitem(last=False)[1])
            return data

    def forget(self, pid: int) -> None:
        """Close the file kept for ``pid`` (its process ended, or is no longer read)."""
        with self._lock:
            fd = self._fds.pop(pid, None)
            if fd is not None:
                close_quietly(fd)

    def close(self) -> None:
        """Close every kept file."""
        with self._lock:
            for fd in self._fds.values():
                close_quietly(fd)
            self._fds = OrderedDict()

    def __len__(self) -> int:
        return len(self._fds)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        for fd in self._fds.values():
            close_quietly(fd)
        self._fds = OrderedDict()


# -- /proc/<pid>/task/<tid>/children ------------------------------------------------------------------------------
class ChildrenReader:
    """Lists the direct children of a process from ``/proc/<pid>/task/<tid>/children``, cheaply enough to run at
    every look.

    For this process it reads the threads ``threading`` knows, not the listing of ``/proc/self/task`` (a directory
    read, then an open, a read and a close per thread, at every look): each thread's ``children`` file is opened
    once and re-read with ``pread`` (up to ``kept`` files; beyond, opened and closed at each look). Each OS thread
    is read once, however many ``threading`` objects name it (green threads share one). Left out: metatrail's own
    threads (what they start, the Recorder's writer process and ``git``, is no task's), ``threading.Timer`` threads
    with ``skip_timers``, and threads ``threading`` does not know (started by C code). A process one of those starts
    is not seen alive; its CPU time counts once its parent reaps it, in the parent's reaped-children time.

    For another process every look lists its threads. ``children()`` returns None where the kernel has no
    ``children`` files (callers use psutil then).
    """

    def __init__(self, pid: int, *, skip_timers: bool = False, kept: int = CHILDREN_FILES_KEPT) -> None:
        self.pid = pid
        self.skip_timers = skip_timers
        self.kept = kept_files_budget(kept)
        self._fds: dict[int, tuple[threading.Thread, int]] = {}  # tid -> (the thread it was opened for, fd)
        self._gone: dict[int, threading.Thread] = {}  # tids whose thread had ended when first looked at
        self._no_children_files = False
        self._lock = threading.Lock()
        _keepers.add(self)

    def children(self) -> list[int] | None:
        """Direct children of the process now (in no particular order); None without ``children`` files."""
        if self.pid != os.getpid():
            return child_pids(self.pid)
        with self._lock:
            return None if self._no_children_files else self._own_children()

    def _own_children(self) -> list[int] | None:
        threads = threading.enumerate()
        alive = set(threads)
        by_tid: dict[int, threading.Thread] = {}
        for thread in threads:
            tid = thread.native_id
            if not tid:  # not yet started: looked at next time
                continue
            if tid in by_tid:  # an OS thread already listed (green threads share one): keep the one its file is for
                if self._fds.get(tid, (None, 0))[0] is thread:
                    by_tid[tid] = thread
                continue
            if thread.name.startswith("metatrail") or (self.skip_timers and isinstance(thread, threading.Timer)):
                continue
            if self._gone.get(tid) is thread:  # a thread object left behind by a thread that ended (foreign threads)
                continue
            by_tid[tid] = thread
        for tid in [t for t, (owner, _) in self._fds.items() if by_tid.get(t) is not owner]:
            close_quietly(self._fds.pop(tid)[1])  # its thread ended (its number may serve another thread now)
        self._gone = {tid: t for tid, t in self._gone.items() if t in alive}
        out: list[int] = []
        for tid, thread in by_tid.items():
            entry = self._fds.get(tid)
            kept = entry is not None
            if entry is not None:
                fd = entry[1]
            else:
                try:
                    fd = _open(f"/proc/{self.pid}/task/{tid}/children")
                except FileNotFoundError:
                    if os.path.exists(f"/proc/{self.pid}/task/{tid}"):
                        self._no_children_files = True  # a kernel without the children files
                        return None
                    self._gone[tid] = thread  # the thread ended meanwhile
                    continue
                except OSError:
                    continue
                if len(self._fds) < self.kept:
                    self._fds[tid] = (thread, fd)
                    kept = True
            try:
                data = read_all(fd)
            except OSError:
                continue
            finally:
                if not kept:
                    close_quietly(fd)
            if data:
                out.extend(map(int, data.split()))
        return out

    def close(self) -> None:
        """Close the files kept open."""
        with self._lock:
            for _, fd in self._fds.values():
                close_quietly(fd)
            self._fds.clear()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        for _, fd in self._fds.values():
            close_quietly(fd)
        self._fds = {}
        self._gone = {}


def child_pids(pid: int) -> list[int] | None:
    """Direct children of process ``pid`` from ``/proc/<pid>/task/<tid>/children`` of each of its threads (each file
    opened, read and closed: a process seen once is not worth a kept file); ``None`` when the kernel does not
    provide those files."""
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            fd = _open(f"{base}/{tid}/children")
        except FileNotFoundError:
            if not os.path.exists(f"{base}/{tid}"):
                continue  # the thread ended between listdir and open
            return None
        except OSError:
            continue
        try:
            out.extend(map(int, read_all(fd).split()))
        except OSError:
            continue
        finally:
            os.close(fd)
    return out


def _after_fork_in_child() -> None:
    # The child has one thread, this one; the kept files' numbers are still metatrail's (no code of the child has run).
    global _node_lock
    _node_lock = threading.Lock()
    while _node_stat:
        close_quietly(_node_stat.pop())
    for keeper in list(_keepers):
        keeper._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
