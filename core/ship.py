"""The shipper: background delivery of the local store's events to a metatrail server.

The local store is the spool. The Recorder writes every event there first; after each write it calls
:meth:`Shipper.notify`, which only sets a flag (never blocks, never does I/O on the caller's thread). A daemon thread
then pushes what the server lacks with the same missing-events transfer as ``metatrail push``, sharing its cursor
(the high-water mark of the local log, persisted in the store after every page). So:

* **Retry with backoff.** Network errors, timeouts, 5xx, 408 and 429 back off exponentially with full jitter
  (``Retry-After`` honoured, capped); the cursor does not move until the server acknowledged a page.
* **Survives exit and restarts.** At exit the shipper gets a short, bounded drain (``METATRAIL_SHIP_EXIT_TIMEOUT``,
  default 2 s; it gives up at once when the server is unreachable). What is left stays in the store and is picked
  up by the next process's shipper or by ``metatrail push``. ``Recorder.close`` does the same bounded drain, then
  stops the thread and releases its connections (a process that runs one workflow after another keeps none of them
  per run); events recorded after it start the thread again.
* **Bounded.** Memory holds one page. When the backlog grows past ``METATRAIL_SHIP_MAX_BACKLOG`` events (default
  1,000,000) the shipper skips RUNNING/OTHER and run-less events in the excess and counts them in ``dropped``;
  START/COMPLETE/FAIL/ABORT are never skipped. Skipped events stay in the local store; the shared cursor has moved
  past them, so ``metatrail push --all`` (which compares the whole log) sends them.
* **Rejected events** (a 4xx for an event the server refuses, or a 403 for an event outside what the token may
  write) are isolated by bisection, counted in ``rejected``, named one by one in the log and skipped, so one bad
  event cannot stall the queue; they stay in the local store (``metatrail push --all`` offers them again).
  Authentication errors (401, and 403 for the token itself) stall and are logged.
* **Kill switch.** With ``METATRAIL_DISABLED=1`` :meth:`notify` returns at once.

Configuration: ``METATRAIL_SERVER`` and ``METATRAIL_TOKEN`` (or ``server``/``token`` in the config file; arguments >
file > environment). Without a server nothing is shipped.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from metatrail import exithook, forkwaits
from metatrail.config import is_disabled
from metatrail.logsafe import log_once

log = logging.getLogger("metatrail")
ESSENTIAL = frozenset({"START", "COMPLETE", "FAIL", "ABORT"})
IDLE_POLL_S = 30.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


class Shipper:
    """Ships the local store at ``store_url`` to ``server_url`` in a background thread (see module docstring)."""

    def __init__(self, store_url: str, server_url: str, token: str | None = None, *, ca_bundle: str | None = None,
                 page: int = 500, max_backlog: int | None = None, base_delay: float = 0.5, max_delay: float = 30.0,
                 exit_timeout: float | None = None, timeout: float = 10.0, connect_timeout: float = 5.0) -> None:
        self.store_url = store_url
        self.server_url = server_url
        self.token = token
        self.ca_bundle = ca_bundle
        self.page = page
        self.max_backlog = int(max_backlog if max_backlog is not None
                               else _env_float("METATRAIL_SHIP_MAX_BACKLOG", 1_000_000))
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.exit_timeout = exit_timeout if exit_timeout is not None else _env_float("METATRAIL_SHIP_EXIT_TIMEOUT", 2.0)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.sent = 0
        self.acked = 0
        self.retried = 0
        self.rejected = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._init_state()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._init_state)

    def _init_state(self) -> None:
        # Also the after-fork reset: the child ships with its own thread and connections.
        self._cv = threading.Condition()
        self._wanted = 0  # notifications received
        self._served = 0  # notifications covered by a completed drain
        self._failures = 0
        self._urgent = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._parts: tuple[Any, Any, Any, Any] | None = None

    @classmethod
    def lazy(cls, settings: Callable[[], Any]) -> LazyShipper:
        """A shipper resolved on first :meth:`notify` from ``settings()`` (the Recorder's settings: store URL) and the
        server configuration; a no-op when no server is configured."""
        return LazyShipper(settings)

    # -- the caller's side ----------------------------------------------------------------------------------------
    def notify(self) -> None:
        """New events are in the local store: ship them soon. Never blocks."""
        if is_disabled():
            return
        with self._cv:
            self._wanted += 1
            self._ensure_thread()
            self._cv.notify_all()

    def drain(self, timeout: float, *, give_up_on_failure: bool = True) -> bool:
        """Ship what is pending now, waiting at most ``timeout`` seconds; False when it did not finish (the rest is
        shipped later). By default (the exit drain) it skips the backoff wait and gives up at the first failure;
        with ``give_up_on_failure=False`` it keeps retrying, with backoff, until done or out of time."""
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._wanted += 1
            self._ensure_thread()
            target = self._wanted
            failures = self._failures
            self._urgent = give_up_on_failure
            self._cv.notify_all()
            deadline = time.monotonic() + timeout
            while self._served < target and (self._failures == failures or not give_up_on_failure):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            self._urgent = False
            return self._served >= target

    def at_exit(self) -> None:
        """The bounded exit drain (see module docstring)."""
        with self._cv:
            pending = self._wanted > self._served
        if pending and not is_disabled() and self.exit_timeout > 0 and not self.drain(self.exit_timeout):
            log.info("metatrail: events not yet shipped to %s stay in the local store (metatrail push sends them)",
                     self.server_url)

    def close(self, timeout: float = 5.0) -> None:
        """Ship what is pending, then stop the thread and release its connections, all within ``timeout`` seconds;
        the drain gives up at the first failure, as at exit. A thread still busy when the time is up (a hanging
        server) stops, and releases its connections, when its request ends. Events notified after ``close`` start
        the thread again."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cv:
            pending = self._wanted > self._served
        if pending and not is_disabled():
            self.drain(max(deadline - time.monotonic(), 0.0))
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
        with self._cv:
            # Not when a notify meanwhile started a new thread: that one owns the connections now.
            idle = self._thread is thread and (thread is None or not thread.is_alive())
        if idle:
            self._release()

    def stats(self) -> dict[str, Any]:
        """Counters: sent, acked (new to the server), retried, rejected, dropped, pending notifications, last error."""
        with self._cv:
            pending = self._wanted - self._served
        return {"sent": self.sent, "acked": self.acked, "retried": self.retried, "rejected": self.rejected,
                "dropped": self.dropped, "pending": pending, "last_error": self.last_error}

    # -- the shipper thread ---------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        # Under self._cv. New work cancels a stop that close() asked for: a thread that has not yet seen the stop goes
        # on, one that ended is replaced.
        self._stopping = False
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="metatrail-shipper", daemon=True)
            self._thread.start()

    def _open(self) -> tuple[Any, Any, Any, Any]:
        if self._parts is None:
            # The first opening imports the SQL store (SQLAlchemy, its dialect) on this thread: a fork must not catch
            # it halfway (see metatrail.forkwaits).
            with forkwaits.IMPORTS.held():
                from metatrail.store import open_store
                from metatrail.store.remote import ServerClient
                from metatrail.sync import HttpEndpoint, LocalEndpoint, SyncLog

                store = open_store(self.store_url)
                log_ = SyncLog(store.url)
            client = ServerClient(self.server_url, self.token, timeout=self.timeout,
                                  connect_timeout=self.connect_timeout, ca_bundle=self.ca_bundle)
            self._parts = (store, log_, LocalEndpoint(store, log_, validate=False), _Isolating(HttpEndpoint(client),
                                                                                              self))
        return self._parts

    def _release(self) -> None:
        if self._parts is not None:
            store, log_, _local, remote = self._parts
            for close in (remote.inner.client.close, log_.close, store.close):
                try:
                    close()
                except Exception as exc:
                    log.debug("metatrail: shipper close: %s", exc)
            self._parts = None

    def _ship(self) -> None:
        from metatrail.sync import Filter, transfer

        _store, log_, local, remote = self._open()
        key = remote.inner.key
        cursor = log_.get_cursor(key, "push", "")
        backlog = log_.count_after(cursor) if self.max_backlog > 0 else 0
        source = _Bounded(local, self, excess=max(0, backlog - self.max_backlog))
        # Not pipelined: the bounded source counts what it skips per page read, so read a page only when the one
        # before it is delivered.
        result = transfer(source, remote, log=log_, peer=key, direction="push", filt=Filter(), page_size=self.page,
                          pipelined=False)
        if result.rewound:
            log.warning("metatrail: the server lacks events shipped to it before, or the local log no longer matches "
                        "the shipping cursor (a restore?); compared the whole log")
        source.settled()

    def _run(self) -> None:
        from metatrail.store.remote import RemoteError, RemoteRejected

        delay = self.base_delay
        while True:
            with self._cv:
                while self._wanted == self._served and not self._stopping:
                    if not self._cv.wait(IDLE_POLL_S) and self._wanted == self._served and not self._stopping:
                        self._wanted += 1  # poll now and then: another process may have left a backlog
                if self._stopping:
                    self._release()
                    return
                target = self._wanted
            try:
                self._ship()
            except Exception as exc:
                self.retried += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                auth = isinstance(exc, RemoteRejected) and exc.status in (401, 403)
                log_once(f"ship:{type(exc).__name__}:{getattr(exc, 'status', '')}",
                         "metatrail: shipping to %s failed (%s); will retry, events are safe in the local store",
                         self.server_url, self.last_error)
                if not isinstance(exc, RemoteError):
                    self._release()  # a local problem: reopen next time
                wait = max(delay, getattr(exc, "retry_after", None) or 0.0) if not auth else self.max_delay
                wait = min(wait, self.max_delay)
                # Jittered so many clients do not stampede; new events do not cut the wait short, a drain does.
                until = time.monotonic() + random.uniform(wait / 2, wait)
                with self._cv:
                    self._failures += 1
                    self._cv.notify_all()
                    while not (self._urgent or self._stopping) and (left := until - time.monotonic()) > 0:
                        self._cv.wait(left)
                delay = min(delay * 2, self.max_delay)
                continue
            delay = self.base_delay
            with self._cv:
                self._served = max(self._served, target)
                self._cv.notify_all()


