"""The Recorder's SQLite writer (metatrail.store.sqlite_writer): the same schema and rows as the SQL store, with no
SQLAlchemy in the recording process, and the store's rules for files that are new, old, newer or foreign."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from eventgen import pipeline_batch

from metatrail.errors import CorruptStoreError, StoreError
from metatrail.store import ingest, open_store
from metatrail.store.schema import CURRENT_VERSION, MIGRATIONS, edges, events, runs
from metatrail.store.sql import SqlStore
from metatrail.store.sqlite_writer import SCHEMA_VERSION, SqliteWriter, open_writer


def _master(path: Path) -> set[tuple[str, str, str, str | None]]:
    with sqlite3.connect(path) as conn:
        return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM metatrail_schema ORDER BY version")]


def test_a_new_store_gets_the_schema_the_migrations_create(tmp_path: Path) -> None:
    by_migrations, by_writer = tmp_path / "m.db", tmp_path / "w.db"
    SqlStore(f"sqlite:///{by_migrations}").close()
    writer = SqliteWriter.open(f"sqlite:///{by_writer}")
    assert writer is not None
    writer.close()
    assert SCHEMA_VERSION == CURRENT_VERSION, "a new schema version needs the writer's statements updated"
    assert _master(by_writer) == _master(by_migrations)
    assert _versions(by_writer) == _versions(by_migrations) == [v for v, _ in MIGRATIONS]


def test_columns_written_are_the_tables_columns() -> None:
    for table in (events, runs, edges):
        assert ingest.COLUMNS[table.name] == tuple(c.name for c in table.columns if c.name != "seq")


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as conn:
        return {
            "events": sorted(conn.execute("SELECT id, run_id, event_type, event_time, job_namespace, job_name, site, "
                                          "body FROM events")),
            "runs": sorted(conn.execute("SELECT * FROM runs")),
            "io_edges": sorted(conn.execute("SELECT * FROM io_edges")),
        }


def test_the_writer_stores_the_rows_the_sql_store_stores(tmp_path: Path) -> None:
    batch = pipeline_batch(20, 3)
    store = SqlStore(f"sqlite:///{tmp_path / 'a.db'}")
    writer = SqliteWriter.open(f"sqlite:///{tmp_path / 'b.db'}")
    assert writer is not None
    for target in (store, writer):
        first = target.ingest(batch[:25], site="site-1")
        second = target.ingest(batch[20:])  # five sent again: stored once, keeping their first site
        assert (first.inserted, second.inserted) == (25, 15)
        assert target.ingest(batch).inserted == 0
    store.close()
    writer.close()
    rows_a, rows_b = _rows(tmp_path / "a.db"), _rows(tmp_path / "b.db")
    assert rows_a == rows_b
    assert len(rows_b["events"]) == 40 and rows_b["runs"] and rows_b["io_edges"]
    # What the writer stored, the store reads and queries as its own.
    reopened = open_store(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        assert reopened.stats()["events"] == 40
        assert {e.id for e in reopened.iter_events()} == {row[0] for row in rows_b["events"]}
    finally:
        reopened.close()


def test_an_older_store_is_migrated_by_the_sql_store(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # a store of schema version 2 (before sync cursor anchors)
        conn.execute("CREATE TABLE metatrail_schema (version INTEGER NOT NULL PRIMARY KEY, applied_at FLOAT NOT NULL)")
        conn.execute("INSERT INTO metatrail_schema VALUES (1, 0), (2, 0)")
    SqlStore(f"sqlite:///{tmp_path / 'ref.db'}").close()
    with sqlite3.connect(tmp_path / "ref.db") as ref, sqlite3.connect(path) as conn:
        for name, sql in ref.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'index') "
                                     "AND sql IS NOT NULL AND name != 'metatrail_schema' ORDER BY rowid"):
            if name == "sync_cursors":
                sql = sql.replace(", \n\tanchor_seq BIGINT, \n\tanchor_id VARCHAR(64)", "")
            if name == "runs":
                sql = sql.replace(", \n\tmixed INTEGER DEFAULT '1' NOT NULL", "")
            conn.execute(sql)
    assert SqliteWriter.open(f"sqlite:///{path}") is None
    target = open_writer(f"sqlite:///{path}")
    try:
        assert isinstance(target, SqlStore)
        assert target.ingest(pipeline_batch(2, 0)).inserted == 4
    finally:
        target.close()
    assert _versions(path) == list(range(1, CURRENT_VERSION + 1))


def test_a_newer_store_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    SqlStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO metatrail_schema VALUES (?, 0)", (CURRENT_VERSION + 1,))
    before = _master(path)
    with pytest.raises(StoreError, match="newer than this metatrail"):
        open_writer(f"sqlite:///{path}")
    assert _master(path) == before


def test_a_foreign_database_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    content = path.read_bytes()
    with pytest.raises(CorruptStoreError, match="not a metatrail store"):
        SqliteWriter.open(f"sqlite:///{path}")
    assert path.read_bytes() == content
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CorruptStoreError, match="not an SQLite database"):
        SqliteWriter.open(f"sqlite:///{garbage}")
    assert garbage.read_bytes() == b"not a database at all" * 100


def _first_writer(url: str, start: multiprocessing.synchronize.Event, index: int) -> None:
    start.wait(30)
    target = open_writer(url) if index % 2 else SqlStore(url)  # writers and the SQL store race to create it
    try:
        target.ingest(pipeline_batch(5, 100 + index))
    finally:
        target.close()


def test_concurrent_first_writers_create_one_schema_and_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_first_writer, args=(url, start, i)) for i in range(6)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    assert _versions(tmp_path / "race.db") == [v for v, _ in MIGRATIONS]
    expected = {e_id for i in range(6) for e_id in _ids(pipeline_batch(5, 100 + i))}
    with sqlite3.connect(tmp_path / "race.db") as conn:
        assert {r[0] for r in conn.execute("SELECT id FROM events")} == expected


def _ids(batch: list[dict[str, Any]]) -> set[str]:
    return {ingest.prepare_event(e)[0] for e in batch}


def test_a_forked_child_leaves_the_parents_connection_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fork.db'}"
    writer = SqliteWriter.open(url)
    assert writer is not None
    batch = pipeline_batch(6, 9)
    writer.ingest(batch[:6])
    pid = os.fork()
    if pid == 0:  # the child drops what it inherited, as a Recorder's child does, and ends
        code = 1
        try:
            child = SqliteWriter.open(url)
            if child is not None:
                code = 0 if child.ingest(batch[6:8]).inserted == 2 else 2
                child.close()
            del writer
            import gc

            gc.collect()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert writer.ingest(batch).inserted == 4  # the parent's connection still works; the child's two are there
    writer.close()
    with sqlite3.connect(tmp_path / "fork.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 12


def test_a_recording_process_does_not_import_sqlalchemy(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import json, sys
        from metatrail.recorder import Recorder
        recorder = Recorder()
        execution = recorder.execution_started("pipe", "train", params={"lr": 0.1})
        recorder.execution_finished(execution)
        stored = recorder.flush(60)
        loaded = sorted(m for m in sys.modules if m.startswith("sqlalchemy"))
        print(json.dumps({"stored": stored, "sqlalchemy": loaded}))
        recorder.close(30)
    """)
    env = {**os.environ, "METATRAIL_STORE": f"sqlite:///{tmp_path / 'rec.db'}",
           "METATRAIL_HASH_CACHE": str(tmp_path / "hc.db"), "METATRAIL_WRITER": "thread"}
    env.pop("METATRAIL_DISABLED", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"stored": True, "sqlalchemy": []}
    store = open_store(f"sqlite:///{tmp_path / 'rec.db'}")
    try:
        assert store.stats()["states"] == {"completed": 1}
    finally:
        store.close()


