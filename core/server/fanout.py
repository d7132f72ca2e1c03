"""Fan-out: forward every event the server's log gains to another OpenLineage backend (Marquez, Kafka, files, …)
through ``openlineage-python``'s transports, configured the way that client is configured.

The store's event log is the queue. A worker thread reads it in log order from a cursor kept in the store
(``sync_cursors``, direction ``forward``, one per target) and emits each event; the cursor moves past an event once
the transport has taken it. So:

* **Ingest never waits for it.** The writer only wakes the worker after a commit; a slow, hanging or failing target
  holds the worker, never a request.
* **Nothing is dropped.** A target that is down, answers 5xx or 429, or hangs until the transport's timeout is
  tried again, with a growing pause (up to ``retry_max_s``), until it takes the event: events wait in the log, not
  in memory, so an outage of any length, and a restart of this server in the middle of one, loses none of them.
  Events a commit stored before a fault of ours stopped the writer from waking the worker are found by its next
  look (at least every ``poll_s``).
* **At least once.** An event the target took just before this server was killed is sent again after the restart
  (the cursor is saved after each page of events); OpenLineage backends keep the same event once or harmlessly twice.
* **Side by side, in order per run.** An HTTP target gets up to ``concurrency`` requests at once (a Marquez across a
  network answers in tens of milliseconds, so one request at a time would fall behind a busy server): each run's
  events go out one after another in log order (START before COMPLETE, as backends expect), different runs side by
  side. The cursor passes an event once it and every event before it in the log were taken. Other transports (files,
  Kafka, composites) take one event at a time, in log order. ``async_http`` queues an event in memory and reports
  success before the target took it (and drops it after its own retries), which would move the cursor past events
  the target never got: its settings are used for a synchronous HTTP transport instead, with its
  ``max_concurrent_requests`` bounding the requests at once.
* **A refused event does not stall the rest.** An HTTP answer that says the event itself is wrong (400, 413, 415,
  422) is counted in ``refused`` and logged, and the worker goes on; any other failure (401/403/404 included: a
  credential or address an operator can fix) is retried.

A target seen for the first time starts at the end of the log: what was stored before forwarding was configured is
not sent (``metatrail push`` moves history between metatrail servers). Counters are in ``GET /api/v1/admin/status``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("metatrail.server")

DIRECTION = "forward"  # the cursors' direction in sync_cursors
PAGE = 200  # events read from the log at a time
PAGE_BYTES = 8 * 1024 * 1024  # and at most this much of their bodies (at least one event)
# HTTP statuses that say the event itself cannot be taken: retrying it would stall every later event for good.
REFUSED_STATUSES = frozenset({400, 413, 415, 422})
# Transports whose emit may be called from several threads at once: requests' Session, with a connection pool per
# host (ten connections unless the config mounts its own adapter, hence the default concurrency of 8).
CONCURRENT_KINDS = frozenset({"http"})


@dataclass(frozen=True)
class LogEvent:
    """One event read from the log for forwarding."""

    seq: int
    id: str
    run_id: str | None
    body: Mapping[str, Any]


def target_key(transport: Any) -> str:
    """The name a target's cursor is kept under: the transport's kind and where it sends (a URL, a file, a topic),
    so that pointing forwarding elsewhere starts a new cursor. Credentials in a URL are left out: the key is stored
    and shown in the admin status, and a new password for the same target keeps its cursor."""
    kind = str(getattr(transport, "kind", None) or type(transport).__name__)
    config = getattr(transport, "config", None)
    where = getattr(transport, "url", None) or getattr(config, "url", None) or \
        getattr(config, "log_file_path", None) or getattr(config, "topic", None)
    if isinstance(where, str) and "@" in where and "://" in where:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(where)
        where = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return f"forward:{kind}" + (f":{where}" if where else "")


def synchronous_transport(transport: Any) -> tuple[Any, int | None]:
    """A transport whose emit returns once the target took the event (or raised), and the most requests it should
    have in flight (None: no bound of its own). ``async_http`` becomes the ``http`` transport with the same settings
    (see the module docstring); any other transport is returned as it is."""
    if getattr(transport, "kind", None) != "async_http":
        return transport, None
    from openlineage.client.transport.http import HttpConfig, HttpTransport

    config = transport.config
    synchronous = HttpTransport(HttpConfig(url=config.url, endpoint=config.endpoint, timeout=config.timeout,
                                           verify=config.verify, auth=config.auth, compression=config.compression,
                                           custom_headers=dict(config.custom_headers), retry=dict(config.retry)))
    transport.close(0)  # its worker thread holds nothing yet
    log.info("metatrail server: forwarding to %s through a synchronous HTTP transport with the async_http settings, "
             "so that an event leaves the log only once the target took it", config.url)
    return synchronous, int(config.max_concurrent_requests)


def lanes(page: Sequence[LogEvent]) -> list[list[int]]:
    """The page's events (by index) in lanes that may go out side by side: one per run, in log order within it; an
    event without a run is a lane of its own."""
    by_key: dict[str, list[int]] = {}
    for i, event in enumerate(page):
        by_key.setdefault(event.run_id or f"id:{event.id}", []).append(i)
    return list(by_key.values())


def refused_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed emit when it says the event itself is refused (see :data:`REFUSED_STATUSES`),
    looked for along the exception's causes too (a composite transport raises its own error from its part's)."""
    cause: BaseException | None = exc
    for _ in range(8):  # a chain is short; a cycle must not loop
        if cause is None:
            return None
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int) and status in REFUSED_STATUSES:
            return status
        cause = cause.__cause__
    return None


