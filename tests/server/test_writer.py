"""The server's writer and pipelined sync: acknowledged means committed, whether a job was written inline (a lone
single event on SQLite) or group-committed by the writer thread; a refused event fails only its own request; a
pipelined transfer moves its cursor only past pages that are stored."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from srvkit import bulk_events, ids_of

from metatrail.errors import EventError, StoreError
from metatrail.server.writer import IngestWriter
from metatrail.store import open_store
from metatrail.store.base import IngestResult
from metatrail.store.sqlite_writer import SqliteWriter
from metatrail.sync import LocalEndpoint, Shipped, SyncLog, transfer


def _held(url: str) -> set[str]:
    """The ids a fresh connection sees: what is committed, not what a writer holds in a transaction."""
    store = open_store(url)
    try:
        return {e.id for e in store.iter_events()}
    finally:
        store.close()


class _Gated:
    """A store whose first ingest waits for ``release``: the writer stays busy while other jobs arrive."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self.can_refuse_to_wait = getattr(inner, "can_refuse_to_wait", False)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None, wait: bool = True) -> IngestResult:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(30)
        if any(e.get("producer") == "breaks the store" for e in events):
            raise TypeError("a value the driver cannot bind")  # not the store's fault, not an EventError either
        return self.inner.ingest(events, site=site, sites=sites, **({} if wait else {"wait": False}))


def test_inline_write_is_committed_when_acknowledged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = SqliteWriter.open(url)  # what a SQLite server writes through
    assert store is not None
    writer = IngestWriter(store, inline_max=1)  # type: ignore[arg-type]
    try:
        event = bulk_events(1)[0]
        future = writer.submit([event], "hub")
        assert future.done()  # written on the caller's thread: no hand-over to the writer thread
        assert future.result().inserted == 1
        assert ids_of([event]) <= _held(url)
        assert writer.submit([event], "hub").result().inserted == 0  # idempotent
        assert writer._thread is None
    finally:
        writer.close()
        store.close()


def _gated_writer(tmp_path: Path) -> tuple[str, Any, _Gated, IngestWriter]:
    """A store's writer (what a SQLite server writes through), the same behind a gate, and a writer that writes a
    lone job inline (so the first job holds it)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = SqliteWriter.open(url)
    assert store is not None
    gated = _Gated(store)
    return url, store, gated, IngestWriter(gated, inline_max=1)  # type: ignore[arg-type]


def test_jobs_arriving_while_busy_are_group_committed(tmp_path: Path) -> None:
    url, store, gated, writer = _gated_writer(tmp_path)
    events = bulk_events(20)
    try:
        first: dict[str, Any] = {}
        inline = threading.Thread(target=lambda: first.update(f=writer.submit([events[0]], "hub")))
        inline.start()
        assert gated.entered.wait(30)  # the inline write holds the writer
        queued = [writer.submit([e], "hub") for e in events[1:]]
        assert not any(f.done() for f in queued)  # nothing is acknowledged before it is committed
        gated.release.set()
        inline.join(30)
        assert all(f.result(30).inserted == 1 for f in [first["f"], *queued])
        assert gated.calls == 2  # the 39 queued single events shared one transaction
        assert ids_of(events) <= _held(url)
    finally:
        gated.release.set()
        writer.close()
        store.close()


def test_a_refused_event_fails_only_its_own_request(tmp_path: Path) -> None:
    url, store, gated, writer = _gated_writer(tmp_path)
    good = bulk_events(3)
    bad = {**good[0], "eventTime": "not a time"}  # the store refuses it (the routes validate before submitting)
    try:
        blocker = threading.Thread(target=lambda: writer.submit([good[0]], "hub"))
        blocker.start()
        assert gated.entered.wait(30)
        ok = writer.submit(good[1:3], "hub")
        refused = writer.submit([bad], "hub")
        also_ok = writer.submit(good[3:], "hub")
        gated.release.set()
        blocker.join(30)
        assert ok.result(30).inserted == 2 and also_ok.result(30).inserted == 3
        with pytest.raises(EventError):
            refused.result(30)
        assert _held(url) == ids_of(good)
    finally:
        gated.release.set()
        writer.close()
        store.close()


def test_a_request_cancelled_while_queued_spoils_no_other_request(tmp_path: Path) -> None:
    """A request task cancelled while its job waits (uvicorn cancels them when a graceful shutdown runs out; so may
    a framework when the client goes away) cancels the future it awaits. The job's events are still written, and
    the other requests of the same transaction get their answers and are forwarded: a cancelled future once made
    the writer fail them (503, though committed) and skip the fan-out of the whole transaction for good."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    gated = _Gated(store)
    forwarded: list[Any] = []
    writer = IngestWriter(gated, inline_max=0,  # type: ignore[arg-type]
                          on_inserted=lambda events, site: forwarded.extend(events))
    events = bulk_events(3)  # one job per event; each run's two events go to different jobs
    try:
        first = writer.submit([events[0]], "hub")
        assert gated.entered.wait(30)  # the writer thread holds the first job
        assert not first.cancel()  # a job the writer took can no longer be cancelled: it will be answered
        queued = [writer.submit([e], "hub") for e in events[1:]]
        assert queued[0].cancel()  # still waiting: cancelled, as asyncio.wrap_future does
        gated.release.set()
        assert first.result(30).inserted == 1
        assert all(f.result(30).inserted == 1 for f in queued[1:])
        assert queued[0].cancelled()
        assert _held(url) == ids_of(events)  # the cancelled request's events were written all the same
        assert ids_of(forwarded) == ids_of(events)
        assert writer.pending == 0
    finally:
        gated.release.set()
        writer.close()
        store.close()


