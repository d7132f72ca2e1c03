"""Locks that ``os.fork`` waits for, a bounded time, so that a child never inherits the work they guard half done.

A fork copies one thread, the caller; work that another thread was in the middle of stays half done in the child:
a module half imported (the child then sees it half made, or waits for ever on its import lock), a SQLite
transaction half written (the child's own connection to the file then waits on locks nobody will release). metatrail
does such work on background threads (the Recorder's writer, the shipper) of its hosts' processes, and hosts fork
(multiprocessing, Celery and Airflow workers). Each lock here is held around one such piece of work; a fork waits
until it is let go, at most ``wait_s``, then goes ahead all the same (a host is never held longer). A fork that
gave up on a holder is the last to wait for it: later forks while the same piece of work still holds the lock go
ahead at once (a host starting a pool of N workers while the store is locked by another process would otherwise wait
N times over).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator


class ForkWaits:
    """A lock that ``os.fork`` waits for, at most ``wait_s``, before it forks; the child gets a fresh one."""

    def __init__(self, wait_s: float = 10.0) -> None:
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._forking = False
        self._released = 0  # how many holders have let go: while it stays put, the same one holds the lock
        self._gave_up_on = -1  # the count when a fork last stopped waiting for a holder
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                                after_in_child=self._after_fork_in_child)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock (``with waits.held(): …``) around work a fork must not split."""
        with self._lock:
            try:
                yield
            finally:
                # Counted before the lock is let go, so a new holder always comes after a new count: a fork that
                # reads the count while the lock is held knows which holder it is.
                self._released += 1

    def _before_fork(self) -> None:
        released = self._released
        if self._gave_up_on == released:
            # The holder a fork already waited its time for still holds the lock: go ahead at once.
            self._forking = self._lock.acquire(blocking=False)
            return
        self._forking = self._lock.acquire(timeout=self.wait_s)
        if not self._forking:
            self._gave_up_on = released  # as read before the wait: a holder that came during it is waited for too

    def _after_fork_in_parent(self) -> None:
        if self._forking:
            self._forking = False
            self._lock.release()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's holder does not exist here
        self._forking = False


IMPORTS = ForkWaits()
"""Held by a background thread around its first, lazy imports of metatrail's modules and their libraries."""

# A store transaction takes milliseconds; one waiting on another process's lock on the store can take much longer,
# and a host that forks must not wait that long: a fork then goes ahead after a second.
STORE_WRITES = ForkWaits(wait_s=1.0)
"""Held by the Recorder's writer thread around each store transaction."""