class _Bounded:
    """The local store as a source that, while a backlog exceeds the bound, skips non-essential events (counted)."""

    def __init__(self, inner: Any, shipper: Shipper, *, excess: int) -> None:
        self.inner = inner
        self.key = inner.key
        self.shipper = shipper
        self.excess = excess
        self._skipped = 0  # of the page in progress: counted once it is settled (a failed page is skipped again)

    def settled(self) -> None:
        """The pages read so far are delivered (and the cursor past them): count what they skipped."""
        self.shipper.dropped += self._skipped
        self._skipped = 0

    def page(self, after: int, filt: Any, limit: int) -> Any:
        self.settled()  # not pipelined: a page is read only once the one before it is delivered
        return self.inner.page(after, filt, limit)

    def fetch(self, ids: Sequence[str], filt: Any) -> list[Any]:
        import json

        shipped = self.inner.fetch(ids, filt)
        if self.excess <= 0:
            return list(shipped)
        kept = []
        for item in shipped:
            if self.excess > 0 and str(json.loads(item.text).get("eventType") or "").upper() not in ESSENTIAL:
                self.excess -= 1
                self._skipped += 1
                continue
            kept.append(item)
        return kept

    def missing(self, ids: Sequence[str]) -> list[str]:
        return list(self.inner.missing(ids))

    def receive(self, shipped: Sequence[Any]) -> int:
        return int(self.inner.receive(shipped))


