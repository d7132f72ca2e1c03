"""A token limited to some pipelines, racing other writers: its check of a run's stored pipeline and its write are one
step, so a run another writer stores under another pipeline meanwhile is not joined.

The races are made deterministic with the database's own write lock, held by the test: the server's writer waits on
it, requests queue behind it (observed through the writer's count of waiting events), and the test lets go when the
order it wants is set up."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import httpx
import psycopg
from conftest import Tokens
from srvkit import AsgiClient, auth, bulk_events, ids_of, make_token

from metatrail.openlineage.events import iso_time
from metatrail.server.config import ServerConfig
from metatrail.store import dialect, ingest
from metatrail.store.sql import SqlStore


@contextmanager
def _writes_held(store_url: str) -> Iterator[None]:
    """Hold the store's write lock (reads go on): SQLite's writer lock, or an exclusive lock on PostgreSQL's events
    table. Every write of the server waits until the block ends."""
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(store_url[len("sqlite:///") :], isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with psycopg.connect(store_url.replace("postgresql+psycopg://", "postgresql://")) as pg:
        pg.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            pg.rollback()


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for an observable state of the server (not for a time: the deadline only ends a test that hangs)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class _Post(threading.Thread):
    """One request sent from its own thread (the test thread holds the lock the server waits on)."""

    def __init__(self, client: AsgiClient, path: str, body: Any, token: str) -> None:
        super().__init__(daemon=True)
        self.args_ = (client, path, body, token)
        self.response: httpx.Response | None = None
        self.start()

    def run(self) -> None:
        client, path, body, token = self.args_
        self.response = client.post(path, json=body, headers=auth(token))

    def result(self) -> httpx.Response:
        self.join(120)
        assert self.response is not None, "the request did not finish"
        return self.response


def _a_thread_in(function: Callable[..., Any]) -> bool:
    """Whether another thread is inside ``function`` now (past any look the server makes before it)."""
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        f: FrameType | None = frame
        while ident != me and f is not None:
            if f.f_code is function.__code__:
                return True
            f = f.f_back
    return False


def _public_events_of(run_id: str, t0: float) -> list[dict[str, Any]]:
    """A START and COMPLETE of pipeline ``public`` for ``run_id`` (a run id another writer may use too)."""
    events = bulk_events(1, pipeline="public", t0=t0, tag="planted")
    for e in events:
        e["run"]["runId"] = run_id
        e["inputs"][0]["name"] = "/planted/input.csv"
    return events


def test_a_run_stored_under_another_pipeline_between_check_and_write_is_not_joined(
        client: AsgiClient, tokens: Tokens, config: ServerConfig) -> None:
    """The race: the owner's events of run R (pipeline ``secret``) are being written; a token limited to ``public``
    sends an event of R while R is not yet stored. Checked before the hand-over to the writer, it passed and then
    joined R once the owner's commit was through (later in time, it even moved R into ``public``, the owner's
    parameters and all). Checked by the writer right before its write, it finds R stored under ``secret``: 403."""
    limited = make_token(config.store, "read,write", pipelines=["public"])
    writer = client.app.state.services.writer
    secret = bulk_events(1, pipeline="secret", t0=1.8e9, tag="api_key")
    rid = secret[0]["run"]["runId"]
    planted = _public_events_of(rid, t0=1.9e9)  # later than the owner's: it would decide R's pipeline
    with _writes_held(config.store):
        owner = _Post(client, "/api/v1/lineage/batch", secret, tokens.write)
        _until(lambda: writer.pending == 2, "the owner's events wait for the store")
        racer = _Post(client, "/api/v1/lineage/batch", planted, limited)
        _until(lambda: writer.pending == 4, "the restricted events wait behind them")
    assert owner.result().status_code == 201
    refused = racer.result()
    assert refused.status_code == 403 and refused.json()["error"] == "pipeline_forbidden", refused.text
    run = client.get(f"/api/v1/runs/{rid}", headers=auth(tokens.read)).json()
    assert (run["pipeline"], run["event_count"]) == ("secret", 2)  # nothing of the restricted writer's stored
    assert "/planted/input.csv" not in {e["name"] for e in run["inputs"]}
    assert client.get(f"/api/v1/runs/{rid}", headers=auth(limited)).status_code == 404


def test_a_run_a_restricted_writer_created_first_is_extended_by_its_owner(
        client: AsgiClient, tokens: Tokens, config: ServerConfig) -> None:
    """The other order, decided: a restricted writer stores run R first (under ``public``), and an unrestricted
    writer then adds R's events of ``secret``. The owner is not refused (else any token that can guess run ids could
    keep their owners out); R follows its latest event into ``secret``; from then on the restricted token neither
    reads R nor writes into it. What it wrote stays part of R, recorded under its own site (nothing is lost)."""
    limited = make_token(config.store, "read,write", site="peer", pipelines=["public"])
    writer = client.app.state.services.writer
    secret = bulk_events(1, pipeline="secret", t0=1.9e9, tag="api_key")
    rid = secret[0]["run"]["runId"]
    planted = _public_events_of(rid, t0=1.8e9)
    with _writes_held(config.store):
        first = _Post(client, "/api/v1/lineage/batch", planted, limited)
        _until(lambda: writer.pending == 2, "the restricted events wait for the store")
        owner = _Post(client, "/api/v1/lineage/batch", secret, tokens.write)
        _until(lambda: writer.pending == 4, "the owner's events wait behind them")
    assert first.result().status_code == 201
    assert owner.result().status_code == 201
    run = client.get(f"/api/v1/runs/{rid}", headers=auth(tokens.read)).json()
    assert (run["pipeline"], run["event_count"]) == ("secret", 4)
    assert client.get(f"/api/v1/runs/{rid}", headers=auth(limited)).status_code == 404
    events = client.get("/api/v1/events", params={"run_id": rid}, headers=auth(tokens.read)).json()["events"]
    assert {e["id"]: e["site"] for e in events if e["id"] in ids_of(planted)} == dict.fromkeys(ids_of(planted),
                                                                                               "peer")
    later = _public_events_of(rid, t0=2.0e9)[1]
    later["eventTime"] = iso_time(2.0e9)
    r = client.post("/api/v1/lineage", json=later, headers=auth(limited))
    assert r.status_code == 403 and r.json()["error"] == "pipeline_forbidden"


def test_a_run_another_process_is_storing_is_not_joined(client: AsgiClient, config: ServerConfig) -> None:
    """The race across processes: another process on the same database (a second server, a `metatrail push` into
    it) is inside its transaction storing run R under ``secret`` while a token limited to ``public`` writes into R
    through this server. This server's writer cannot see the other's uncommitted rows; the store's look, made under
    the locks that other transaction holds, sees them once it commits: 403, nothing of the restricted writer's
    stored."""
    limited = make_token(config.store, "read,write", pipelines=["public"])
    writer = client.app.state.services.writer
    secret = bulk_events(1, pipeline="secret", t0=1.8e9, tag="other-process")
    rid = secret[0]["run"]["runId"]
    planted = _public_events_of(rid, t0=1.9e9)
    other = SqlStore(config.store)
    try:
        name = other._engine.dialect.name
        with dialect.raw_transaction(other._engine) as cur:  # the other process's write, not yet committed
            stored = ingest.ingest_prepared(cur, name, ingest.prepare_batch(secret, "other", None), len(secret))
            assert stored.inserted == 2
            racer = _Post(client, "/api/v1/lineage/batch", planted, limited)
            ingest_of_writer = type(writer.store).ingest  # SQLite: the writer's own sqlite3 connection's
            _until(lambda: writer.pending == 2 and _a_thread_in(ingest_of_writer),
                   "the server's writer waits inside the store's ingest for the other transaction")
        refused = racer.result()
        assert refused.status_code == 403 and refused.json()["error"] == "pipeline_forbidden", refused.text
        run = other.get_run(rid)
        assert (run["pipeline"], run["event_count"]) == ("secret", 2)
    finally:
        other.close()
