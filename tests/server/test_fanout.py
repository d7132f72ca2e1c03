"""Fan-out: every newly ingested event forwarded through openlineage-python's transports, configured the way that
client is configured; a failing target never loses or blocks ingest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from srvkit import AsgiClient, auth, bulk_events, make_token, wait_for

from metatrail.openlineage.events import event_id
from metatrail.server.app import create_app
from metatrail.server.config import ServerConfig


def _client(tmp_path: Path, forward: object) -> tuple[AsgiClient, str]:
    config = ServerConfig(store=f"sqlite:///{tmp_path / 'server.db'}", forward=forward, auth_cache_ttl=0)  # type: ignore[arg-type]
    token = make_token(config.store, "write")
    return AsgiClient(create_app(config)), token


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_forward_to_a_file_transport(tmp_path: Path) -> None:
    out = tmp_path / "forwarded.jsonl"
    client, token = _client(tmp_path, {"transport": {"type": "file", "log_file_path": str(out), "append": True}})
    try:
        events = bulk_events(10)
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 20
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 0
        assert wait_for(lambda: len(_lines(out)) == 20, 10)
        assert {e["run"]["runId"] for e in _lines(out)} == {e["run"]["runId"] for e in events}
    finally:
        client.close()
    assert len(_lines(out)) == 20  # duplicates are not forwarded again


def test_forward_configured_like_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "env.jsonl"
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(out))
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    client, token = _client(tmp_path, True)
    try:
        event = bulk_events(1)[0]
        assert client.post("/api/v1/lineage", json=event, headers=auth(token)).status_code == 201
        assert wait_for(lambda: len(_lines(out)) == 1, 10)
        assert event_id(_lines(out)[0]) != "" and _lines(out)[0]["run"]["runId"] == event["run"]["runId"]
    finally:
        client.close()


def test_failing_forward_target_never_blocks_or_loses_ingest(tmp_path: Path) -> None:
    client, token = _client(tmp_path, {"transport": {"type": "http", "url": "http://127.0.0.1:9", "timeout": 1,
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
