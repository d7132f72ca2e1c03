"""Everything that differs between SQLite and PostgreSQL, in one place.

* SQLite: WAL journal, ``synchronous=NORMAL`` (durable across process crashes; an OS crash may lose the last
  commits, never corrupt), a long ``busy_timeout`` and ``BEGIN IMMEDIATE`` so concurrent writers queue instead of
  failing on lock upgrade; "database is locked" is retried, never surfaced. Reads go through :func:`reading`, whose
  transactions begin deferred: in WAL mode a reader then neither waits for a writer nor makes one wait.
* PostgreSQL: per-run advisory locks serialise projection updates of the same run across writers.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import QueuePool

from metatrail.errors import ConfigError, MissingExtraError
from metatrail.store import sqlitefile
from metatrail.store.ingest import is_transient
from metatrail.store.sqlitefile import BUSY_TIMEOUT_MS as BUSY_TIMEOUT_MS
from metatrail.store.sqlitefile import WAL_AUTOCHECKPOINT as WAL_AUTOCHECKPOINT

T = TypeVar("T")
PG_CONNECT_TIMEOUT_S = 10  # see make_engine; libpq's connect_timeout in the store URL overrides it


def make_engine(url: str, *, wal_autocheckpoint: int = WAL_AUTOCHECKPOINT) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql://…`` with the settings above. ``wal_autocheckpoint``
    (SQLite, in pages): the WAL size at which a commit also checkpoints; a process that checkpoints in the
    background (:func:`checkpoint`) raises it to a safety net."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        file_path = path if str(path) not in ("", ":memory:") else None
        if file_path is not None:
            sqlitefile.check_file(path)
            sqlitefile.make_parent(path)
        # A small pool of long-lived connections: opening one per transaction costs the PRAGMAs, and closing the
        # last one checkpoints the WAL with an fsync (~30 ms a write). After fork the child must not use the
        # parent's connections, so it drops them (without closing them under the parent's feet).
        # Last in, first out: the connection that made the last commit still has its pages cached, while any other
        # finds the database changed and drops its whole page cache. Handed out in turn, as a FIFO pool does, a
        # server's one-event ingests re-read some 23 pages each; LIFO, under 2.
        # No rollback at every return to the pool (SQLAlchemy's default reset): the driver is in autocommit mode
        # (we issue BEGIN), every user here ends its own transaction, and the rollback call cost a one-event ingest
        # about a tenth of its time. A connection that comes back inside a transaction all the same is rolled back
        # (``_rollback_if_open``), so none goes out again holding the write lock.
        engine = create_engine(f"sqlite:///{path}", poolclass=QueuePool, pool_size=2, max_overflow=6,
                               pool_use_lifo=True, pool_timeout=BUSY_TIMEOUT_MS / 1000, pool_reset_on_return=None)
        event.listen(engine, "checkin", _rollback_if_open)
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(engine)

            def _drop_after_fork() -> None:
                alive = ref()
                if alive is not None:
                    alive.dispose(close=False)

            os.register_at_fork(after_in_child=_drop_after_fork)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            sqlitefile.configure(dbapi_conn, wal_autocheckpoint, path=file_path)

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # A transaction that may write takes the write lock up front (see module docstring); one of reading()'s
            # only reads its snapshot.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise MissingExtraError("psycopg", "postgresql") from None
        dsn = "postgresql+psycopg://" + url.split("://", 1)[1]
        # Without a connect timeout, a server that accepts the TCP connection and never answers (hung, or half
        # open behind a firewall) holds every command and a recording process's exit for ever. libpq's own
        # ``connect_timeout`` in the URL (``?connect_timeout=5``) takes precedence over ours.
        connect_args = {} if "connect_timeout=" in url else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return create_engine(dsn, pool_pre_ping=True, pool_size=4, max_overflow=8, connect_args=connect_args)
    raise ConfigError(f"not an SQL store URL: {url!r}")


READ_ONLY = "metatrail_read_only"  # the execution option reading() sets


def _rollback_if_open(dbapi_conn: Any, _record: Any) -> None:
    """Pool ``checkin`` hook of SQLite engines: end a transaction its user left open (see :func:`make_engine`)."""
    if dbapi_conn is not None and dbapi_conn.in_transaction:
        dbapi_conn.rollback()


def reading(engine: Engine) -> Connection:
    """A connection for reads only (``with dialect.reading(engine) as conn: ...``). On SQLite its transactions begin
    deferred rather than with the write lock every other transaction takes first: under ``BEGIN IMMEDIATE`` a query
    waited for the writer's transaction in progress and held back the next one while it ran. Writing through it is
    a bug (SQLite would refuse a lock upgrade that finds a newer commit)."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# -- the ingest hot path, at the driver level ---------------------------------------------------------------------
