"""Server settings: one frozen dataclass, built by ``metatrail server`` from its arguments (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024
AUTH_CACHE_TTL = 5.0  # seconds a server remembers a token it checked (a revoke through another process waits it out)


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs to know; defaults are safe for a public deployment.

    ``forward`` turns on fan-out to another OpenLineage backend: ``True`` resolves the transport the way
    ``openlineage-python`` does (``OPENLINEAGE_CONFIG``/``openlineage.yml``, ``OPENLINEAGE__TRANSPORT__*``,
    ``OPENLINEAGE_URL``); a dict is an explicit client config (``{"transport": {"type": "file", …}}``).
    """

    store: str
    site: str = "server"
    max_event_bytes: int = 5 * MiB
    max_batch_bytes: int = 64 * MiB
    max_batch_events: int = 10_000
    max_ids: int = 10_000
    max_fetch_bytes: int = 32 * MiB  # event bodies per answer of /sync/fetch and /api/v1/events (at least one event)
    max_depth: int = 64
    auth_cache_ttl: float = AUTH_CACHE_TTL
    max_pending_events: int = 200_000
    writer_batch: int = 5_000
    inline_events: int = 1  # SQLite: a job this small is written on the event loop when the writer is idle
    # Seconds a request waits while the writer commits nothing (a store that takes no writes) before it answers 503
    # (its events stay queued and are stored: the client's retry finds them). Below metatrail clients' read timeout
    # (30 s at least), so they get an answer.
    write_wait_s: float = 25.0
    forward: bool | dict[str, Any] | None = None
    # Fan-out (metatrail.server.fanout): the longest pause between tries of a target that fails, how often the
    # forwarder looks at the log when no commit woke it, and the most events in flight to an HTTP target at once.
    forward_retry_max_s: float = 60.0
    forward_poll_s: float = 2.0
    forward_concurrency: int = 8
    schedule_tick: float = 5.0
    peer_timeout: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)
