"""Everything that differs between SQLite and PostgreSQL, in one place.

* SQLite: WAL journal, ``synchronous=NORMAL`` (durable across process crashes; an OS crash may lose the last
  commits, never corrupt), a long ``busy_timeout`` and ``BEGIN IMMEDIATE`` so concurrent writers queue instead of
  failing on lock upgrade; "database is locked" is retried, never surfaced. Reads go through :func:`reading`, whose
  transactions begin deferred: in WAL mode a reader then neither waits for a writer nor makes one wait.
* PostgreSQL: per-run advisory locks serialise projection updates of the same run across writers.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import random
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import QueuePool

from metatrail.errors import ConfigError, CorruptStoreError, MissingExtraError, StoreError

T = TypeVar("T")
BUSY_TIMEOUT_MS = 60_000
PG_CONNECT_TIMEOUT_S = 10  # see make_engine; libpq's connect_timeout in the store URL overrides it


# Checkpoint the WAL every ~40 MB rather than every 4 MB: a burst of large events then pays for fewer checkpoints
# (each an fsync of the database file).
WAL_AUTOCHECKPOINT = 10_000


def make_engine(url: str, *, wal_autocheckpoint: int = WAL_AUTOCHECKPOINT) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql://…`` with the settings above. ``wal_autocheckpoint``
    (SQLite, in pages): the WAL size at which a commit also checkpoints; a process that checkpoints in the
    background (:func:`checkpoint`) raises it to a safety net."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if str(path) not in ("", ":memory:"):
            _check_sqlite_file(path)
            _make_parent(path)
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
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

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


def _make_parent(path: Path) -> None:
    """Create the store file's directory; a path that cannot be one (a regular file on the way, no permission) is a
    :class:`StoreError` that names it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((d for d in (path.parent, *path.parent.parents) if d.exists() and not d.is_dir()), None)
        why = f"{blocker} is not a directory" if blocker is not None else exc.strerror or str(exc)
        raise StoreError(f"cannot create the directory of store file {path}: {why} "
                         f"(point METATRAIL_STORE elsewhere)") from None


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