class _Isolating:
    """A server destination whose endpoint skips only the events the server refuses (it halves a refused batch
    until they stand alone); counts them in ``rejected`` and names each in the log."""

    def __init__(self, inner: Any, shipper: Shipper) -> None:
        self.inner = inner
        self.key = inner.key
        self.shipper = shipper

    @property
    def refused(self) -> list[tuple[str, str]]:
        """What the server refused so far (the endpoint's list): never an anchor of the shipping cursor."""
        return list(self.inner.refused)

    def page(self, after: int, filt: Any, limit: int) -> Any:
        return self.inner.page(after, filt, limit)

    def fetch(self, ids: Sequence[str], filt: Any) -> list[Any]:
        return list(self.inner.fetch(ids, filt))

    def missing(self, ids: Sequence[str]) -> list[str]:
        return list(self.inner.missing(ids))

    def receive(self, shipped: Sequence[Any]) -> int:
        # The endpoint isolates what the server refuses (:func:`metatrail.sync.refuses_events`) and lists it.
        refused = self.inner.refused
        seen = len(refused)  # the transfer is not pipelined: no other receive adds to it meanwhile
        inserted = int(self.inner.receive(shipped))
        self.shipper.sent += len(shipped)  # delivered: a page that failed and is sent again counts once
        for event_id, reason in refused[seen:]:
            self._refused(event_id, reason)
        self.shipper.acked += inserted
        return inserted

    def _refused(self, event_id: str, reason: str) -> None:
        # Each one is said, with its id: an event the server will not take may be a run's START or COMPLETE, and
        # it stays only in the local store (``metatrail push --all`` offers it again once the server would take it).
        self.shipper.rejected += 1
        log.warning("metatrail: the server refused event %s and the shipper skipped it; it stays in the local store "
                    "(%s)", event_id, reason)


