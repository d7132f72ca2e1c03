"""The ingest transaction at the driver level: what every SQL writer of the store runs, with no SQLAlchemy.

Two writers share it: :class:`~metatrail.store.sql.SqlStore` (SQLite and PostgreSQL through SQLAlchemy engines, for
servers, queries and sync) and :class:`~metatrail.store.sqlite_writer.SqliteWriter` (the Recorder's writer on the
embedded SQLite store, through the standard library's ``sqlite3``). The Recorder runs inside the user's workflow
process, and importing SQLAlchemy costs that process about a sixth of a second of CPU (more on a slow machine) before
its first event is stored; so nothing here imports it, and both writers store the same rows by the same statements.

Every function takes the transaction's DBAPI cursor and the dialect's name (``"sqlite"`` or ``"postgresql"``) and
sends SQL text as it is: through SQLAlchemy Core each statement cost 50-100 us of Python (expression building, cache
keys, expanding IN parameters), more than SQLite itself spends on a one-event commit.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson

from metatrail.errors import EventError, ForeignRunError
from metatrail.openlineage.events import canonical_bytes
from metatrail.store.base import CanonicalEvent, IngestResult, digest
from metatrail.store.projection import EventRecord, parse_event_time, project_run

CHUNK = 500  # bound on IN (...) lists
MAX_ID = 64  # the width of run id columns (runs.run_id, events.run_id)
MAX_EVENT_TYPE = 16  # the width of events.event_type

# The columns each writer fills, in the order of the statements below. ``events.seq`` is the log position the
# database assigns. :mod:`metatrail.store.schema` defines the tables; a test holds the two to each other.
COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("id", "run_id", "event_type", "event_time", "job_namespace", "job_name", "site", "ingested_at",
               "body"),
    "runs": ("run_id", "namespace", "job_name", "pipeline", "stage", "kind", "parent_run_id", "state", "started_at",
             "ended_at", "integration", "site", "error", "event_count", "facets", "mixed"),
    "io_edges": ("run_id", "direction", "namespace", "name", "version", "artifact_key", "hash", "algorithm", "size",
                 "hash_error"),
}

# Rows per statement of a multi-row insert into SQLite (also kept under the connection's bound on parameters).
SQLITE_ROWS_PER_INSERT = 500

Prepared = dict[str, tuple[str, EventRecord, dict[str, Any]]]


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def prepare_event(event: Mapping[str, Any], site: str | None = None) -> tuple[str, str, EventRecord, dict[str, Any]]:
    """Check that an event can be stored and projected; return (id, canonical text, record, row values) for storing
    it as received from ``site``. A :class:`~metatrail.store.base.CanonicalEvent` brings its canonical bytes along;
    any other mapping is serialised."""
    if isinstance(event, CanonicalEvent):
        raw, eid = event.canonical, event.id
    elif not isinstance(event, Mapping):
        raise EventError(f"an event must be a JSON object, got {type(event).__name__}")
    else:
        try:
            raw = canonical_bytes(event)
        except (TypeError, ValueError) as exc:
            raise EventError(f"event is not JSON-serialisable: {exc}") from None
        eid = digest(raw)
    text_ = raw.decode("utf-8")
    etime = parse_event_time(event.get("eventTime"))
    run = event.get("run")
    run_id = run.get("runId") if isinstance(run, Mapping) else None
    job = event.get("job")
    if run is not None and not (isinstance(run_id, str) and 0 < len(run_id) <= MAX_ID):
        raise EventError(f"run.runId is required on a run event, a string of at most {MAX_ID} characters")
    event_type = event.get("eventType")
    if event_type is not None and not (isinstance(event_type, str) and len(event_type) <= MAX_EVENT_TYPE):
        raise EventError(f"eventType must be a string of at most {MAX_EVENT_TYPE} characters")
    # The projection reads the caller's own mapping: parsing the canonical text back would cost as much again.
    record = EventRecord(id=eid, time=etime, body=event, site=site)
    row = {
        "id": eid,
        "site": site,
        "run_id": run_id,
        "event_type": event_type or None,
        "event_time": etime,
        "job_namespace": job.get("namespace") if isinstance(job, Mapping) else None,
        "job_name": job.get("name") if isinstance(job, Mapping) else None,
    }
    return eid, text_, record, row


def prepare_batch(events_in: Sequence[Mapping[str, Any]], site: str | None,
                  sites: Sequence[str | None] | None) -> Prepared:
    """:func:`prepare_event` for each event, by id (an event given twice is stored once); raises
    :class:`EventError` for the first event that cannot be stored, before anything is written."""
    if sites is not None and len(sites) != len(events_in):
        raise ValueError(f"{len(sites)} sites for {len(events_in)} events")
    prepared: Prepared = {}
    for i, ev in enumerate(events_in):
        eid, text_, record, row = prepare_event(ev, site if sites is None else sites[i])
        prepared.setdefault(eid, (text_, record, row))
    return prepared


def ingest_prepared(cur: Any, dialect_name: str, prepared: Prepared, received: int, *,
                    allowed_pipelines: frozenset[str] | None = None) -> IngestResult:
    """Store the new events of ``prepared`` and their runs' projections, inside the caller's transaction (which
    holds SQLite's write lock; on PostgreSQL this takes the log and run locks). With ``allowed_pipelines``, raise
    :class:`ForeignRunError` (the caller rolls back) when one of the events' runs is stored under a pipeline not
    among them: looked at under the same locks as the write, so no other writer, in this process or another, can
    store the run under another pipeline in between."""
    lock_log(cur, dialect_name)
    ids = list(prepared)
    # One look serves three needs: an event's run is part of its content, so an event already stored is among the
    # events listed for its run; those listed are what the projections are rebuilt from; and their bodies come along
    # (a second statement cost a one-event ingest more than reading them here).
    run_ids = sorted({row["run_id"] for _, _, row in prepared.values() if row["run_id"]})
    lock_runs(cur, dialect_name, run_ids)
    if allowed_pipelines is not None:
        refuse_foreign_runs(cur, dialect_name, run_ids, allowed_pipelines)
    listed: dict[str, list[tuple[str, float, str, str | None]]] = defaultdict(list)
    for part in chunks(run_ids):
        clause, params = any_of(dialect_name, "run_id", part)
        cur.execute(f"SELECT run_id, id, event_time, body, site FROM events WHERE {clause}", params)
        for run_id, eid, etime, body, stored_site in cur.fetchall():
            listed[run_id].append((eid, etime, body, stored_site))
    existing = {stored[0] for events_of in listed.values() for stored in events_of if stored[0] in prepared}
    runless = [i for i in ids if not prepared[i][2]["run_id"]]
    for part in chunks(runless):
        clause, params = any_of(dialect_name, "id", part)
        cur.execute(f"SELECT id FROM events WHERE {clause}", params)
        existing.update(r[0] for r in cur.fetchall())
    new_ids = [i for i in ids if i not in existing]
    if not new_ids:
        return IngestResult(received=received, inserted=0)
    now = time.time()
    rows = [{**prepared[i][2], "ingested_at": now, "body": prepared[i][0]} for i in new_ids]
    bulk_insert(cur, dialect_name, "events", rows)  # new: the log lock is held and we looked
    touched = sorted({prepared[i][2]["run_id"] for i in new_ids if prepared[i][2]["run_id"]})
    by_run: dict[str, list[EventRecord]] = defaultdict(list)
    for i in new_ids:
        if prepared[i][2]["run_id"]:
            by_run[prepared[i][2]["run_id"]].append(prepared[i][1])
    for run_id in touched:
        for eid, etime, body, stored_site in listed.get(run_id, ()):
            # Sent again: its body is at hand, but it stays the event it was, from where it first came.
            again = prepared.get(eid)
            by_run[run_id].append(EventRecord(id=eid, time=etime, site=stored_site,
                                              body=again[1].body if again else orjson.loads(body)))
    store_projections(cur, dialect_name, touched, by_run)
    return IngestResult(received=received, inserted=len(new_ids), inserted_ids=tuple(new_ids))


def refuse_foreign_runs(cur: Any, dialect_name: str, run_ids: Sequence[str], allowed: frozenset[str]) -> None:
    """Raise :class:`ForeignRunError` for the first of ``run_ids`` stored under a pipeline not in ``allowed``."""
    for part in chunks(run_ids):
        clause, params = any_of(dialect_name, "run_id", part)
        cur.execute(f"SELECT run_id, pipeline FROM runs WHERE {clause} ORDER BY run_id", params)
        for run_id, pipeline in cur.fetchall():
            if pipeline not in allowed:
                raise ForeignRunError(run_id, allowed)


def store_projections(cur: Any, dialect_name: str, run_ids: Sequence[str],
                      by_run: Mapping[str, Sequence[EventRecord]]) -> None:
    """Write the projected rows of ``run_ids``, projected from ``by_run`` (every event of each). Edges are only added
    or updated: callers either add events to runs or have emptied ``io_edges`` first."""
    run_rows, edge_rows = [], []
    for run_id in run_ids:
        proj = project_run(run_id, by_run[run_id])
        # Only our own facet is kept on the row (lists need the parameters); get_run re-projects the rest.
        own = {k: v for k, v in proj.run["facets"].items() if k in ("metatrail_execution", "metatrail_energy")}
        run_rows.append({**proj.run, "facets": canonical_bytes(own).decode()})  # big integers too
        edge_rows.extend(proj.edges)
    bulk_insert(cur, dialect_name, "runs", run_rows, mode="update", key=["run_id"])
    # A run's edges are the union of its events' inputs and outputs, so more events never remove one: upsert them
    # (an unchanged edge is not rewritten) rather than delete and insert them all again.
    bulk_insert(cur, dialect_name, "io_edges", edge_rows, mode="refresh",
                key=["run_id", "direction", "namespace", "name"])


@functools.lru_cache(maxsize=64)
def _bulk_sql(dialect_name: str, table: str, mode: str, key: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    columns = COLUMNS[table]
    mark = "?" if dialect_name == "sqlite" else "%s"
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(mark for _ in columns)})"
    if mode == "ignore":
        sql += " ON CONFLICT DO NOTHING"
    elif mode in ("update", "refresh"):
        sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
        sql += f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        if mode == "refresh":  # a row that would not change is left alone: no page of it (or its indexes) rewritten
            differs = "IS NOT" if dialect_name == "sqlite" else "IS DISTINCT FROM"
            sql += " WHERE " + " OR ".join(f"{table}.{c} {differs} excluded.{c}" for c in columns if c not in key)
    return sql, columns


@functools.lru_cache(maxsize=256)
def _values_sql(dialect_name: str, table: str, mode: str, key: tuple[str, ...], rows: int) -> str:
    sql, columns = _bulk_sql(dialect_name, table, mode, key)
    one = f"({', '.join('?' for _ in columns)})"
    head, _, tail = sql.partition(f"VALUES {one}")
    return f"{head}VALUES {', '.join([one] * rows)}{tail}"


def bulk_insert(cur: Any, dialect_name: str, table: str, rows: Sequence[dict[str, Any]], *, mode: str = "plain",
                key: Sequence[str] = ()) -> None:
    """Insert many rows into ``table`` (one of :data:`COLUMNS`; ``mode``: plain, ignore = ``ON CONFLICT DO
    NOTHING``, update = upsert on ``key``, refresh = upsert that leaves rows whose values are unchanged as they are).
    Plain rows, which the caller knows are new (it holds the log lock and looked, or deleted them first), go to
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
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(values(row))
        return
    cur.executemany(sql, [values(row) for row in rows])


def any_of(dialect_name: str, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column IN (…)`` and its parameters in the driver's style (one array parameter on PostgreSQL)."""
    if dialect_name == "sqlite":
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)
    return f"{column} = ANY(%s)", [list(values)]


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


def is_transient(exc: BaseException) -> bool:
    """A lock, serialisation or dropped-connection error that the same transaction may pass when tried again."""
    message = str(exc).lower()
    return any(s in message for s in ("database is locked", "database is busy", "deadlock detected",
                                      "could not serialize", "server closed the connection"))