def test_a_fault_after_the_commit_answers_the_request_and_the_writer_lives_on(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours past the commit (here: working out which events were new, for fan-out) must neither leave the
    request waiting for ever nor end the writer thread: the request fails (the client retries; ingest is
    idempotent), the events stay committed, and the next request is written."""
    import metatrail.server.writer as writer_module

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    forwarded: list[Any] = []
    writer = IngestWriter(store, inline_max=0, on_inserted=lambda events, site: forwarded.extend(events))
    events = bulk_events(4)
    try:
        def broken_event_id(event: Mapping[str, Any]) -> str:
            raise RuntimeError("a bug past the commit")

        monkeypatch.setattr(writer_module, "event_id", broken_event_id)
        failed = writer.submit([dict(e) for e in events[:2]], "hub")  # plain dicts: their ids are worked out
        with pytest.raises(StoreError):
            failed.result(30)
        assert ids_of(events[:2]) <= _held(url)  # committed before the fault
        thread = writer._thread
        monkeypatch.undo()
        later = writer.submit([dict(e) for e in events[2:]], "hub")
        assert later.result(30).inserted == len(events) - 2
        assert writer._thread is thread and thread is not None and thread.is_alive()
        assert ids_of(events) == _held(url)
        assert len(forwarded) == len(events) - 2  # the later events were forwarded
    finally:
        writer.close()
        store.close()


def test_jobs_of_several_sites_share_one_transaction_and_a_faulty_one_fails_alone(tmp_path: Path) -> None:
    url, store, gated, writer = _gated_writer(tmp_path)
    good = bulk_events(4)
    faulty = {**good[0], "producer": "breaks the store"}
    try:
        blocker = threading.Thread(target=lambda: writer.submit([good[0]], "hub"))
        blocker.start()
        assert gated.entered.wait(30)
        mixed = writer.submit(good[1:4], "hub", ["a", None, "b"])
        refused = writer.submit([faulty], "hub")
        plain = writer.submit(good[4:], "c")
        calls_before = gated.calls
        gated.release.set()
        blocker.join(30)
        assert mixed.result(30).inserted == 3 and plain.result(30).inserted == 4
        with pytest.raises(TypeError):
            refused.result(30)
        # the three jobs were tried together once, then each alone
        assert gated.calls == calls_before + 1 + 3
        assert _held(url) == ids_of(good)
        with pytest.raises(ValueError):
            writer.submit(good[:2], "hub", ["a"])
    finally:
        gated.release.set()
        writer.close()
        store.close()
    with open_store(url) as reopened:
        sites = {e.id: e.site for e in reopened.iter_events()}
    assert [sites[next(iter(ids_of([e])))] for e in good[1:4]] == ["a", None, "b"]


class _FailingOn:
    """A local destination whose ``n``-th receive fails (the pages before it are stored)."""

    def __init__(self, inner: LocalEndpoint, n: int) -> None:
        self.inner = inner
        self.key = inner.key
        self.n = n
        self.calls = 0
        self.lock = threading.Lock()

    def page(self, after: int, filt: Any, limit: int) -> Any:
        return self.inner.page(after, filt, limit)

    def fetch(self, ids: Sequence[str], filt: Any) -> list[Shipped]:
        return self.inner.fetch(ids, filt)

    def missing(self, ids: Sequence[str]) -> list[str]:
        return self.inner.missing(ids)

    def receive(self, shipped: Sequence[Shipped]) -> int:
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == self.n:
            raise OSError("destination went away")
        return self.inner.receive(shipped)


def test_pipelined_transfer_keeps_the_cursor_behind_what_is_stored(tmp_path: Path) -> None:
    events = bulk_events(250)  # 500 events: 5 pages of 100
    src_url, dst_url = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    src, dst = open_store(src_url), open_store(dst_url)
    src.ingest(events)
    source, sink = LocalEndpoint(src), LocalEndpoint(dst)
    log = SyncLog(src_url)
    try:
        with pytest.raises(OSError):
            transfer(source, _FailingOn(sink, 3), log=log, peer="b", direction="push", page_size=100)
        position = log.get_cursor("b", "push")
        stored_seqs = {e.seq for e in src.iter_events() if e.id in _held(dst_url)}
        # The cursor never passes an event the destination lacks: everything up to it is stored.
        assert all(seq in stored_seqs for seq in range(1, position + 1))
        assert position < 500
        rest = transfer(source, sink, log=log, peer="b", direction="push", page_size=100)
        assert rest.position == 500 and _held(dst_url) == ids_of(events)
        assert rest.scanned == 500 - position
    finally:
        log.close()
        source.close()
        sink.close()
        src.close()
        dst.close()


def test_a_sqlite_server_writes_through_its_own_connection_in_every_lifespan(tmp_path: Path) -> None:
    """On SQLite the server's writer ingests through a ``sqlite3`` connection of its own (no pool checkout and reset
    per request); the rows are the SQL store's, and an app whose lifespan runs again (as test clients run it) opens
    a new one rather than writing through the closed one."""
    from srvkit import AsgiClient, auth, make_token

    from metatrail.server.app import create_app
    from metatrail.server.config import ServerConfig
    from metatrail.store.sqlite_writer import SqliteWriter

    url = f"sqlite:///{tmp_path / 'server.db'}"
    app = create_app(ServerConfig(store=url))
    token = make_token(url)
    events = bulk_events(2, pipeline="own-connection")
    for lifespan, part in enumerate((events[:2], events[2:])):
        client = AsgiClient(app)
        try:
            writer_store = app.state.services.writer.store
            assert isinstance(writer_store, SqliteWriter) and not writer_store.closed, lifespan
            for event in part:
                answer = client.post("/api/v1/lineage", json=event,
                                     headers={**auth(token), "Accept": "application/json"})
                assert answer.status_code == 201 and answer.json()["stored"] is True, answer.text
        finally:
            client.close()
        assert writer_store.closed  # released with the lifespan
    assert _held(url) == ids_of(events)
    store = open_store(url)
    try:
        runs = store.list_runs(pipeline="own-connection")
        assert sorted(r["state"] for r in runs) == ["completed", "completed"]
        assert all(r["event_count"] == 2 for r in runs)
    finally:
        store.close()


def test_a_checkpoint_overtaken_by_commits_is_finished_so_the_wal_starts_over(tmp_path: Path) -> None:
    """Under a steady stream of writes a passive checkpoint never copies the whole WAL (commits land while it
    copies), so SQLite never starts the WAL over and it grows by every commit. A checkpoint overtaken by a commit is
    finished with the writer held; the next commit then starts the WAL over."""
    import sqlite3

    from metatrail.store.sql import SqlStore
    from metatrail.store.sqlite_writer import SqliteWriter

    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    store = SqlStore(url, wal_autocheckpoint=1_000_000)  # no commit checkpoints on its own here
    own = SqliteWriter.open(url, wal_autocheckpoint=1_000_000)
    assert own is not None
    events = bulk_events(12)
    passes: list[tuple[int, int] | None] = []
    writer: IngestWriter

    def checkpoint() -> tuple[int, int] | None:
        result = store.checkpoint()
        passes.append(result)
        if len(passes) == 1:  # a commit lands while the first pass copies
            assert writer.submit(events[20:22], "hub").result(30).inserted == 2
        return result

    writer = IngestWriter(own, checkpoint=checkpoint)
    assert writer.checkpointer is not None
    writer.checkpointer.close()  # its thread stays out: this test runs the checkpoint itself, at the moment it wants
    try:
        assert writer.submit(events[:20], "hub").result(30).inserted == 20
        writer.checkpointer.checkpoint()  # what the thread runs
        assert len(passes) == 2  # the commit that overtook the first pass was copied by a second
        assert writer.submit(events[22:], "hub").result(30).inserted == 2
        with sqlite3.connect(db) as probe:
            _busy, frames, _copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        # Only the last commit's frames: the WAL started over after the second pass (it held 22 events' before).
        assert 0 < frames < passes[0][0] / 2  # type: ignore[index]
        assert _held(url) == ids_of(events)
    finally:
        writer.close()
        own.close()
        store.close()


def _hold_write_lock(url: str) -> sqlite3.Connection:
    """Take the store's write lock on another connection, as an admin rebuild, a command writing the same file or
    another process does."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_a_lone_event_never_waits_on_the_callers_thread_for_a_lock_held_elsewhere(tmp_path: Path) -> None:
    """A lone event is written inline (on the server's event loop) only when the store's write lock is free; held
    by another connection, the job goes to the writer thread, which waits for it, and the caller returns at once."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = SqliteWriter.open(url)
    assert store is not None
    writer = IngestWriter(store, inline_max=1)  # type: ignore[arg-type]
    events = bulk_events(1)
    holder = _hold_write_lock(url)
    try:
        released = threading.Timer(20, lambda: holder.execute("COMMIT"))  # the previous code waited till then
        released.start()
        future = writer.submit([events[0]], "hub")
        assert not future.done()  # handed to the writer thread: the caller did not wait for the lock
        released.cancel()
        holder.execute("COMMIT")
        assert future.result(30).inserted == 1
        deadline = time.monotonic() + 30
        while writer._busy and time.monotonic() < deadline:  # the thread answers, then lets go of the writer
            time.sleep(0.01)
        assert writer.submit([events[1]], "hub").done()  # the lock is free again: inline, as before
        assert _held(url) == ids_of(events)
    finally:
        holder.close()
        writer.close()
        store.close()
