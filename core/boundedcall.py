"""A hard time cap for hook bodies, without forking.

The OpenLineage provider bounds its hooks by forking a child per event; a fork of a multi-threaded process that holds
sockets and locks is what hung its users (see ``shared/reference/reliability.md`` §1.1). We run each hook body on
one long-lived daemon thread instead and wait for it at most ``timeout`` seconds:

* the caller never waits longer than the cap, whatever the body does (a hung filesystem, a stuck lock);
* a body that overran keeps the thread; until it finishes, later calls do not wait for anything, so one stuck call
  costs one cap, not one per hook. What happens to them is the caller's choice (:class:`WhenBusy`): a start hook is
  skipped (run late, it would record the wrong inputs), an end hook is queued behind the stuck body and runs when it
  ends (the terminal state must be recorded); at most ``MAX_BACKLOG`` calls wait there;
* the thread is a daemon, so a stuck body never holds up interpreter exit (:meth:`BoundedCaller.drain` lets a
  process that is about to end give the queue one more bounded wait);
* after ``fork`` the child gets its own thread (the parent's does not exist there).

Exceptions of the body are logged once per kind and never reach the caller.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from metatrail.logsafe import log, log_once

#: Calls queued behind a stuck body, at most: a scheduler lives for months, and a body stuck for good (a hung
#: mount) must not make it hold every later hook in memory.
MAX_BACKLOG = 1000


class WhenBusy(enum.Enum):
    """What :meth:`BoundedCaller.call` does with a call while an earlier body is still running past its cap."""

    SKIP = "skip"  # drop it, return at once
    QUEUE = "queue"  # run it after the stuck body, return at once
    QUEUE_AND_WAIT = "queue_and_wait"  # run it after the stuck body, wait for it up to the cap


@dataclass
class _Job:
    what: str
    fn: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)


class BoundedCaller:
    """Runs callables on one daemon worker thread, waiting for each at most a given time (module docstring)."""

    def __init__(self, name: str = "metatrail-airflow-hook") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Jobs no caller waits for any more (one that overran, those queued behind it), oldest first.
        self._backlog: collections.deque[_Job] = collections.deque()
        self.overruns = 0
        self.skipped = 0
        self.queued = 0
        _callers.add(self)

    def call(self, what: str, fn: Callable[[], None], timeout: float, when_busy: WhenBusy = WhenBusy.SKIP) -> bool:
        """Run ``fn`` with a cap of ``timeout`` seconds; True if it finished in time (raising or not).

        While an earlier body is still running past its cap, ``fn`` is handled as ``when_busy`` says (and False is
        returned unless it was waited for and finished in time).

        Only ``Exception`` is contained on the caller's side: a ``BaseException`` raised *in the caller's thread*
        while it waits (a task-runner signal handler, ``KeyboardInterrupt``) is the host's and propagates.
        """
        try:
            with self._lock:
                self._ensure_thread()
                stuck = self._stuck()
                if stuck is not None and when_busy is WhenBusy.SKIP:
                    self.skipped += 1
                    log_once(f"skip:{what}", "metatrail: skipping %s: an earlier hook (%s) is still running past its "
                             "time cap; the task is not affected", what, stuck.what)
                    return False
                if stuck is not None and len(self._backlog) >= MAX_BACKLOG:
                    self.skipped += 1
                    log_once("backlog-full", "metatrail: %d hooks wait behind %s, which is still running past its "
                             "time cap; dropping %s and later ones; the task is not affected", len(self._backlog),
                             stuck.what, what)
                    return False
                job = _Job(what, fn)
                self._jobs.put(job)
                if stuck is not None:
                    self._backlog.append(job)
                    self.queued += 1
                    log_once(f"queue:{what}", "metatrail: %s queued behind %s, which is still running past its time "
                             "cap; it is recorded when that ends; the task is not affected", what, stuck.what)
                    if when_busy is WhenBusy.QUEUE:
                        return False
            if job.done.wait(timeout):
                return True
            with self._lock:
                if stuck is None:
                    self._backlog.append(job)
                    self.overruns += 1
            if stuck is None:
                log_once(f"overrun:{what}", "metatrail: %s took longer than %.1fs and was left running in the "
                         "background; the task is not affected", what, timeout)
            return False
        except Exception as exc:
            log_once(f"guard:{type(exc).__name__}", "metatrail: could not run %s (%s: %s); the task is not affected",
                     what, type(exc).__name__, exc)
            return False

    @property
    def busy(self) -> bool:
        """True while a body runs past its cap (or calls queued behind one wait): a call now would not run at once."""
        with self._lock:
            return self._pid == os.getpid() and self._stuck() is not None

    def drain(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds until the jobs nobody waits for have run; True if they all have.

        For a process about to end: its daemon worker, and whatever is queued there, ends with it.
        """
        try:
            with self._lock:
                if self._pid != os.getpid() or not self._backlog:
                    return True
                last = self._backlog[-1]
            # The queue runs in order: when the last one is done, all are.
            return last.done.wait(timeout)
        except Exception as exc:
            log_once(f"drain:{type(exc).__name__}", "metatrail: could not wait for queued hooks (%s: %s)",
                     type(exc).__name__, exc)
            return False

    def _stuck(self) -> _Job | None:
        """The job the worker is still running past its cap, if any (call with the lock held)."""
        while self._backlog and self._backlog[0].done.is_set():
            self._backlog.popleft()
        return self._backlog[0] if self._backlog else None

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            # A forked child inherits neither the parent's thread nor its half-done jobs.
            self._pid = pid
            self._jobs = queue.SimpleQueue()
            self._thread = None
            self._backlog = collections.deque()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, args=(self._jobs,), name=self._name, daemon=True)
            self._thread.start()

    @staticmethod
    def _work(jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            job = jobs.get()
            try:
                job.fn()
            except BaseException as exc:  # the worker must outlive any body; nothing here reaches the host
                log_once(f"hook:{job.what}:{type(exc).__name__}",
                         "metatrail: %s failed (%s: %s); the task is not affected", job.what, type(exc).__name__, exc,
                         exc_info=log.isEnabledFor(logging.DEBUG))
            finally:
                job.done.set()


# Every BoundedCaller, for the fork handler below.
_callers: weakref.WeakSet[BoundedCaller] = weakref.WeakSet()


def _renew_locks_in_child() -> None:
    # A thread of the parent may have held a caller's lock at the fork (briefly, in call): the child's copy would
    # stay locked for ever, and the child's first hook would wait on it with no cap.
    for caller in list(_callers):
        caller._lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_locks_in_child)