# Ingest runs a handful of statements per transaction; through SQLAlchemy Core each cost 50-100 us of Python
# (expression building, cache keys, expanding IN parameters), more than SQLite itself spends on a one-event commit.
# These helpers take the transaction's DBAPI cursor and the dialect name and send the SQL text as it is.


@contextlib.contextmanager
def raw_transaction(engine: Engine, *, journals_in_memory: bool = False) -> Iterator[Any]:
    """One transaction on a pooled connection, as a DBAPI cursor: ``BEGIN IMMEDIATE`` on SQLite (the writer lock up
    front, as the engine's ``begin`` hook takes it), committed on success, rolled back on error. A third of the cost
    of ``engine.begin()`` for a one-event ingest. ``journals_in_memory`` (an ingest, SQLite): its statement journals
    in memory, for this transaction only (:data:`metatrail.store.sqlitefile.JOURNALS_IN_MEMORY`)."""
    raw = engine.raw_connection()
    sqlite = engine.dialect.name == "sqlite"
    in_memory = journals_in_memory and sqlite
    try:
        cur = raw.cursor()
        try:
            if in_memory:
                cur.execute(sqlitefile.JOURNALS_IN_MEMORY)  # outside a transaction: SQLite refuses it inside
            if sqlite:
                cur.execute("BEGIN IMMEDIATE")
            yield cur
            raw.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                raw.rollback()
            raise
        finally:
            if in_memory:
                with contextlib.suppress(Exception):
                    cur.execute(sqlitefile.TEMPORARY_FILES_ON_DISK)
            with contextlib.suppress(Exception):
                cur.close()
    finally:
        raw.close()


def lock_schema(conn: Connection) -> None:
    """Serialise schema migrations across processes."""
    if conn.dialect.name != "sqlite":
        conn.execute(text("SELECT pg_advisory_xact_lock(7302915)"))


def checkpoint(engine: Engine) -> tuple[int, int] | None:
    """Copy what the SQLite WAL holds into the database file without blocking readers or writers (a ``PASSIVE``
    checkpoint, on a pooled connection); return (pages in the WAL, pages copied), None for other databases. Commits
    are as durable before as after: this only lets the WAL start over, so that it stays small."""
    if engine.dialect.name != "sqlite":
        return None
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        try:
            _busy, wal_pages, copied = cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            cur.close()
    finally:
        raw.close()
    return int(wal_pages), int(copied)


def is_driver_error(exc: BaseException) -> bool:
    """An error of the database (through SQLAlchemy, or raised by the driver itself on the hot path above)."""
    return isinstance(exc, (DBAPIError, sqlite3.Error)) or type(exc).__module__.startswith("psycopg")


def is_operational(exc: BaseException) -> bool:
    """An error of the database's operation (locked, disk, connection), as opposed to a bug in a statement."""
    if isinstance(exc, (OperationalError, sqlite3.OperationalError)):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError)


def retrying(fn: Callable[[], T], *, attempts: int = 20) -> T:
    """Run ``fn`` (one whole transaction), retrying transient lock/serialisation errors with jittered backoff."""
    delay = 0.01
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_driver_error(exc) or not is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


