"""The Recorder's writer on the embedded SQLite store: the store's ingest over the standard library's ``sqlite3``.

The Recorder stores events from inside the user's workflow process (its writer thread) and from its writer process.
Both only append: they need :meth:`ingest` and :meth:`close` of the store, not its queries. Opening the store through
SQLAlchemy cost each such process the import of SQLAlchemy, about a sixth of a second of CPU on a fast machine and
half a second on a slow one, taken from the workflow on a two-core node, and delayed the first durable event by as
much. :class:`SqliteWriter` runs the same ingest transaction (:mod:`metatrail.store.ingest`) on a plain ``sqlite3``
connection with the same settings (:mod:`metatrail.store.sqlitefile`), so the rows are the same rows.

A new store file is created here with the current schema (the statements below, which a test holds to the migrations
of :mod:`metatrail.store.schema`). A store of any other schema version, older (to migrate) or newer (to refuse), is
left to :class:`~metatrail.store.sql.SqlStore`, which :func:`open_writer` then returns.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from metatrail.errors import CorruptStoreError, EventError, StoreBusy, StoreError
from metatrail.store import ingest, sqlitefile
from metatrail.store.base import IngestResult

T = TypeVar("T")
SCHEMA_VERSION = 4

# The schema of version SCHEMA_VERSION as SQLAlchemy's migrations create it on SQLite (metatrail.store.schema).
SCHEMA: tuple[str, ...] = (
    "CREATE TABLE events (\n\tseq INTEGER NOT NULL, \n\tid VARCHAR(64) NOT NULL, \n\trun_id VARCHAR(64), \n\t"
    "event_type VARCHAR(16), \n\tevent_time FLOAT, \n\tjob_namespace TEXT, \n\tjob_name TEXT, \n\tsite TEXT, \n\t"
    "ingested_at FLOAT NOT NULL, \n\tbody TEXT NOT NULL, \n\tPRIMARY KEY (seq), \n\tUNIQUE (id)\n)",
    "CREATE INDEX ix_events_run ON events (run_id)",
    "CREATE INDEX ix_events_time ON events (event_time)",
    "CREATE TABLE runs (\n\trun_id VARCHAR(64) NOT NULL, \n\tnamespace TEXT NOT NULL, \n\tjob_name TEXT NOT NULL, \n\t"
    "pipeline TEXT NOT NULL, \n\tstage TEXT, \n\tkind VARCHAR(16) NOT NULL, \n\tparent_run_id VARCHAR(64), \n\t"
    "state VARCHAR(16) NOT NULL, \n\tstarted_at FLOAT, \n\tended_at FLOAT, \n\tintegration TEXT, \n\tsite TEXT, \n\t"
    "error TEXT, \n\tevent_count INTEGER NOT NULL, \n\tfacets TEXT NOT NULL, \n\tmixed INTEGER DEFAULT '1' NOT NULL, "
    "\n\tPRIMARY KEY (run_id)\n)",
    "CREATE INDEX ix_runs_pipeline ON runs (pipeline, started_at)",
    "CREATE INDEX ix_runs_parent ON runs (parent_run_id)",
    "CREATE TABLE io_edges (\n\trun_id VARCHAR(64) NOT NULL, \n\tdirection VARCHAR(8) NOT NULL, \n\t"
    "namespace TEXT NOT NULL, \n\tname TEXT NOT NULL, \n\tversion TEXT, \n\tartifact_key TEXT NOT NULL, \n\t"
    "hash TEXT, \n\talgorithm VARCHAR(16), \n\tsize BIGINT, \n\thash_error TEXT, \n\t"
    "PRIMARY KEY (run_id, direction, namespace, name)\n)",
    "CREATE INDEX ix_edges_key ON io_edges (artifact_key, direction)",
    "CREATE INDEX ix_edges_dataset ON io_edges (namespace, name)",
    "CREATE TABLE tokens (\n\tid VARCHAR(32) NOT NULL, \n\tname TEXT NOT NULL, \n\tsecret_sha256 VARCHAR(64) NOT NULL, "
    "\n\tscopes TEXT NOT NULL, \n\tsite TEXT NOT NULL, \n\tpipelines TEXT, \n\tcreated_at FLOAT NOT NULL, \n\t"
    "revoked_at FLOAT, \n\tPRIMARY KEY (id)\n)",
    "CREATE TABLE peers (\n\tname VARCHAR(64) NOT NULL, \n\turl TEXT NOT NULL, \n\ttoken TEXT, \n\t"
    "pull INTEGER NOT NULL, \n\tpush INTEGER NOT NULL, \n\tshare TEXT, \n\tinterval_s FLOAT, \n\t"
    "created_at FLOAT NOT NULL, \n\tlast_sync_at FLOAT, \n\tlast_error TEXT, \n\tPRIMARY KEY (name)\n)",
    "CREATE TABLE sync_cursors (\n\tpeer TEXT NOT NULL, \n\tdirection VARCHAR(8) NOT NULL, \n\tscope TEXT NOT NULL, "
    "\n\tposition BIGINT NOT NULL, \n\tupdated_at FLOAT NOT NULL, \n\tanchor_seq BIGINT, \n\tanchor_id VARCHAR(64), "
    "\n\tPRIMARY KEY (peer, direction, scope)\n)",
)
_VERSION_TABLE = ("CREATE TABLE metatrail_schema (\n\tversion INTEGER NOT NULL, \n\tapplied_at FLOAT NOT NULL, \n\t"
                  "PRIMARY KEY (version)\n)")

# Connections a forked child inherited: kept open, never used and never closed there. Closing one in the child could
# let SQLite, taking the child for the file's last user, act on the parent's WAL; a leaked descriptor costs nothing.
_inherited: list[sqlite3.Connection] = []


class SqliteWriter:
    """The append side of an embedded store (``ingest`` and ``close``, with the contract of
    :class:`~metatrail.store.base.EventStore`), on one ``sqlite3`` connection. Thread-safe; after ``fork`` the child
    must open its own (the Recorder does)."""

    def __init__(self, url: str, path: Path, conn: sqlite3.Connection) -> None:
        self.url = url
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._busy_timeout_ms = sqlitefile.BUSY_TIMEOUT_MS  # the connection's, as configure set it
        # Whether ``ingest`` may be asked not to wait (what metatrail.server.writer.IngestWriter asks before it
        # writes on a thread that must not block): only with a write-ahead log, where BEGIN IMMEDIATE is the one
        # step that can find the lock held. With a rollback journal (a network filesystem) the commit needs every
        # reader gone too, and would fail after all the work.
        self.can_refuse_to_wait = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def _leave_to_parent() -> None:
                alive = ref()
                if alive is not None and alive._conn is not None:
                    _inherited.append(alive._conn)
                    alive._conn = None

            os.register_at_fork(after_in_child=_leave_to_parent)

    @classmethod
    def open(cls, url: str, *, wal_autocheckpoint: int = sqlitefile.WAL_AUTOCHECKPOINT,
             cache_kib: int | None = None) -> SqliteWriter | None:
        """A writer on the SQLite file of ``url``, creating the store if the file is new; None when the store has
        another schema version (SQLAlchemy's migrations handle it) or the URL names no file. ``wal_autocheckpoint``:
        as :func:`metatrail.store.sqlitefile.configure`; ``cache_kib``: the connection's page cache (SQLite's
        default, 2 MiB, when None)."""
        if not url.startswith("sqlite:///"):
            return None
        path = Path(url[len("sqlite:///") :])
        if str(path) in ("", ":memory:") or "?" in str(path):
            return None
        sqlitefile.check_file(path)
        sqlitefile.make_parent(path)
        try:
            conn = sqlite3.connect(str(path), timeout=sqlitefile.BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from None
        try:
            sqlitefile.configure(conn, wal_autocheckpoint, path=path)
            conn.execute(sqlitefile.JOURNALS_IN_MEMORY)  # this connection only ingests
            if cache_kib is not None:
                conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
            current = _retrying(lambda: _schema(conn, path))
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                if "file is not a database" in str(exc) or "malformed" in str(exc):
                    raise CorruptStoreError(f"store {url} is damaged ({exc}); nothing was changed") from None
                raise StoreError(f"cannot open store {url}: {exc}") from None
            raise
        if not current:
            conn.close()
            return None
        return cls(url, path, conn)

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None,
               allowed_pipelines: frozenset[str] | None = None, wait: bool = True) -> IngestResult:
        """Store ``events`` and their runs' projections in one transaction (see ``EventStore.ingest``; with
        ``allowed_pipelines`` as :meth:`metatrail.store.sql.SqlStore.ingest`: nothing is stored,
        :class:`~metatrail.errors.ForeignRunError`, when a run of the events is stored under another pipeline).

        ``wait=False``: when another connection holds the write lock, raise :class:`~metatrail.errors.StoreBusy` at
        once (nothing written) instead of waiting for it (up to SQLite's busy timeout, a minute, and retries): for a
        caller that must not block, such as a server's event loop."""
        prepared = ingest.prepare_batch(events, site, sites)
        if not prepared:
            return IngestResult(received=len(events), inserted=0)

        def run() -> IngestResult:
            with self._lock:
                conn = self._conn
                if conn is None:
                    raise StoreError(f"store {self.url} is closed")
                # The busy timeout is the connection's: set only when the mode changes, so a stream of writes of
                # one kind (single events that must not wait, or batches that may) costs no statement for it.
                timeout_ms = sqlitefile.BUSY_TIMEOUT_MS if wait else 0
                if self._busy_timeout_ms != timeout_ms:
                    conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                    self._busy_timeout_ms = timeout_ms
                with _write_transaction(conn) as cur:
                    return ingest.ingest_prepared(cur, "sqlite", prepared, len(events),
                                                  allowed_pipelines=allowed_pipelines)

        try:
            if not wait:
                try:
                    return run()  # once: in WAL mode only BEGIN IMMEDIATE can find the lock held
                except sqlite3.OperationalError as exc:
                    if ingest.is_transient(exc):
                        raise StoreBusy(f"store {self.url} is being written by another connection") from None
                    raise
            return _retrying(run)
        except StoreBusy:
            raise
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot write store {self.url}: {exc}") from None
        except Exception as exc:
            if ingest.is_data_error(exc):
                raise EventError(f"the store cannot hold a value of these events: {str(exc)[:200]}") from None
            raise

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (and in a forked child, which leaves the connection to its parent)."""
        return self._conn is None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def open_writer(url: str) -> Any:
    """What a writer that only appends to the store at ``url`` should use: a :class:`SqliteWriter` for an embedded
    store of the current schema (or a new file), else the store itself (:func:`metatrail.store.open_store`)."""
    writer = SqliteWriter.open(url)
    if writer is not None:
        return writer
    from metatrail.store import open_store

    return open_store(url)


def _schema(conn: sqlite3.Connection, path: Path) -> bool:
    """True when the store's schema is the one this module writes, creating it in a new store; False for another
    version. Creation takes the write lock and looks again, as the migrations do, so concurrent first writers (and a
    concurrent SqlStore) create one schema."""
    version = _version(conn)
    if version is not None:
        return version == SCHEMA_VERSION
    with _write_transaction(conn) as cur:
        version = _version(conn)
        if version is None:
            names = [r[0] for r in cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if names:
                raise CorruptStoreError(f"{path} holds tables ({', '.join(sorted(names)[:5])}) but is not a "
                                        "metatrail store; nothing was changed")
            cur.execute(_VERSION_TABLE)
            for statement in SCHEMA:
                cur.execute(statement)
            now = time.time()
            cur.executemany("INSERT INTO metatrail_schema (version, applied_at) VALUES (?, ?)",
                            [(v, now) for v in range(1, SCHEMA_VERSION + 1)])
            version = SCHEMA_VERSION
    return version == SCHEMA_VERSION


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """A transaction that holds the write lock from its start (``BEGIN IMMEDIATE``, as the SQL store's engines
    begin theirs), committed on success and rolled back on any error."""
    cur = conn.cursor()
    try:
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
    finally:
        cur.close()


def _version(conn: sqlite3.Connection) -> int | None:
    """The store's schema version; None when it has no version table (a new file)."""
    try:
        row = conn.execute("SELECT max(version) FROM metatrail_schema").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return int(row[0] or 0)


def _retrying(fn: Callable[[], T], *, attempts: int = 20) -> T:
    """Run ``fn`` (one whole transaction), retrying what SQLite's busy timeout did not absorb (see
    :func:`metatrail.store.dialect.retrying`)."""
    delay = 0.01
    for attempt in range(attempts):
        try:
            return fn()
        except sqlite3.Error as exc:
            if not ingest.is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")
