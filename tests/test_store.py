"""The store contract, run against SQLite and PostgreSQL: idempotent ingest, order-independent projections,
lineage joins by content hash, clear errors for bad URLs and corrupt files."""

from __future__ import annotations

import json
import multiprocessing
import random
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from eventgen import artifact, chain, execution_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metatrail.errors import ConfigError, CorruptStoreError, EventError, StoreError
from metatrail.model import uuid7
from metatrail.store import dialect, open_store
from metatrail.store.schema import MIGRATIONS


def _projection(store: Any) -> tuple[Any, ...]:
    runs = sorted((r["run_id"], r["state"], r["started_at"], r["ended_at"], r["pipeline"], r["stage"],
                   json.dumps(r["params"], sort_keys=True)) for r in store.list_runs(limit=10_000))
    edges = sorted((a["run_id"], a["direction"], a["artifact_key"], a["size"])
                   for r in store.list_runs(limit=10_000) for a in store.find_artifacts(name=None)
                   if a["run_id"] == r["run_id"])
    return tuple(runs), tuple(edges)


def test_ingest_is_idempotent(store_url: str) -> None:
    events = chain("p", 3)
    with open_store(store_url) as store:
        first = store.ingest(events)
        again = store.ingest(events)
        reordered = store.ingest(list(reversed(events)))
        assert (first.inserted, again.inserted, reordered.inserted) == (6, 0, 0)
        assert again.duplicates == 6
        assert store.stats()["events"] == 6
        assert [e.body for e in store.iter_events()] == [json.loads(json.dumps(e)) for e in events]


def test_run_state_follows_event_time_not_arrival(store_url: str) -> None:
    start, complete = execution_events("p", "s", t0=1.8e9, inputs=[], outputs=[artifact("/o", "a" * 32)])
    with open_store(store_url) as store:
        store.ingest([complete])
        run_id = complete["run"]["runId"]
        assert store.get_run(run_id)["state"] == "completed"
        store.ingest([start])  # a late START must not reopen a finished run
        run = store.get_run(run_id)
        assert run["state"] == "completed"
        assert run["started_at"] == pytest.approx(1.8e9)
        assert run["ended_at"] == pytest.approx(1.8e9 + 1.5)
        assert [o["hash"] for o in run["outputs"]] == ["a" * 32]


def test_lineage_joins_artifacts_by_content_hash_across_paths(store_url: str) -> None:
    # Site 1 writes the model at one path; site 2 reads the same bytes from another path.
    produce = execution_events("train", "fit", t0=1.8e9, inputs=[artifact("/site1/raw.csv", "1" * 32)],
                               outputs=[artifact("/site1/model.pt", "2" * 32)])
    refine = execution_events("refine", "tune", t0=1.8e9 + 100, inputs=[artifact("/site2/in/model.pt", "2" * 32)],
                              outputs=[artifact("/site2/model2.pt", "3" * 32)])
    with open_store(store_url) as store:
        store.ingest(produce + refine)
        graph = store.lineage(["md5:" + "3" * 32], direction="upstream", depth=5)
        keys = {n["key"] for n in graph["nodes"] if n["type"] == "artifact"}
        stages = {n["stage"] for n in graph["nodes"] if n["type"] == "run"}
        assert keys == {"md5:" + "1" * 32, "md5:" + "2" * 32, "md5:" + "3" * 32}
        assert stages == {"fit", "tune"}
        down = store.lineage(["md5:" + "1" * 32], direction="downstream", depth=5)
        assert "md5:" + "3" * 32 in {n.get("key") for n in down["nodes"]}
        shallow = store.lineage(["md5:" + "3" * 32], direction="upstream", depth=1)
        assert {n["stage"] for n in shallow["nodes"] if n["type"] == "run"} == {"tune"}