class Forwarder:
    """Forwards the events of the store at ``store_url`` (a migrated SQL store) to the transport resolved from
    ``config`` (``True`` = the client's own resolution: ``OPENLINEAGE_CONFIG``/``openlineage.yml``,
    ``OPENLINEAGE__TRANSPORT__*``, ``OPENLINEAGE_URL``), with up to ``concurrency`` events in flight where the
    transport allows it. See the module docstring."""

    def __init__(self, config: bool | dict[str, Any], *, store_url: str, poll_s: float = 2.0,
                 retry_min_s: float = 1.0, retry_max_s: float = 60.0, concurrency: int = 8) -> None:
        from openlineage.client import OpenLineageClient

        from metatrail.server.eventlog import ServerLog

        if concurrency < 1:
            raise ValueError(f"forwarding concurrency must be at least 1, got {concurrency}")
        client = OpenLineageClient(config=config if isinstance(config, dict) else None)
        self.transport, own_bound = synchronous_transport(client.transport)
        self.kind = getattr(self.transport, "kind", None)
        self.concurrency = min(concurrency, own_bound or concurrency) if self.kind in CONCURRENT_KINDS else 1
        if self.kind == "console":
            log.warning("metatrail server: forwarding is on but no OpenLineage transport is configured, so events "
                        "go to the console; set OPENLINEAGE_URL or OPENLINEAGE_CONFIG, or pass --forward-config")
        self.target = target_key(self.transport)  # async_http shares http's cursor: the same target
        self.poll_s, self.retry_min_s, self.retry_max_s = poll_s, retry_min_s, retry_max_s
        self._log = ServerLog(store_url)
        self.position = self._start_position()
        self.sent = 0  # events the target took
        self.failed = 0  # attempts that failed and will be tried again
        self.refused = 0  # events the target refused as such (REFUSED_STATUSES), passed over
        self.last_error: str | None = None
        self._errors_seen: set[str] = set()
        self._counts = threading.Lock()  # lanes count side by side
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start()

    def _start_position(self) -> int:
        """The target's saved cursor; for a new target, the end of the log, saved at once (events stored after this
        must be forwarded even if the server stops before forwarding one). A cursor past the end of the log (a store
        restored from an older backup hands out those positions again) is brought back to the end."""
        end = self._log.last_seq()
        saved = next((int(c["position"]) for c in self._log.cursors()
                      if c["peer"] == self.target and c["direction"] == DIRECTION and c["scope"] == ""), None)
        if saved is not None:
            if saved <= end:
                return saved
            log.warning("metatrail server: the forward cursor of %s (%d) is past the end of the log (%d): the store "
                        "was restored from an older copy; forwarding goes on from its end", self.target, saved, end)
        self._log.set_cursor(self.target, DIRECTION, "", end, force=True)
        return end

    def start(self) -> None:
        """Start the worker (again, after :meth:`close`)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="metatrail-forwarder", daemon=True)
            self._thread.start()

    def notify(self, _events: object = None, _site: object = None) -> None:
        """Wake the worker: the log has new events (the writer's ``on_inserted`` hook; never blocks)."""
        self._wake.set()

    def _run(self) -> None:
        pause = self.retry_min_s
        while not self._stop.is_set():
            self._wake.clear()  # before the look: a commit after it wakes the wait below
            try:
                page = self._log_events()
            except Exception as exc:  # the store, for the moment (locked, restarting): look again later
                self._note_failure("reading the log", exc)
                self._stop.wait(pause)
                pause = min(pause * 2, self.retry_max_s)
                continue
            pause = self.retry_min_s
            if not page:
                self._wake.wait(self.poll_s)
                continue
            self._forward_page(page)
            self._save_position()

    def _forward_page(self, page: list[LogEvent]) -> None:
        """Deliver a page (see the module docstring) and move the position past every event taken with all those
        before it; when stopped part way, the rest is sent after the next start."""
        if self.concurrency == 1:
            for event in page:
                if not self._deliver(event):
                    return  # stopping
                self.position = event.seq
            return
        taken = [False] * len(page)
        todo = list(reversed(lanes(page)))

        def run_lanes() -> None:
            while True:
                try:
                    lane = todo.pop()  # atomic: lane workers share the list
                except IndexError:
                    return
                for i in lane:
                    if not self._deliver(page[i]):
                        return
                    taken[i] = True

        # Daemon threads, as the worker is: a target that hangs must not hold up the server's exit (a thread
        # pool's workers are joined at exit).
        workers = [threading.Thread(target=run_lanes, name="metatrail-forward-lane", daemon=True)
                   for _ in range(min(self.concurrency, len(todo)))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        for event, done in zip(page, taken, strict=True):
            if not done:
                break
            self.position = event.seq

    def _log_events(self) -> list[LogEvent]:
        """The next page of the log."""
        from metatrail.sync import Filter

        rows, _ = self._log.events_after_bounded(self.position, Filter(), PAGE, PAGE_BYTES)
        page = []
        for seq, shipped in rows:
            body = orjson.loads(shipped.text)
            run = body.get("run") if isinstance(body, dict) else None
            run_id = run.get("runId") if isinstance(run, dict) else None
            page.append(LogEvent(seq=seq, id=shipped.id, run_id=run_id if isinstance(run_id, str) else None,
                                 body=body))
        return page

    def _deliver(self, event: LogEvent) -> bool:
        """Emit one stored event until the target takes or refuses it; False when stopped first."""
        pause = self.retry_min_s
        while not self._stop.is_set():
            try:
                self.transport.emit(dict(event.body))  # transports serialise dicts too
                with self._counts:
                    self.sent += 1
                return True
            except Exception as exc:
                status = refused_status(exc)
                if status is not None:
                    with self._counts:
                        self.refused += 1
                    self.last_error = f"HTTP {status} for event {event.id}: {exc}"[:500]
                    if self._first(f"refused:{status}"):  # once per status: a target may refuse many
                        log.warning("metatrail server: %s refused an event as such (HTTP %d), passed over; later "
                                    "refusals are counted in the admin status: %s", self.kind, status, exc)
                    return True
                with self._counts:
                    self.failed += 1
                self._note_failure(f"forwarding to {self.kind}", exc)
            self._stop.wait(pause)
            pause = min(pause * 2, self.retry_max_s)
        return False

    def _note_failure(self, what: str, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        kind = f"{what}:{type(exc).__name__}"
        if self._first(kind):
            log.warning("metatrail server: %s failed (%s: %s); ingest is unaffected, the events wait in the store "
                        "and are tried again", what, type(exc).__name__, exc)

    def _first(self, kind: str) -> bool:
        """Whether this kind of error is seen for the first time (lanes report side by side)."""
        with self._counts:
            first = kind not in self._errors_seen
            self._errors_seen.add(kind)
        return first

    def _save_position(self) -> None:
        try:
            self._log.set_cursor(self.target, DIRECTION, "", self.position)
        except Exception as exc:  # the next page saves it; at worst a restart sends a page again
            self._note_failure("saving the forward cursor", exc)

    def stats(self) -> dict[str, Any]:
        """Counters for the admin status route (reads the store: call it off the event loop)."""
        try:
            pending: int | None = self._log.count_after(self.position)
        except Exception:
            pending = None
        return {"transport": self.kind, "target": self.target, "concurrency": self.concurrency, "sent": self.sent,
                "failed": self.failed, "refused": self.refused, "position": self.position, "pending": pending,
                "last_error": self.last_error}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (an emit in progress gets up to ``timeout``), save the cursor, close the transport. What
        is not forwarded yet stays in the log for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._save_position()
        try:
            self.transport.close(timeout)
        except Exception as exc:
            log.warning("metatrail server: closing the forward transport failed: %s", exc)
        self._log.close()
