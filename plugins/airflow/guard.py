"""A hard time cap for hook bodies, without forking.

The OpenLineage provider bounds its hooks by forking a child per event; a fork of a multi-threaded process that holds
sockets and locks is what hung its users (see ``shared/reference/reliability.md`` §1.1). We run each hook body on
one long-lived daemon thread instead and wait for it at most ``timeout`` seconds:

* the caller never waits longer than the cap, whatever the body does (a hung filesystem, a stuck lock);
* a body that overran keeps the thread; later calls return at once (logged once) until it finishes, so one stuck
  call costs one cap, not one per hook;
* the thread is a daemon, so a stuck body never holds up interpreter exit;
* after ``fork`` the child gets its own thread (the parent's does not exist there).

Exceptions of the body are logged once per kind and never reach the caller.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from metatrail.logsafe import log, log_once


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
        self._overrun: _Job | None = None
        self.overruns = 0
        self.skipped = 0

    def call(self, what: str, fn: Callable[[], None], timeout: float) -> bool:
        """Run ``fn`` with a cap of ``timeout`` seconds; True if it finished in time (raising or not).

        Only ``Exception`` is contained on the caller's side: a ``BaseException`` raised *in the caller's thread*
        while it waits (a task-runner signal handler, ``KeyboardInterrupt``) is the host's and propagates.
        """
        try:
            with self._lock:
                self._ensure_thread()
                stuck = self._overrun
                if stuck is not None and not stuck.done.is_set():
                    self.skipped += 1
                    log_once(f"skip:{what}", "metatrail: skipping %s: an earlier hook (%s) is still running past its "
                             "time cap; the task is not affected", what, stuck.what)
                    return False
                self._overrun = None
                job = _Job(what, fn)
                self._jobs.put(job)
            if job.done.wait(timeout):
                return True
            with self._lock:
                self._overrun = job
                self.overruns += 1
            log_once(f"overrun:{what}", "metatrail: %s took longer than %.1fs and was left running in the background; "
                     "the task is not affected", what, timeout)
            return False
        except Exception as exc:
            log_once(f"guard:{type(exc).__name__}", "metatrail: could not run %s (%s: %s); the task is not affected",
                     what, type(exc).__name__, exc)
            return False

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            # A forked child inherits neither the parent's thread nor its half-done jobs.
            self._pid = pid
            self._jobs = queue.SimpleQueue()
            self._thread = None
            self._overrun = None
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