def test_queries(store_url: str) -> None:
    with open_store(store_url) as store:
        store.ingest(chain("alpha", 2) + chain("beta", 1, seed=1))
        assert [p["pipeline"] for p in store.list_pipelines()] == ["alpha", "beta"]
        assert store.list_pipelines()[0]["stages"] == ["s0", "s1"]
        assert {r["pipeline"] for r in store.list_runs(pipeline="beta")} == {"beta"}
        assert store.list_runs(state="failed") == []
        run = store.list_runs(pipeline="alpha", limit=1)[0]
        detail = store.get_run(run["run_id"])
        assert detail is not None and detail["inputs"] and detail["outputs"]
        assert store.get_run(uuid7()) is None
        alpha_events = list(store.iter_events(pipeline="alpha"))
        assert len(alpha_events) == 4
        assert len(list(store.iter_events(after_seq=alpha_events[1].seq, pipeline="alpha"))) == 2
        assert len(list(store.iter_events(since=1.8e9 + 10))) == 2  # only alpha.s1 is that late
        stats = store.stats()
        assert stats["events"] == 6 and stats["runs"] == 3 and stats["pipelines"] == 2


def test_events_without_runs_and_foreign_producers(store_url: str) -> None:
    fixtures = Path(__file__).parent / "data" / "openlineage-spec" / "marquez-fixtures" / "accepted"
    events = [json.loads(p.read_text()) for p in sorted(fixtures.glob("*.json"))]
    with open_store(store_url) as store:
        result = store.ingest(events)
        assert result.inserted == len(events)
        stored_ids = {e.id for e in store.iter_events()}
        assert len(stored_ids) == len(events)
        run_ids = {e["run"]["runId"] for e in events if "run" in e}
        assert {r["run_id"] for r in store.list_runs(limit=1000)} == run_ids


def test_bad_event_stores_nothing(store_url: str) -> None:
    good = chain("p", 1)
    bad = dict(good[0], eventTime="yesterday")
    with open_store(store_url) as store:
        with pytest.raises(EventError, match="eventTime"):
            store.ingest([*good, bad])
        assert store.stats()["events"] == 0
        with pytest.raises(EventError, match="runId"):
            store.ingest([dict(good[0], run={"facets": {}})])
        assert store.stats()["events"] == 0


def test_rebuild_projections_gives_the_same_rows(store_url: str) -> None:
    with open_store(store_url) as store:
        store.ingest(chain("p", 4) + chain("q", 2, seed=3))
        before = _projection(store)
        store.rebuild_projections()
        assert _projection(store) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_projection_is_independent_of_order_and_duplicates(tmp_path_factory: pytest.TempPathFactory,
                                                           data: st.DataObject) -> None:
    events = chain("p", 3) + execution_events("p", "retry", t0=1.8e9 + 500, inputs=[], outputs=[], status="FAIL")
    reference_dir = tmp_path_factory.mktemp("ref")
    with open_store(f"sqlite:///{reference_dir / 'ref.db'}") as ref:
        ref.ingest(events)
        expected = _projection(ref)
    shuffled = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events), max_size=6))))
    split = data.draw(st.integers(min_value=1, max_value=len(shuffled)))
    db = tmp_path_factory.mktemp("shuffled") / "s.db"
    with open_store(f"sqlite:///{db}") as store:
        for i in range(0, len(shuffled), split):
            store.ingest(shuffled[i : i + split])
        assert _projection(store) == expected
        assert store.stats()["events"] == len(events)


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid schemes: sqlite, postgresql, http, https"):
        open_store("mongodb://localhost/x")


def test_corrupt_store_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "metatrail.db"
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    with pytest.raises(CorruptStoreError, match=str(path)):
        open_store(f"sqlite:///{path}")
    assert path.read_bytes() == garbage


def test_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    before = path.read_bytes()
    with pytest.raises(CorruptStoreError, match="not a metatrail store"):
        open_store(f"sqlite:///{path}")
    assert path.read_bytes() == before


