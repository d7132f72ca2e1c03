"""The server's writer and pipelined sync: acknowledged means committed, whether a job was written inline (a lone
single event on SQLite) or group-committed by the writer thread; a refused event fails only its own request; a
pipelined transfer moves its cursor only past pages that are stored."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from srvkit import bulk_events, ids_of

from metatrail.errors import EventError
from metatrail.server.writer import IngestWriter
from metatrail.store import open_store
from metatrail.store.base import EventStore, IngestResult
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

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None) -> IngestResult:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(30)
        if any(e.get("producer") == "breaks the store" for e in events):
            raise TypeError("a value the driver cannot bind")  # not the store's fault, not an EventError either
        return self.inner.ingest(events, site=site, sites=sites)


def test_inline_write_is_committed_when_acknowledged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    writer = IngestWriter(store, inline_max=1)
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


def _gated_writer(tmp_path: Path) -> tuple[str, EventStore, _Gated, IngestWriter]:
    """A store, the same behind a gate, and a writer that writes a lone job inline (so the first job holds it)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
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
