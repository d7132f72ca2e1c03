"""Fan-out: every newly ingested event forwarded through openlineage-python's transports, configured the way that
client is configured; a failing target never loses or blocks ingest."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest
from openlineage.client.serde import Serde
from srvkit import AsgiClient, auth, bulk_events, live, make_token, wait_for

from metatrail.openlineage.events import event_id
from metatrail.server.app import create_app
from metatrail.server.config import ServerConfig
from metatrail.store import open_store


def _client(store_url: str, forward: object) -> tuple[AsgiClient, str]:
    config = ServerConfig(store=store_url, forward=forward, auth_cache_ttl=0)  # type: ignore[arg-type]
    token = make_token(config.store, "write")
    return AsgiClient(create_app(config)), token


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_forward_to_a_file_transport(store_url: str, tmp_path: Path) -> None:
    out = tmp_path / "forwarded.jsonl"
    client, token = _client(store_url, {"transport": {"type": "file", "log_file_path": str(out), "append": True}})
    try:
        events = bulk_events(10)
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 20
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 0
        assert wait_for(lambda: len(_lines(out)) == 20, 10)
        assert {e["run"]["runId"] for e in _lines(out)} == {e["run"]["runId"] for e in events}
    finally:
        client.close()
    assert len(_lines(out)) == 20  # duplicates are not forwarded again


def test_forward_configured_like_the_client(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "env.jsonl"
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(out))
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    client, token = _client(store_url, True)
    try:
        event = bulk_events(1)[0]
        assert client.post("/api/v1/lineage", json=event, headers=auth(token)).status_code == 201
        assert wait_for(lambda: len(_lines(out)) == 1, 10)
        assert event_id(_lines(out)[0]) != "" and _lines(out)[0]["run"]["runId"] == event["run"]["runId"]
    finally:
        client.close()


def test_failing_forward_target_never_blocks_or_loses_ingest(store_url: str) -> None:
    client, token = _client(store_url, {"transport": {"type": "http", "url": "http://127.0.0.1:9", "timeout": 1,
                                                     "retry": {"total": 0}}})
    try:
        events = bulk_events(25)
        for i in range(0, 50, 10):
            r = client.post("/api/v1/lineage/batch", json=events[i : i + 10], headers=auth(token))
            assert r.status_code == 201 and r.json()["inserted"] == 10
        forwarder = client.app.state.services.forwarder
        assert wait_for(lambda: forwarder.failed == 50, 30), forwarder.stats()
        admin = make_token(client.app.state.services.config.store, "admin")
        status = client.get("/api/v1/admin/status", headers=auth(admin)).json()
        assert status["forward"]["failed"] == 50 and status["forward"]["sent"] == 0
        assert client.get("/api/v1/stats", headers=auth(make_token(client.app.state.services.config.store,
                                                                    "read"))).json()["events"] == 50
    finally:
        client.close()


def test_forward_over_http_to_another_openlineage_backend(store_url: str, tmp_path: Path) -> None:
    # The backend is a second metatrail server (its own store), reached by openlineage-python's HTTP transport with
    # a bearer token, as a Marquez would be.
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0)
    backend_token, backend_reader = make_token(backend_config.store, "write"), make_token(backend_config.store, "read")
    with live(backend_config) as backend:
        client, token = _client(store_url, {"transport": {"type": "http", "url": backend.url, "timeout": 10,
                                                          "auth": {"type": "api_key", "apiKey": backend_token}}})
        try:
            events = bulk_events(10)
            assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 20
            assert client.post("/api/v1/lineage", json=events[0], headers=auth(token)).status_code == 201  # again
            forwarder = client.app.state.services.forwarder
            assert wait_for(lambda: forwarder.sent + forwarder.failed >= 20 and forwarder._queue.unfinished_tasks == 0,
                            30), forwarder.stats()
            assert (forwarder.sent, forwarder.failed) == (20, 0)  # the event sent again is not forwarded again
        finally:
            client.close()
        held = open_store(backend_config.store)
        try:
            # Each event once, as openlineage-python serialises it (it leaves null fields out, so the backend's
            # ids differ from ours): nothing else changed on the way.
            assert sorted(orjson.dumps(e.body, option=orjson.OPT_SORT_KEYS) for e in held.iter_events()) == \
                sorted(orjson.dumps(Serde.to_dict(e), option=orjson.OPT_SORT_KEYS) for e in events)
        finally:
            held.close()
        stats = httpx.get(f"{backend.url}/api/v1/stats", headers=auth(backend_reader), timeout=10).json()
        assert stats["events"] == 20 and stats["runs"] == 10


def test_a_hanging_forward_target_never_blocks_ingest(store_url: str) -> None:
    # A target that accepts the connection and never answers: ingest goes on at its own pace, and each forward
    # ends at the transport's timeout as a failure, counted.
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(64)
    port = hanging.getsockname()[1]
    client, token = _client(store_url, {"transport": {"type": "http", "url": f"http://127.0.0.1:{port}",
                                                      "timeout": 1, "retry": {"total": 0}}})
    try:
        events = bulk_events(10)
        for i in range(0, 20, 5):
            started = time.monotonic()
            r = client.post("/api/v1/lineage/batch", json=events[i : i + 5], headers=auth(token))
            assert r.status_code == 201 and r.json()["inserted"] == 5
            assert time.monotonic() - started < 5  # not held by the forward in progress
        forwarder = client.app.state.services.forwarder
        assert wait_for(lambda: forwarder.failed >= 1, 30), forwarder.stats()
        reader = make_token(client.app.state.services.config.store, "read")
        assert client.get("/api/v1/stats", headers=auth(reader)).json()["events"] == 20
    finally:
        client.close()
        hanging.close()
