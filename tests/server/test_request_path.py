"""The single-event request path's shortcuts keep the long way's behaviour: handlers called without FastAPI's
dependency machinery answer as before (and only those that qualify take the shortcut), the query-string NUL check
reads the raw bytes, and SQLite's WAL is checkpointed by a background thread rather than by a request's commit."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from srvkit import AsgiClient, auth, bulk_events, ids_of

from metatrail.server.app import _flatten, create_app
from metatrail.server.auth import PolicyRoute
from metatrail.server.config import ServerConfig
from metatrail.server.services import Services
from metatrail.server.writer import Checkpointer, IngestWriter
from metatrail.store import dialect, open_store
from metatrail.store.sql import SqlStore


def _routes(config: ServerConfig) -> dict[tuple[str, str], PolicyRoute]:
    app = create_app(config)
    return {(path, method): route for route in _flatten(list(app.routes)) if isinstance(route, PolicyRoute)
            for path in (route.path,) for method in route.methods}


def test_only_request_only_handlers_returning_a_response_are_called_directly(config: ServerConfig) -> None:
    routes = _routes(config)
    assert routes[("/api/v1/lineage", "POST")].direct_handler() is not None
    assert routes[("/api/v1/lineage/batch", "POST")].direct_handler() is not None
    # Parameters FastAPI validates (path, query) or a dict FastAPI serialises keep FastAPI's handler.
    assert routes[("/api/v1/runs/{run_id}", "GET")].direct_handler() is None
    assert routes[("/api/v1/runs", "GET")].direct_handler() is None
    assert routes[("/api/v1/stats", "GET")].direct_handler() is None


def test_direct_handlers_answer_as_before(client: AsgiClient, tokens: object) -> None:
    write = {**auth(tokens.write), "Accept": "application/json"}  # type: ignore[attr-defined]
    event = bulk_events(1)[0]
    first = client.post("/api/v1/lineage", json=event, headers=write)
    assert first.status_code == 201 and first.json()["stored"] is True and first.json()["kind"] == "RunEvent"
    again = client.post("/api/v1/lineage", json=event, headers=write)
    assert again.status_code == 201 and again.json() == {**first.json(), "stored": False}
    assert client.post("/api/v1/lineage", json={**event, "run": {}}, headers=write).status_code == 422
    assert client.post("/api/v1/lineage", content=b"{", headers=write).status_code == 400
    # As Marquez answers, and what OpenLineage producers (which ask for no JSON) get: 201 and no body.
    plain = client.post("/api/v1/lineage", json=bulk_events(1, tag="plain")[0],
                        headers={**auth(tokens.write), "Accept": "*/*"})  # type: ignore[attr-defined]
    assert plain.status_code == 201 and plain.content == b""
    assert client.post("/api/v1/lineage", json=event).status_code == 401
    assert client.post("/api/v1/lineage", json=event, headers=auth(tokens.read)).status_code == 403  # type: ignore[attr-defined]
    batch = client.post("/api/v1/lineage/batch", json=bulk_events(2, tag="b"), headers=write)
    assert batch.status_code == 201 and batch.json() == {"received": 4, "inserted": 4}


@pytest.mark.parametrize("query", ["a=%00", "a=x%00y", "%00", "b=1&a=%00"])
def test_nul_in_the_raw_query_string_is_refused(client: AsgiClient, tokens: object, query: str) -> None:
    r = client.post(f"/api/v1/lineage?{query}", json=bulk_events(1)[0], headers=auth(tokens.write))  # type: ignore[attr-defined]
    assert r.status_code == 400 and r.json()["error"] == "bad_query"


def _wal_frames(path: Path) -> int:
    size = path.with_name(path.name + "-wal").stat().st_size
    return max(0, (size - 32) // (4096 + 24))


def test_server_store_checkpoints_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    svc = Services.open(ServerConfig(store=f"sqlite:///{db}"))
    try:
        assert svc.writer.checkpointer is not None
        raw = svc.store._engine.raw_connection()  # type: ignore[attr-defined]
        try:
            # A commit checkpoints only as a safety net, far past the background thread's pace.
            assert raw.cursor().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == dialect.WAL_AUTOCHECKPOINT * 4
        finally:
            raw.close()
        events = bulk_events(5)
        for event in events:
            assert svc.writer.submit([event], "hub").result(30).inserted == 1
        deadline = time.monotonic() + 30
        while svc.writer.checkpointer.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.writer.checkpointer.runs >= 1
        # What was checkpointed is in the database file itself: a reader that ignores the WAL sees it.
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] >= 1
        assert ids_of(events) <= {e.id for e in svc.store.iter_events()}
    finally:
        svc.close()


def test_postgresql_server_has_no_checkpointer(store_url: str) -> None:
    svc = Services.open(ServerConfig(store=store_url))
    try:
        assert (svc.writer.checkpointer is None) == store_url.startswith("postgresql")
    finally:
        svc.close()


def test_checkpoint_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SqlStore(f"sqlite:///{db}", wal_autocheckpoint=1_000_000)
    try:
        store.ingest(bulk_events(20))
        assert _wal_frames(db) > 0
        result = store.checkpoint()
        assert result is not None
        log, copied = result
        assert log > 0 and copied == log
    finally:
        store.close()


def test_checkpointer_runs_after_pokes_at_most_once_per_interval() -> None:
    calls: list[float] = []
    ran = threading.Event()

    def checkpoint() -> None:
        calls.append(time.monotonic())
        ran.set()

    cp = Checkpointer(checkpoint, interval=0.3)
    try:
        assert not ran.wait(0.1)  # nothing committed, nothing to do
        for _ in range(50):
            cp.poke()
        assert ran.wait(10)
        time.sleep(0.1)
        assert len(calls) == 1  # a burst of commits costs one checkpoint
        cp.poke()
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.29
    finally:
        cp.close()
    assert cp._thread is not None and not cp._thread.is_alive()


def test_a_failing_checkpoint_never_fails_a_write(tmp_path: Path) -> None:
    def checkpoint() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    writer = IngestWriter(store, inline_max=1, checkpoint=checkpoint)
    try:
        events = bulk_events(2)
        for event in events:
            assert writer.submit([event], "hub").result(30).inserted == 1
    finally:
        writer.close()
        store.close()


# -- the hot routes (metatrail.server.hotpath) ---------------------------------------------------------------------
def test_hot_routes_skip_fastapis_router_and_other_routes_do_not(config: ServerConfig, tokens: object,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(config)
    routed: list[tuple[str, str]] = []
    inner = app.router.middleware_stack

    async def counting(scope: dict, receive: object, send: object) -> None:
        routed.append((scope["method"], scope["path"]))
        await inner(scope, receive, send)  # type: ignore[operator]

    monkeypatch.setattr(app.router, "middleware_stack", counting)
    client = AsgiClient(app)
    try:
        write = auth(tokens.write)  # type: ignore[attr-defined]
        assert client.post("/api/v1/lineage", json=bulk_events(1)[0], headers=write).status_code == 201
        assert client.post("/api/v1/lineage/batch", json=bulk_events(1, tag="b"), headers=write).status_code == 201
        assert client.post("/api/v1/sync/push", json={"events": bulk_events(1, tag="p")},
                           headers=write).status_code == 201
        assert routed == []
        # The same path with another method, and every other route, still go through FastAPI.
        assert client.get("/api/v1/lineage?key=md5:00000000", headers=auth(tokens.read)).status_code == 200  # type: ignore[attr-defined]
        assert client.get("/api/v1/stats", headers=auth(tokens.read)).status_code == 200  # type: ignore[attr-defined]
        assert routed == [("GET", "/api/v1/lineage"), ("GET", "/api/v1/stats")]
    finally:
        client.close()


def test_hot_route_errors_use_the_apps_handlers(config: ServerConfig, tokens: object,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from metatrail.errors import StoreError
    from metatrail.server.routes import ingest

    def failing(kind: type[Exception]) -> object:
        def check(*_args: object, **_kwargs: object) -> object:
            raise kind("injected")
        return check

    write = auth(tokens.write)  # type: ignore[attr-defined]
    event = bulk_events(1)[0]
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        # An error with a handler of its own: answered by that handler (the store's errors: 503, retry later).
        monkeypatch.setattr(ingest, "checked_event", failing(StoreError))
        r = client.post("/api/v1/lineage", json=event, headers=write)
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable" and r.headers["retry-after"] == "1"
        # Anything else: the catch-all answer every route gives (500, no internals in the body).
        monkeypatch.setattr(ingest, "checked_event", failing(RuntimeError))
        r = client.post("/api/v1/lineage", json=event, headers=write)
        assert r.status_code == 500
        assert r.json() == {"error": "internal", "message": "internal error; see the server log"}
        monkeypatch.undo()
        # The body-size cap still stands in front of the hot routes.
        too_big = b"[" + b" " * (config.max_batch_bytes + 1) + b"]"
        r = client.post("/api/v1/lineage/batch", content=too_big, headers={**write, "content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/api/v1/lineage", json=event, headers=write).status_code == 201
    assert open_store(config.store).stats()["events"] == 1


def test_hot_routes_must_exist(config: ServerConfig) -> None:
    from metatrail.server.hotpath import hot_handlers

    app = create_app(config)
    with pytest.raises(RuntimeError, match="/api/v1/nowhere"):
        hot_handlers(_flatten(list(app.routes)), [("POST", "/api/v1/nowhere")])


def test_sqlite_pool_hands_back_the_connection_that_committed_last(tmp_path: Path) -> None:
    # Last in, first out: the connection that just committed still holds its page cache; any other would re-read it.
    engine = dialect.make_engine(f"sqlite:///{tmp_path / 'pool.db'}")
    try:
        first, second = engine.raw_connection(), engine.raw_connection()  # the pool now holds two connections
        first_dbapi, second_dbapi = first.driver_connection, second.driver_connection
        second.close()
        first.close()
        for _ in range(3):
            again = engine.raw_connection()
            assert again.driver_connection is first_dbapi
            again.close()
        assert first_dbapi is not second_dbapi
    finally:
        engine.dispose()