class LazyShipper:
    """What the Recorder holds: resolves the configuration and creates the :class:`Shipper` on first
    :meth:`notify` (on the Recorder's writer thread).

    Its exit drain is registered when it is constructed, the way the Recorder registers its exit flush (when the
    main thread ends, while imports still work; plain ``atexit`` elsewhere). Both run last-registered first, so
    build it before the Recorder registers its flush: the drain then ships what the flush stored."""

    def __init__(self, settings: Callable[[], Any]) -> None:
        self._settings = settings
        self._shipper: Shipper | None = None
        self._resolved = False
        self._lock = threading.Lock()
        exithook.at_exit(self._at_exit)

    @property
    def shipper(self) -> Shipper | None:
        """The resolved shipper (None before the first notify, or when no server is configured)."""
        return self._shipper

    def notify(self) -> None:
        """See :meth:`Shipper.notify`; never raises."""
        if is_disabled():
            return
        try:
            if not self._resolved:
                self._resolve()
            if self._shipper is not None:
                self._shipper.notify()
        except Exception as exc:
            log_once(f"ship-notify:{type(exc).__name__}", "metatrail: shipping disabled (%s: %s)",
                     type(exc).__name__, exc)

    def close(self, timeout: float | None = None) -> None:
        """Stop the shipper's thread and release its connections (see :meth:`Shipper.close`), shipping what is
        pending within ``timeout`` seconds, at most the exit drain's ``METATRAIL_SHIP_EXIT_TIMEOUT``; never raises.
        A later notify (events recorded after the Recorder's close) starts it again."""
        shipper = self._shipper
        if shipper is None:
            return
        limit = shipper.exit_timeout if timeout is None else min(timeout, shipper.exit_timeout)
        try:
            shipper.close(limit)
        except Exception as exc:
            log_once(f"ship-close:{type(exc).__name__}", "metatrail: stopping the shipper failed: %s", exc)

    def _resolve(self) -> None:
        from metatrail.config import client_settings

        with self._lock:
            if self._resolved:
                return
            self._resolved = True
            server, token, ca_bundle = client_settings()
            store = str(self._settings().store)
            if server and store.startswith(("sqlite:", "postgresql", "postgres:")):
                self._shipper = Shipper(store, server, token, ca_bundle=ca_bundle)

    def _at_exit(self) -> None:
        if self._shipper is not None:
            try:
                self._shipper.at_exit()
            except Exception as exc:
                log_once("ship-exit", "metatrail: shipping at exit failed: %s", exc)


__all__ = ["ESSENTIAL", "LazyShipper", "Shipper"]
