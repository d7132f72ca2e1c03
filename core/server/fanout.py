"""Fan-out: forward every newly ingested event to another OpenLineage backend (Marquez, Kafka, files, …) through
``openlineage-python``'s transports, configured the way that client is configured.

Ingest never waits for it: committed events are put on a bounded queue and a worker thread emits them. A full queue
drops the newest events (counted in ``dropped``); a transport failure is counted in ``failed`` and logged once per
kind. Either way the events are safe in the store, so nothing is lost for the server, only for the forward target.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("metatrail.server")


class Forwarder:
    """Forwards events to the transport resolved from ``config`` (``True`` = the client's own resolution:
    ``OPENLINEAGE_CONFIG``/``openlineage.yml``, ``OPENLINEAGE__TRANSPORT__*``, ``OPENLINEAGE_URL``)."""

    def __init__(self, config: bool | dict[str, Any], *, max_queue: int = 10_000) -> None:
        from openlineage.client import OpenLineageClient

        client = OpenLineageClient(config=config if isinstance(config, dict) else None)
        self.transport = client.transport
        self.kind = getattr(self.transport, "kind", None)
        if self.kind == "console":
            log.warning("metatrail server: forwarding is on but no OpenLineage transport is configured, so events "
                        "go to the console; set OPENLINEAGE_URL or OPENLINEAGE_CONFIG, or pass --forward-config")
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._errors_seen: set[str] = set()
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Start the worker (again, after :meth:`close`)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="metatrail-forwarder", daemon=True)
            self._thread.start()

    def enqueue(self, events: list[Mapping[str, Any]], _site: str | None = None) -> None:
        """Queue events for forwarding; never blocks (drops and counts when full)."""
        for event in events:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self.transport.emit(dict(event))  # type: ignore[arg-type]  # transports serialise dicts too
                self.sent += 1
            except Exception as exc:
                self.failed += 1
                kind = type(exc).__name__
                if kind not in self._errors_seen:
                    self._errors_seen.add(kind)
                    log.warning("metatrail server: forwarding to %s failed (%s: %s); ingest is unaffected",
                                self.kind, kind, exc)
            finally:
                self._queue.task_done()

    def stats(self) -> dict[str, Any]:
        """Counters for the admin status route."""
        return {"transport": self.kind, "sent": self.sent, "failed": self.failed, "dropped": self.dropped,
                "queued": self._queue.qsize()}

    def close(self, timeout: float = 5.0) -> None:
        """Forward what is queued (up to ``timeout``), then stop the worker and close the transport."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.transport.close(timeout)
        except Exception as exc:
            log.warning("metatrail server: closing the forward transport failed: %s", exc)