def _check_sqlite_file(path: Path) -> None:
    """Refuse, without touching it, a file that is not an SQLite database.

    The file is looked at only through SQLite, never opened by this process in any other way: POSIX locks belong to
    the process, and closing *any* descriptor of the file drops every lock the process holds on it. A server opens
    an engine per part (store, tokens, peers, sync log) while earlier ones hold connections; a plain ``open()`` and
    ``close()`` here dropped their locks, and the next process to close its connection took itself for the last
    user and deleted the WAL under them (acknowledged events were lost). SQLite keeps such descriptors open until
    its last connection to the file ends.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    # Look before the first write: switching to WAL would already change a foreign database's header.
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if "file is not a database" in str(exc):
            raise CorruptStoreError(f"store file {path} is not an SQLite database (corrupt or another file); "
                                    "nothing was changed. Move it away or point METATRAIL_STORE elsewhere.") from None
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
            raise StoreError(f"cannot read store file {path}: {exc}") from None
        raise CorruptStoreError(f"store file {path} is damaged ({exc}); nothing was changed") from None
    if names and "metatrail_schema" not in names:
        raise CorruptStoreError(f"{path} holds tables ({', '.join(sorted(names)[:5])}) but is not a metatrail "
                                "store; nothing was changed")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@functools.lru_cache(maxsize=64)
def _bulk_sql(dialect_name: str, table: Table, mode: str, key: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    columns = tuple(c.name for c in table.columns if not (c.primary_key and c.autoincrement is True
                                                             and c.name == "seq"))
    mark = "?" if dialect_name == "sqlite" else "%s"
    sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) "
           f"VALUES ({', '.join(mark for _ in columns)})")
    if mode == "ignore":
        sql += " ON CONFLICT DO NOTHING"
    elif mode in ("update", "refresh"):
        sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
        sql += f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        if mode == "refresh":  # a row that would not change is left alone: no page of it (or its indexes) rewritten
            differs = "IS NOT" if dialect_name == "sqlite" else "IS DISTINCT FROM"
            sql += " WHERE " + " OR ".join(f"{table.name}.{c} {differs} excluded.{c}" for c in columns if c not in key)
    return sql, columns


# -- the ingest hot path, at the driver level ---------------------------------------------------------------------
# Ingest runs a handful of statements per transaction; through SQLAlchemy Core each cost 50-100 us of Python
# (expression building, cache keys, expanding IN parameters), more than SQLite itself spends on a one-event commit.
# These helpers take the transaction's DBAPI cursor and the dialect name and send the SQL text as it is.


@contextlib.contextmanager
def raw_transaction(engine: Engine) -> Iterator[Any]:
    """One transaction on a pooled connection, as a DBAPI cursor: ``BEGIN IMMEDIATE`` on SQLite (the writer lock up
    front, as the engine's ``begin`` hook takes it), committed on success, rolled back on error. A third of the cost
    of ``engine.begin()`` for a one-event ingest."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        try:
            if engine.dialect.name == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            yield cur
            raw.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                raw.rollback()
            raise
        finally:
            with contextlib.suppress(Exception):
                cur.close()
    finally:
        raw.close()


def any_of(dialect_name: str, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column IN (…)`` and its parameters in the driver's style (one array parameter on PostgreSQL)."""
    if dialect_name == "sqlite":
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)
    return f"{column} = ANY(%s)", [list(values)]


# Rows per statement of a multi-row insert into SQLite (also kept under the connection's bound on parameters).
SQLITE_ROWS_PER_INSERT = 500


@functools.lru_cache(maxsize=256)
def _values_sql(dialect_name: str, table: Table, mode: str, key: tuple[str, ...], rows: int) -> str:
    sql, columns = _bulk_sql(dialect_name, table, mode, key)
    one = f"({', '.join('?' for _ in columns)})"
    head, _, tail = sql.partition(f"VALUES {one}")
    return f"{head}VALUES {', '.join([one] * rows)}{tail}"


def bulk_insert(cur: Any, dialect_name: str, table: Table, rows: Sequence[dict[str, Any]], *, mode: str = "plain",
                key: Sequence[str] = ()) -> None:
    """Insert many rows (``mode``: plain, ignore = ``ON CONFLICT DO NOTHING``, update = upsert on ``key``, refresh =
    upsert that leaves rows whose values are unchanged as they are). Plain
    rows, which the caller knows are new (it holds the log lock and looked, or deleted them first), go to
    PostgreSQL by ``COPY``, a third of the time of psycopg's pipelined ``executemany``; everything else to
    PostgreSQL through the driver's ``executemany`` with a statement text built once per table. Both databases accept
    this ``ON CONFLICT`` syntax.

    SQLite gets multi-row ``INSERT … VALUES (…), (…), …`` statements of up to :data:`SQLITE_ROWS_PER_INSERT` rows.
    The driver lets go of the GIL while SQLite runs a statement and takes it back after, so ``executemany`` (a step
    per row) needs the GIL back after every row: in a server whose event loop holds the GIL for tens of milliseconds
    at a time (parsing the next request), each of those takes that long. One statement per few hundred rows leaves
    SQLite working while the loop runs."""
    if not rows:
        return
    sql, columns = _bulk_sql(dialect_name, table, mode, tuple(key))
    values = operator.itemgetter(*columns)  # rows carry every column; a missing one is a bug, so KeyError
    if dialect_name == "sqlite":
        limit = cur.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        per = max(1, min(SQLITE_ROWS_PER_INSERT, limit // len(columns)))
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            cur.execute(_values_sql(dialect_name, table, mode, tuple(key), len(chunk)),
                        [v for row in chunk for v in values(row)])
        return
    if mode == "plain":
        with cur.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(values(row))
        return
    cur.executemany(sql, [values(row) for row in rows])


def lock_runs(cur: Any, dialect_name: str, run_ids: Sequence[str]) -> None:
    """Serialise projection updates of these runs across concurrent writers (PostgreSQL; SQLite's writer lock
    already serialises everything)."""
    if dialect_name == "sqlite":
        return
    # One round trip for all of them (one per run made a 1,000-run batch wait on 1,000 round trips); unnest keeps
    # the array's sorted order, so two writers still lock in the same order and never deadlock.
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest(%s::text[]) AS k", [sorted(set(run_ids))])


def lock_log(cur: Any, dialect_name: str) -> None:
    """Make log positions follow commit order (PostgreSQL). A sequence hands out ``seq`` at insert time, not at commit,
    so two concurrent writers could commit seq 11 before seq 10, and a reader resuming "after 11" (a sync cursor)
    would never see 10. Serialising the log append until commit closes that gap; SQLite's writer lock already does.
    Taken before the writer looks for the events it already has, so that look is exact."""
    if dialect_name != "sqlite":
        cur.execute("SELECT pg_advisory_xact_lock(7302916)")


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


def is_data_error(exc: BaseException) -> bool:
    """A value the database cannot hold (a string too long for its column, a number out of range): a fault of the
    event, not of the store."""
    if isinstance(exc, (sqlite3.DataError, OverflowError)):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.DataError)


def _transient(exc: BaseException) -> bool:
    message = str(exc).lower()
    return any(s in message for s in ("database is locked", "database is busy", "deadlock detected",
                                      "could not serialize", "server closed the connection"))


def retrying(fn: Callable[[], T], *, attempts: int = 20) -> T:
    """Run ``fn`` (one whole transaction), retrying transient lock/serialisation errors with jittered backoff."""
    delay = 0.01
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_driver_error(exc) or not _transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


