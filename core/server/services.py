"""What the routes share, opened once per application: the store, its event log, tokens, peers, the writer, the
optional forwarder and the federation scheduler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from metatrail.errors import ConfigError
from metatrail.server.auth import TokenStore
from metatrail.server.config import ServerConfig
from metatrail.server.eventlog import ServerLog
from metatrail.server.federation import PeerStore, Scheduler
from metatrail.server.writer import IngestWriter
from metatrail.store.base import EventStore

log = logging.getLogger("metatrail.server")
WRITER_CACHE_KIB = 64 * 1024  # the SQLite writer's page cache (see _open_write_store)


@dataclass
class Services:
    """The server's long-lived parts (see module docstring)."""

    config: ServerConfig
    store: EventStore
    log: ServerLog
    tokens: TokenStore
    peers: PeerStore
    writer: IngestWriter
    forwarder: Any = None
    scheduler: Scheduler | None = None
    write_store: Any = None  # what the writer ingests through, when not ``store`` itself (closed with it)

    @classmethod
    def open(cls, config: ServerConfig) -> Services:
        """Open the store (running its migrations) and everything built on it."""
        from metatrail.store.dialect import WAL_AUTOCHECKPOINT
        from metatrail.store.sql import SqlStore

        if not config.store.startswith(("sqlite:", "postgresql", "postgres:")):
            raise ConfigError(f"a server keeps its own SQL store (sqlite:/// or postgresql://), not {config.store!r}")
        sqlite = config.store.startswith("sqlite:")
        # SQLite: the writer checkpoints the WAL in the background; a commit's own checkpoint is only a safety net
        # for a WAL that the background checkpoints cannot restart (a reader holding an old snapshot).
        store = SqlStore(config.store, wal_autocheckpoint=WAL_AUTOCHECKPOINT * 4 if sqlite else WAL_AUTOCHECKPOINT)
        write_store = _open_write_store(config) if sqlite else None
        forwarder = None
        if config.forward:
            from metatrail.server.fanout import Forwarder

            forwarder = Forwarder(config.forward, store_url=config.store, poll_s=config.forward_poll_s,
                                  retry_max_s=config.forward_retry_max_s, concurrency=config.forward_concurrency)
        writer = IngestWriter(write_store or store, max_pending=config.max_pending_events,
                              max_batch=config.writer_batch,
                              on_inserted=forwarder.notify if forwarder is not None else None,
                              inline_max=config.inline_events if sqlite else 0,
                              checkpoint=store.checkpoint if sqlite else None)
        return cls(config=config, store=store, log=ServerLog(store.url),
                   tokens=TokenStore(store.url, ttl=config.auth_cache_ttl, migrate=False),
                   peers=PeerStore(store.url, migrate=False),
                   writer=writer, forwarder=forwarder, write_store=write_store)

    def start_background(self) -> None:
        """Start the federation schedule (the writer starts itself on first use)."""
        if self.write_store is not None and self.write_store.closed:  # a lifespan run again after close()
            self.write_store = _open_write_store(self.config)
            self.writer.store = self.write_store or self.store
        self.writer.open()
        if self.forwarder is not None:
            self.forwarder.start()
        if self.scheduler is None:
            self.scheduler = Scheduler(self, tick=self.config.schedule_tick)
            self.scheduler.start()

    def close(self) -> None:
        """Stop background work (writing what is queued) and release every connection."""
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        self.writer.close()
        if self.forwarder is not None:
            self.forwarder.close()
        for part in (self.log, self.tokens, self.peers, self.write_store, self.store):
            if part is None:
                continue
            try:
                part.close()
            except Exception as exc:
                log.warning("metatrail server: closing %s failed: %s", type(part).__name__, exc)


def _open_write_store(config: ServerConfig) -> Any:
    """The writer's own ``sqlite3`` connection to a SQLite store (the same ingest, the same rows; the writer writes
    one job at a time), or None when the store cannot be written so (the SQL store writes then). A pooled
    connection's checkout, and the rollback the pool runs when it takes one back, cost a one-event POST a sixth of
    its time in the application."""
    from metatrail.store.dialect import WAL_AUTOCHECKPOINT
    from metatrail.store.sqlite_writer import SqliteWriter

    # A page cache of 64 MiB rather than SQLite's 2 MiB: a batch of a few thousand events dirties more pages than
    # 2 MiB holds (every index of events, runs and edges; an event id lands on a random page of its index), and a
    # full cache writes dirty pages to the log before the commit, some of them again at the commit. Measured on a
    # push of 100,000 events: a seventh fewer bytes written, the writer's CPU time down a tenth.
    return SqliteWriter.open(config.store, wal_autocheckpoint=WAL_AUTOCHECKPOINT * 4,  # as the store's, above
                             cache_kib=WRITER_CACHE_KIB)
