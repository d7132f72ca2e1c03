"""Tables of the SQL store and the migrations that create and upgrade them.

The schema is versioned in ``metatrail_schema``; :data:`MIGRATIONS` lists each version's steps, applied in order
under a write lock, so concurrent first starts create exactly one schema. Nothing calls ``create_all`` on a live
database outside a migration step.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

# BigInteger autoincrement is not a rowid alias on SQLite; Integer there keeps seq the rowid.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

schema_version = Table(
    "metatrail_schema",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("run_id", String(64), nullable=True),
    Column("event_type", String(16), nullable=True),
    Column("event_time", Float, nullable=True),
    Column("job_namespace", Text, nullable=True),
    Column("job_name", Text, nullable=True),
    Column("site", Text, nullable=True),
    Column("ingested_at", Float, nullable=False),
    Column("body", Text, nullable=False),
)
Index("ix_events_run", events.c.run_id)
Index("ix_events_time", events.c.event_time)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("namespace", Text, nullable=False),
    Column("job_name", Text, nullable=False),
    Column("pipeline", Text, nullable=False),
    Column("stage", Text, nullable=True),
    Column("kind", String(16), nullable=False),
    Column("parent_run_id", String(64), nullable=True),
    Column("state", String(16), nullable=False),
    Column("started_at", Float, nullable=True),
    Column("ended_at", Float, nullable=True),
    Column("integration", Text, nullable=True),
    Column("site", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("event_count", Integer, nullable=False),
    Column("facets", Text, nullable=False),
    # Version 4: 1 when an event of the run names a pipeline other than the run's (or none), so that a reader limited
    # to some pipelines must look at the run's events (metatrail.store.sql.readable_run); 0 spares it that look.
    Column("mixed", Integer, nullable=False, server_default="1"),
)
Index("ix_runs_pipeline", runs.c.pipeline, runs.c.started_at)
Index("ix_runs_parent", runs.c.parent_run_id)

edges = Table(
    "io_edges",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("direction", String(8), primary_key=True),
    Column("namespace", Text, primary_key=True),
    Column("name", Text, primary_key=True),
    Column("version", Text, nullable=True),
    Column("artifact_key", Text, nullable=False),
    Column("hash", Text, nullable=True),
    Column("algorithm", String(16), nullable=True),
    Column("size", BigInteger, nullable=True),
    Column("hash_error", Text, nullable=True),
)
Index("ix_edges_key", edges.c.artifact_key, edges.c.direction)
Index("ix_edges_dataset", edges.c.namespace, edges.c.name)

Migration = Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    for table in (events, runs, edges):
        table.create(conn, checkfirst=False)


# -- version 2: what servers and syncing clients keep beside the log (tokens, peers, sync cursors) ------------------
tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),  # the public part of a token; the secret is stored hashed
    Column("name", Text, nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("scopes", Text, nullable=False),  # comma-separated: read, write, admin
    Column("site", Text, nullable=False),
    Column("pipelines", Text, nullable=True),  # JSON list: the pipelines this token may read; NULL = all
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

peers = Table(
    "peers",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("url", Text, nullable=False),
    Column("token", Text, nullable=True),  # the credential this server presents to the peer
    Column("pull", Integer, nullable=False),
    Column("push", Integer, nullable=False),
    Column("share", Text, nullable=True),  # JSON list: the pipelines pushed to the peer; NULL = all
    Column("interval_s", Float, nullable=True),  # scheduled sync period; NULL = on demand only
    Column("created_at", Float, nullable=False),
    Column("last_sync_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
)

sync_cursors = Table(
    "sync_cursors",
    metadata,
    Column("peer", Text, primary_key=True),  # the other side (normalised URL or peer name)
    Column("direction", String(8), primary_key=True),  # push | pull | ship | forward (metatrail.server.fanout)
    Column("scope", Text, primary_key=True),  # the filter the cursor belongs to ("" = everything)
    Column("position", BigInteger, nullable=False),  # high-water mark: the log position (seq) done so far
    Column("updated_at", Float, nullable=False),
    # Version 3: the newest event at or behind ``position`` known to be on both sides (its position in the source's
    # log and its id). A sync first checks it is still there on both; when it is not, one side was restored from a
    # backup and its positions no longer mean what the cursor says, so the logs are compared whole.
    Column("anchor_seq", BigInteger, nullable=True),
    Column("anchor_id", String(64), nullable=True),
)


def _v2(conn: Connection) -> None:
    for table in (tokens, peers, sync_cursors):
        table.create(conn, checkfirst=False)


def _v3(conn: Connection) -> None:
    # A version-2 store's cursors lack the anchor; a store created at version 3 has it already (the table is created
    # from its current definition by ``_v2``).
    from sqlalchemy import inspect

    have = {c["name"] for c in inspect(conn).get_columns("sync_cursors")}
    for column, kind in (("anchor_seq", "BIGINT"), ("anchor_id", "VARCHAR(64)")):
        if column not in have:
            conn.execute(text(f"ALTER TABLE sync_cursors ADD COLUMN {column} {kind}"))


def _v4(conn: Connection) -> None:
    # A version-3 store's runs lack ``mixed``; a store created at version 4 has it already (``_v1`` creates the table
    # from its current definition). Existing runs are marked by what their stored events name, as ingest marks them.
    from sqlalchemy import inspect

    if "mixed" in {c["name"] for c in inspect(conn).get_columns("runs")}:
        return
    conn.execute(text("ALTER TABLE runs ADD COLUMN mixed INTEGER DEFAULT '1' NOT NULL"))
    from metatrail.store.sql import mark_unmixed_runs

    mark_unmixed_runs(conn)


MIGRATIONS: list[tuple[int, Migration]] = [(1, _v1), (2, _v2), (3, _v3), (4, _v4)]
CURRENT_VERSION = MIGRATIONS[-1][0]