def test_a_store_path_below_a_regular_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"directory of store file .*/file/sub/x\.db: .*/file is not a directory"):
        open_store(f"sqlite:///{tmp_path / 'file' / 'sub' / 'x.db'}")


def test_a_postgresql_server_that_never_answers_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the TCP connection and then says nothing (hung, or half open behind a firewall)."""
    monkeypatch.setattr(dialect, "PG_CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(StoreError, match="timeout"):
            open_store(f"postgresql://postgres@127.0.0.1:{port}/x")
        assert time.monotonic() - began < 10


def test_opening_a_store_again_keeps_the_processes_locks(tmp_path: Path) -> None:
    """A server opens the same SQLite file once per part (store, tokens, peers, sync log) while the first holds
    connections. Each opening looks at the file; if it did so outside SQLite, closing that descriptor dropped the
    process's POSIX locks, and another process that then closed its connection deleted the WAL: commits of this
    process after that were invisible to every other process and lost when it died."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    wal = tmp_path / "s.db-wal"
    first = open_store(url)
    try:
        first.ingest(execution_events("load", "a", t0=1.8e9, inputs=[], outputs=[]))
        open_store(url).close()  # what a second part of the same process does
        subprocess.run([sys.executable, "-c", f"import sqlite3; c = sqlite3.connect({str(tmp_path / 's.db')!r}); "
                        "c.execute('SELECT count(*) FROM events').fetchall(); c.close()"], check=True, timeout=60)
        assert wal.exists(), "another process deleted the WAL this process still uses"
        first.ingest(execution_events("load", "b", t0=1.8e9 + 10, inputs=[], outputs=[]))
        seen = subprocess.run([sys.executable, "-c", f"import sqlite3; print(sqlite3.connect("
                               f"{str(tmp_path / 's.db')!r}).execute('SELECT count(*) FROM events').fetchone()[0])"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        assert seen == "4"
    finally:
        first.close()


def _writer(url: str, worker: int, n: int, queue: Any) -> None:
    try:
        with open_store(url) as store:
            inserted = 0
            for i in range(n):
                evs = execution_events("load", f"w{worker}", t0=1.8e9 + worker * 1000 + i,
                                       inputs=[artifact(f"/in/{worker}/{i}", f"{worker:016x}{i:016x}")],
                                       outputs=[])
                inserted += store.ingest(evs).inserted
        queue.put(("ok", inserted))
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put(("error", repr(exc)))


@pytest.mark.slow
def test_sixteen_writer_processes_lose_nothing(store_url: str) -> None:
    open_store(store_url).close()  # schema first, as a deployed store would have
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers, per_worker = 16, 25
    procs = [ctx.Process(target=_writer, args=(store_url, w, per_worker, queue)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r for r in results if r[0] == "error"] == []
    assert sum(r[1] for r in results) == workers * per_worker * 2
    with open_store(store_url) as store:
        stats = store.stats()
        assert stats["events"] == workers * per_worker * 2
        assert stats["executions"] == workers * per_worker
        assert stats["states"] == {"completed": workers * per_worker}


def test_concurrent_first_open_creates_one_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, w, 1, queue)) for w in range(6)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(r[0] == "ok" for r in results), results
    with sqlite3.connect(tmp_path / "fresh.db") as conn:
        versions = conn.execute("SELECT version FROM metatrail_schema ORDER BY version").fetchall()
    assert versions == [(v,) for v, _ in MIGRATIONS]


def test_random_batches_match_single_batch(store_url: str) -> None:
    events = chain("p", 5, seed=9)
    rng = random.Random(4)
    rng.shuffle(events)
    with open_store(store_url) as store:
        for e in events:
            store.ingest([e])
        assert store.stats()["events"] == 10
        assert {r["state"] for r in store.list_runs()} == {"completed"}


def _write_lock_is_free(path: Path) -> bool:
    """Whether another connection can take the SQLite database's write lock now."""
    other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        other.close()


def test_sqlite_readers_take_no_write_lock_and_writers_still_do(tmp_path: Path) -> None:
    from sqlalchemy import text

    from metatrail.store import dialect

    url = f"sqlite:///{tmp_path / 'locks.db'}"
    open_store(url).close()
    engine = dialect.make_engine(url)

    def another_writer_gets_the_lock() -> bool:
        return _write_lock_is_free(tmp_path / "locks.db")

    try:
        with dialect.reading(engine) as conn:  # inside an open read transaction
            assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 0
            assert another_writer_gets_the_lock()
        with engine.begin() as conn:  # a write transaction takes the lock up front
            conn.execute(text("SELECT count(*) FROM events")).scalar()
            assert not another_writer_gets_the_lock()
        # The store's own reads use reading(): a query runs while another process holds the write lock.
        with open_store(url) as store:
            blocker = sqlite3.connect(tmp_path / "locks.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                assert store.list_runs() == [] and store.stats()["events"] == 0
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
    finally:
        engine.dispose()


def test_sqlite_pool_returns_no_connection_inside_a_transaction(tmp_path: Path) -> None:
    """The pool does not roll back every returned connection (our users end their transactions); one that comes back
    inside a transaction all the same is rolled back, so the write lock is free and the next user starts clean."""
    from sqlalchemy import text

    from metatrail.store import dialect

    url = f"sqlite:///{tmp_path / 'pool.db'}"
    open_store(url).close()
    engine = dialect.make_engine(url)

    def lock_is_free() -> bool:
        return _write_lock_is_free(tmp_path / "pool.db")

    try:
        raw = engine.raw_connection()
        raw.cursor().execute("BEGIN IMMEDIATE")
        raw.cursor().execute("INSERT INTO sync_cursors (peer, direction, scope, position, updated_at) "
                             "VALUES ('p', 'push', '', 1, 0)")
        assert not lock_is_free()
        raw.close()  # back to the pool with the transaction open, its insert uncommitted
        assert lock_is_free()
        conn = engine.connect()  # a Core connection closed inside its (write) transaction
        conn.execute(text("INSERT INTO sync_cursors (peer, direction, scope, position, updated_at) "
                          "VALUES ('q', 'push', '', 1, 0)"))
        conn.close()
        assert lock_is_free()
        with dialect.raw_transaction(engine) as cur:  # the next user gets a clean connection
            cur.execute("SELECT count(*) FROM sync_cursors")
            assert cur.fetchone()[0] == 0
    finally:
        engine.dispose()


def test_sites_per_event_are_stored_in_one_transaction(tmp_path: Path) -> None:
    """``sites`` names where each event came from; the call is all or nothing, and an event sent again keeps the
    site it first came from (the run's site follows the stored events, not a later claim)."""
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        first = execution_events("train", "fit", t0=1.8e9, inputs=[], outputs=[])
        second = execution_events("train", "eval", t0=1.8e9 + 10, inputs=[], outputs=[])
        bad = {**second[0], "eventTime": "not a time"}
        with pytest.raises(EventError):
            store.ingest([*first, bad], sites=["a", "a", "b"])
        assert store.stats()["events"] == 0
        assert store.ingest([*first, *second], sites=["a", "a", None, "b"]).inserted == 4
        assert store.ingest(first, site="elsewhere").inserted == 0
        sites = {(e.body["run"]["runId"], e.body["eventType"]): e.site for e in store.iter_events()}
        assert sites == {(first[0]["run"]["runId"], "START"): "a", (first[1]["run"]["runId"], "COMPLETE"): "a",
                         (second[0]["run"]["runId"], "START"): None, (second[1]["run"]["runId"], "COMPLETE"): "b"}
        assert store.get_run(first[0]["run"]["runId"])["site"] == "a"
        assert store.get_run(second[0]["run"]["runId"])["site"] == "b"
        store.rebuild_projections()
        assert store.get_run(first[0]["run"]["runId"])["site"] == "a"
        with pytest.raises(ValueError):
            store.ingest(first, sites=["a"])
