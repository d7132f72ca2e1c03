"""``/proc`` files kept open and re-read with ``pread``: what the energy sampler and the hosts' process tracking read
at every look.

A ``/proc`` file is a ``seq_file``: reading it from offset 0 again regenerates its content, so one open file serves
every later look. Opening one costs several times more than reading it, and every system call gives up the GIL: the
sampler thread then waits, up to a switch interval, for the host's busy thread to hand it back, and each hand-back
costs that thread two context switches. A look that opened, read and closed a file per thread of the host made
dozens of such hand-overs; kept open, it makes one per file.

* :func:`read_node_stat` — the first line of ``/proc/stat`` (node-wide CPU time);
* :class:`StatFiles` — ``/proc/<pid>/stat`` of other processes, one open file per pid (a bounded cache). A file
  stays bound to the process it was opened for: once that process is gone, reads fail with ``ESRCH`` even if its
  pid is reused, so a reused pid is never read as the old process; the file is then opened again by pid;
* :class:`ChildrenReader` — a process's direct children from its threads' ``children`` files.

Each returns ``None`` (or raises :class:`ProcGone`) where ``/proc`` is not Linux's; callers fall back to psutil.
Thread-safe. After a fork the kept files are dropped (they name the parent's processes and threads) and reopened
on first use.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict

READ_SIZE = 1 << 16
STAT_FILES_KEPT = 128  # open /proc/<pid>/stat files at most (least recently read closed first)


class ProcGone(Exception):
    """The process no longer exists, or its ``/proc`` file cannot be read."""


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring errors (it may already be invalid)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def read_all(fd: int) -> bytes:
    """Everything from offset 0 of ``fd`` (``pread``: an open ``/proc`` file reads afresh). One system call when the
    content fits :data:`READ_SIZE` (a short read is the end of a ``seq_file``). Raises ``OSError``."""
    chunk = os.pread(fd, READ_SIZE, 0)
    if len(chunk) < READ_SIZE:
        return chunk
    chunks = [chunk]
    offset = len(chunk)
    while chunk := os.pread(fd, READ_SIZE, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _open(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


# -- /proc/stat ----------------------------------------------------------------------------------------------------
_node_stat: list[int] = []  # [fd, pid that opened it]
_node_lock = threading.Lock()


def read_node_stat() -> bytes | None:
    """The first line of ``/proc/stat`` (``cpu  user nice system idle ...``), or None where there is none."""
    with _node_lock:  # held while reading: no other thread closes the file (and its number is reused) meanwhile
        for _ in range(2):  # a failed read closes the file; the second try opens it afresh
            if not _node_stat or _node_stat[1] != os.getpid():
                try:
                    fd = _open("/proc/stat")
                except OSError:
                    return None
                if _node_stat:  # forked: this copy of the parent's file is ours to close
                    close_quietly(_node_stat[0])
                _node_stat[:] = [fd, os.getpid()]
            try:
                # Only the first line is wanted, but the kernel renders the whole file whatever the size asked for.
                return os.pread(_node_stat[0], 1024, 0).split(b"\n", 1)[0]
            except OSError:
                close_quietly(_node_stat[0])
                _node_stat.clear()
    return None


# -- /proc/<pid>/stat ----------------------------------------------------------------------------------------------
class StatFiles:
    """``/proc/<pid>/stat`` of other processes, kept open (at most ``kept`` files; the least recently read are closed
    first)."""

    def __init__(self, kept: int = STAT_FILES_KEPT) -> None:
        self.kept = kept
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._owner = os.getpid()
        self._lock = threading.Lock()

    def read(self, pid: int) -> bytes:
        """The content of ``/proc/<pid>/stat`` now; raises :class:`ProcGone` when no process ``pid`` can be read."""
        with self._lock:  # held while reading: no other thread closes a kept file (and its number is reused) meanwhile
            if self._owner != os.getpid():  # forked: the kept files are copies of the parent's
                self._close_all()
                self._owner = os.getpid()
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
        """Close the file kept for ``pid`` (its process ended)."""
        with self._lock:
            fd = self._fds.pop(pid, None)
            if fd is not None:
                close_quietly(fd)

    def close(self) -> None:
        """Close every kept file."""
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        for fd in self._fds.values():
            close_quietly(fd)
        self._fds = OrderedDict()

    def __len__(self) -> int:
        return len(self._fds)


# -- /proc/<pid>/task/<tid>/children ------------------------------------------------------------------------------
class ChildrenReader:
    """Lists the direct children of a process from ``/proc/<pid>/task/<tid>/children``, cheaply enough to run at
    every look.

    For this process it reads the threads ``threading`` knows, not the listing of ``/proc/self/task`` (a directory
    read, then an open, a read and a close per thread, at every look): each thread's ``children`` file is opened
    once and re-read with ``pread``. Left out: metatrail's own threads (what they start, the Recorder's writer
    process and ``git``, is no task's), ``threading.Timer`` threads with ``skip_timers``, and threads that
    ``threading`` does not know (started by C code). A process one of those starts is not seen alive; its CPU time
    still counts once it is reaped, in its parent's reaped-children time.

    For another process every look lists its threads. ``children()`` returns None where the kernel has no
    ``children`` files (callers use psutil then).
    """

    def __init__(self, pid: int, *, skip_timers: bool = False) -> None:
        self.pid = pid
        self.skip_timers = skip_timers
        self._fds: dict[threading.Thread, int] = {}  # this process's threads, kept open between looks
        self._skipped: set[threading.Thread] = set()
        self._owner = os.getpid()
        self._lock = threading.Lock()

    def children(self) -> list[int] | None:
        """Direct children of the process now (in no particular order); None without ``children`` files."""
        me = os.getpid()
        if self.pid != me:
            return child_pids(self.pid)
        with self._lock:
            return self._own_children(me)

    def _own_children(self, me: int) -> list[int] | None:
        if self._owner != me:  # forked: the kept files are the parent's threads'
            for kept in self._fds.values():
                close_quietly(kept)
            self._fds.clear()
            self._skipped.clear()
            self._owner = me
        threads = threading.enumerate()
        alive = set(threads)
        for gone in [t for t in self._fds if t not in alive]:
            close_quietly(self._fds.pop(gone))
        self._skipped &= alive
        out: list[int] = []
        for thread in threads:
            fd = self._fds.get(thread)
            if fd is None:
                if thread in self._skipped or not thread.native_id:  # not yet started: looked at next time
                    continue
                if thread.name.startswith("metatrail") or (self.skip_timers and isinstance(thread, threading.Timer)):
                    self._skipped.add(thread)
                    continue
                try:
                    fd = _open(f"/proc/{self.pid}/task/{thread.native_id}/children")
                except FileNotFoundError:
                    if os.path.exists(f"/proc/{self.pid}/task/{thread.native_id}"):
                        return None  # a kernel without the children files
                    continue  # the thread ended meanwhile
                except OSError:
                    continue
                self._fds[thread] = fd
            try:
                data = read_all(fd)
            except OSError:
                continue
            if data:
                out.extend(map(int, data.split()))
        return out

    def close(self) -> None:
        """Close the files kept open."""
        with self._lock:
            for fd in self._fds.values():
                close_quietly(fd)
            self._fds.clear()


def child_pids(pid: int) -> list[int] | None:
    """Direct children of process ``pid`` from ``/proc/<pid>/task/<tid>/children`` of each of its threads (each file
    opened, read once and closed: a process seen once is not worth a kept file); ``None`` when the kernel does not
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