def test_a_closed_writer_says_so(tmp_path: Path) -> None:
    writer = SqliteWriter.open(f"sqlite:///{tmp_path / 'c.db'}")
    assert writer is not None
    writer.close()
    writer.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        writer.ingest(pipeline_batch(1, 0))


def _bytes_written() -> int:
    """What this thread has written with write(2) and pwrite(2) so far, by Linux's count (an ingest writes on the
    calling thread; other threads of the test process may write meanwhile)."""
    io = dict(line.split(": ") for line in Path("/proc/thread-self/io").read_text().splitlines())
    return int(io["wchar"])


@pytest.mark.parametrize("writer", ["sql-store", "recorder-writer"])
def test_an_ingest_writes_its_log_and_no_statement_journal_file(tmp_path: Path, writer: str) -> None:
    # One transaction of several multi-row INSERTs: each later statement changes pages an earlier one had changed
    # (the table's last pages, the indexes), which SQLite keeps in a statement journal so that it can undo the
    # statement alone. Written to a temporary file, that journal was a third of all an ingest wrote.
    # (Queries keep their temporary files on disk: a sort over a large store must be able to spill.)
    path = tmp_path / "s.db"
    target = SqlStore(f"sqlite:///{path}") if writer == "sql-store" else SqliteWriter.open(f"sqlite:///{path}")
    assert target is not None
    try:
        target.ingest(pipeline_batch(200, 1))
        wal = path.with_name(path.name + "-wal")
        wal_before, written_before = wal.stat().st_size, _bytes_written()
        batch = pipeline_batch(1500, 2)
        assert len(batch) > 4 * ingest.SQLITE_ROWS_PER_INSERT  # several statements per table
        assert target.ingest(batch).inserted == len(batch)
        written, logged = _bytes_written() - written_before, wal.stat().st_size - wal_before
        if isinstance(target, SqlStore):  # the pooled connection the ingest used is back to files on disk
            pooled = target._engine.raw_connection()
            try:
                assert pooled.cursor().execute("PRAGMA temp_store").fetchone()[0] == 0
            finally:
                pooled.close()
    finally:
        target.close()
    assert logged > 1_000_000  # no checkpoint ran: the log holds the transaction's pages
    assert written < 1.1 * logged, f"wrote {written:,} bytes for {logged:,} bytes of log"
