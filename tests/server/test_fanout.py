"""Fan-out: every newly ingested event forwarded through openlineage-python's transports, configured the way that
client is configured; a failing target never loses or blocks ingest, and loses no event either: what it could not
take is forwarded once it can, across restarts of the server."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openlineage.client.serde import Serde
from srvkit import AsgiClient, FaultProxy, auth, bulk_events, live, make_token, wait_for

from metatrail.openlineage.events import event_id
from metatrail.server.app import create_app
from metatrail.server.config import ServerConfig
from metatrail.store import open_store


def _client(store_url: str, forward: object, **settings: Any) -> tuple[AsgiClient, str]:
    config = ServerConfig(store=store_url, forward=forward, auth_cache_ttl=0, **settings)  # type: ignore[arg-type]
    token = make_token(config.store, "write")
    return AsgiClient(create_app(config)), token


def _status(client: AsgiClient) -> dict[str, Any]:
    admin = make_token(client.app.state.services.config.store, "admin")
    return client.get("/api/v1/admin/status", headers=auth(admin)).json()["forward"]


def _keys(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((e["run"]["runId"], e["eventType"]) for e in events)


def _held_keys(store_url: str) -> list[tuple[str, str]]:
    """The events a backend's store holds, as :func:`_keys`."""
    held = open_store(store_url)
    try:
        return _keys([e.body for e in held.iter_events()])
    finally:
        held.close()


def _lines(path: Path) -> list[dict]:
    """The events a file transport wrote so far: a line it is still writing is not one yet."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def test_forward_to_a_file_transport(store_url: str, tmp_path: Path) -> None:
    out = tmp_path / "forwarded.jsonl"
    client, token = _client(store_url, {"transport": {"type": "file", "log_file_path": str(out), "append": True}})
    try:
        events = bulk_events(10)
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 20
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 0
        assert wait_for(lambda: len(_lines(out)) == 20, 60)
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
        assert wait_for(lambda: len(_lines(out)) == 1, 60)
        assert event_id(_lines(out)[0]) != "" and _lines(out)[0]["run"]["runId"] == event["run"]["runId"]
    finally:
        client.close()


def test_a_target_that_is_down_never_blocks_ingest_and_its_events_wait(store_url: str) -> None:
    client, token = _client(store_url, {"transport": {"type": "http", "url": "http://127.0.0.1:9", "timeout": 1,
                                                     "retry": {"total": 0}}}, forward_retry_max_s=0.2)
    try:
        events = bulk_events(25)
        for i in range(0, 50, 10):
            r = client.post("/api/v1/lineage/batch", json=events[i : i + 10], headers=auth(token))
            assert r.status_code == 201 and r.json()["inserted"] == 10
        forwarder = client.app.state.services.forwarder
        assert wait_for(lambda: forwarder.failed >= 3, 30), forwarder.stats()
        status = _status(client)
        assert status["sent"] == 0 and status["refused"] == 0 and status["pending"] == 50
        assert "ConnectionError" in status["last_error"]
        assert client.get("/api/v1/stats", headers=auth(make_token(client.app.state.services.config.store,
                                                                    "read"))).json()["events"] == 50
    finally:
        client.close()


def test_events_wait_out_an_outage_and_a_restart_then_go_out_once(store_url: str, tmp_path: Path) -> None:
    # The target is a file in a directory that does not exist yet: every write fails until it does. The server is
    # closed during the outage and opened again on the same store: the events it could not forward are sent then.
    out = tmp_path / "later" / "forwarded.jsonl"
    forward = {"transport": {"type": "file", "log_file_path": str(out), "append": True}}
    client, token = _client(store_url, forward, forward_retry_max_s=0.2)
    first = bulk_events(10)
    try:
        assert client.post("/api/v1/lineage/batch", json=first, headers=auth(token)).json()["inserted"] == 20
        forwarder = client.app.state.services.forwarder
        assert wait_for(lambda: forwarder.failed >= 2, 30), forwarder.stats()
        assert _status(client)["pending"] == 20
    finally:
        client.close()
    out.parent.mkdir()
    client, token = _client(store_url, forward, forward_retry_max_s=0.2)
    try:
        assert wait_for(lambda: len(_lines(out)) >= 20, 30), client.app.state.services.forwarder.stats()
        later = bulk_events(2, tag="later")
        assert client.post("/api/v1/lineage/batch", json=later, headers=auth(token)).json()["inserted"] == 4
        assert wait_for(lambda: len(_lines(out)) >= 24, 30)
        assert _status(client)["pending"] == 0
    finally:
        client.close()
    assert _keys(_lines(out)) == _keys(first + later)  # each event once, none lost


def test_events_committed_before_a_fault_of_ours_are_forwarded_all_the_same(store_url: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug past the commit (here: answering the request) keeps the writer from waking the forwarder; the request
    # fails (503; the client retries) but the events are stored, and the forwarder finds them in the log.
    import metatrail.server.writer as writer_module

    out = tmp_path / "forwarded.jsonl"
    client, token = _client(store_url, {"transport": {"type": "file", "log_file_path": str(out), "append": True}},
                            forward_poll_s=0.2, inline_events=0)
    try:
        def broken_result(**counts: int) -> object:
            raise RuntimeError("a bug past the commit")

        monkeypatch.setattr(writer_module, "IngestResult", broken_result)
        events = bulk_events(5)
        r = client.post("/api/v1/lineage/batch", json=events, headers=auth(token))
        assert r.status_code == 503
        monkeypatch.undo()
        assert wait_for(lambda: len(_lines(out)) >= 10, 30), client.app.state.services.forwarder.stats()
        assert _keys(_lines(out)) == _keys(events)
    finally:
        client.close()


def test_an_event_the_target_refuses_is_passed_over(store_url: str, tmp_path: Path) -> None:
    # The target, a second metatrail server, takes no event over 4 KiB (413); this server takes it. The refused
    # event is counted and passed over, and the events after it still go out.
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0,
                                  max_event_bytes=4096)
    backend_token, backend_reader = make_token(backend_config.store, "write"), make_token(backend_config.store, "read")
    with live(backend_config) as backend:
        client, token = _client(store_url, {"transport": {"type": "http", "url": backend.url, "timeout": 10,
                                                          "retry": {"total": 0},
                                                          "auth": {"type": "api_key", "apiKey": backend_token}}})
        try:
            small = bulk_events(2)
            big = bulk_events(1, tag="big")[0]
            big["run"]["facets"]["bulky"] = {"_producer": "https://example.org/test", "_schemaURL":
                                             "https://example.org/bulky.json", "padding": "x" * 8000}
            for event in (small[0], big, *small[1:]):
                assert client.post("/api/v1/lineage", json=event, headers=auth(token)).status_code == 201
            forwarder = client.app.state.services.forwarder
            assert wait_for(lambda: forwarder.sent + forwarder.refused == 5, 30), forwarder.stats()
            assert (forwarder.sent, forwarder.refused, forwarder.failed) == (4, 1, 0)
            assert f"HTTP 413 for event {event_id(big)}" in forwarder.last_error
        finally:
            client.close()
        held = httpx.get(f"{backend.url}/api/v1/stats", headers=auth(backend_reader), timeout=10).json()
        assert held["events"] == 4


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
            assert wait_for(lambda: forwarder.sent >= 20 and forwarder.stats()["pending"] == 0, 30), forwarder.stats()
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


def test_a_cursor_past_the_end_of_the_log_goes_back_to_its_end(store_url: str, tmp_path: Path) -> None:
    # A store restored from an older copy hands out log positions its forward cursor has passed: without a check,
    # the events stored next would not be forwarded until the log grew past the old cursor.
    from metatrail.server.fanout import DIRECTION
    from metatrail.sync import SyncLog

    out = tmp_path / "forwarded.jsonl"
    open_store(store_url).close()  # migrated
    sync_log = SyncLog(store_url)
    try:
        sync_log.set_cursor(f"forward:file:{out}", DIRECTION, "", 10_000)
    finally:
        sync_log.close()
    client, token = _client(store_url, {"transport": {"type": "file", "log_file_path": str(out), "append": True}})
    try:
        assert client.app.state.services.forwarder.target == f"forward:file:{out}"
        events = bulk_events(2)
        assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).json()["inserted"] == 4
        assert wait_for(lambda: len(_lines(out)) >= 4, 30), client.app.state.services.forwarder.stats()
        assert _keys(_lines(out)) == _keys(events)
    finally:
        client.close()


@pytest.mark.parametrize(("status", "refused"), [(400, True), (413, True), (415, True), (422, True), (401, False),
                                                  (403, False), (404, False), (429, False), (500, False),
                                                  (503, False)])
def test_only_an_answer_about_the_event_itself_passes_it_over(status: int, refused: bool) -> None:
    # What openlineage-python's HTTP transport raises for an answer (requests' HTTPError, raise_for_status): a
    # credential, an address or an outage is retried; an event the target cannot take is passed over.
    import requests

    from metatrail.server.fanout import refused_status

    response = requests.Response()
    response.status_code = status
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        assert (refused_status(exc) == status) is refused
    else:
        raise AssertionError("raise_for_status raised nothing")
    assert refused_status(ConnectionRefusedError()) is None
    try:  # a composite transport with continue_on_failure false raises its own error from its part's
        try:
            response.raise_for_status()
        except requests.HTTPError as part_error:
            raise RuntimeError("Transport http failed to emit event") from part_error
    except RuntimeError as exc:
        assert (refused_status(exc) == status) is refused


def test_a_backend_behind_outages_5xx_429_and_a_hang_gets_every_event_once(store_url: str, tmp_path: Path) -> None:
    # The target (a second metatrail server, as a Marquez would be) sits behind a proxy that refuses connections,
    # then answers 503/500/429, then hangs past the transport's timeout, then comes back: every event ingested
    # meanwhile reaches it, once, in the order of the log.
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0)
    backend_token, backend_reader = make_token(backend_config.store, "write"), make_token(backend_config.store, "read")
    with live(backend_config) as backend:
        proxy = FaultProxy(backend.url)
        proxy.down()
        client, token = _client(store_url, {"transport": {"type": "http", "url": proxy.url, "timeout": 1,
                                                          "retry": {"total": 0},
                                                          "auth": {"type": "api_key", "apiKey": backend_token}}},
                                forward_retry_max_s=0.2)
        events = bulk_events(15)
        try:
            forwarder = client.app.state.services.forwarder
            assert client.post("/api/v1/lineage/batch", json=events[:10], headers=auth(token)).status_code == 201
            assert wait_for(lambda: forwarder.failed >= 2, 30), forwarder.stats()  # refused connections
            proxy.up()
            proxy.statuses = [503, 500, 429]
            assert client.post("/api/v1/lineage/batch", json=events[10:20], headers=auth(token)).status_code == 201
            assert wait_for(lambda: forwarder.sent >= 5, 30), forwarder.stats()
            proxy.mode = "hang"
            hung = proxy.faults
            assert client.post("/api/v1/lineage/batch", json=events[20:], headers=auth(token)).status_code == 201
            assert wait_for(lambda: proxy.faults > hung, 30), forwarder.stats()
            proxy.mode = "ok"
            assert wait_for(lambda: forwarder.stats()["pending"] == 0, 60), forwarder.stats()
            assert forwarder.sent == 30 and forwarder.refused == 0 and forwarder.failed >= 6
        finally:
            client.close()
            proxy.close()
        held = open_store(backend_config.store)
        try:
            bodies = [e.body for e in held.iter_events()]
        finally:
            held.close()
        assert _keys(bodies) == _keys(events)  # each once
        stats = httpx.get(f"{backend.url}/api/v1/stats", headers=auth(backend_reader), timeout=10).json()
        assert stats["events"] == 30


def test_a_targets_cursor_key_names_where_it_sends_without_credentials() -> None:
    # The key is stored in the store and shown in the admin status: a password in the target's URL stays out of it.
    from openlineage.client import OpenLineageClient

    from metatrail.server.fanout import target_key

    with_password = OpenLineageClient(config={"transport": {"type": "http",
                                                            "url": "http://ops:s3cret@marquez.example:5000"}})
    plain = OpenLineageClient(config={"transport": {"type": "http", "url": "http://marquez.example:5000"}})
    assert target_key(with_password.transport) == target_key(plain.transport) == "forward:http:http://marquez.example:5000"
    to_file = OpenLineageClient(config={"transport": {"type": "file", "log_file_path": "/srv/ol/events.jsonl"}})
    assert target_key(to_file.transport) == "forward:file:/srv/ol/events.jsonl"


def test_an_http_target_gets_runs_side_by_side_each_in_log_order(store_url: str, tmp_path: Path) -> None:
    # A backend 50 ms away (a Marquez across a network): one request at a time would forward 20 events a second.
    # Different runs go out side by side, at most `forward_concurrency` at once; each run's START before its
    # COMPLETE; every event once.
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0)
    backend_token = make_token(backend_config.store, "write")
    with live(backend_config) as backend:
        proxy = FaultProxy(backend.url)
        proxy.mode, proxy.delay = "slow", 0.05
        client, token = _client(store_url, {"transport": {"type": "http", "url": proxy.url, "timeout": 10,
                                                          "auth": {"type": "api_key", "apiKey": backend_token}}},
                                forward_concurrency=4)
        events = bulk_events(30)
        try:
            forwarder = client.app.state.services.forwarder
            assert forwarder.concurrency == 4
            assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).status_code == 201
            assert wait_for(lambda: forwarder.stats()["pending"] == 0, 60), forwarder.stats()
            assert (forwarder.sent, forwarder.failed, forwarder.refused) == (60, 0, 0)
        finally:
            client.close()
            proxy.close()
        assert 2 <= proxy.max_in_flight <= 4
        arrived = [json.loads(body) for body in proxy.arrived]
        assert _keys(arrived) == _keys(events)  # each once
        for run_id in {e["run"]["runId"] for e in events}:
            assert [e["eventType"] for e in arrived if e["run"]["runId"] == run_id] == ["START", "COMPLETE"]
        held = open_store(backend_config.store)
        try:
            assert len(list(held.iter_events())) == 60
        finally:
            held.close()


def test_an_async_http_target_loses_nothing_to_an_outage(store_url: str, tmp_path: Path) -> None:
    # openlineage-python's async_http transport reports an event sent once queued, and drops it after its own
    # retries: its settings are used for a synchronous transport, so the events wait out the outage in the log.
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0)
    backend_token = make_token(backend_config.store, "write")
    with live(backend_config) as backend:
        proxy = FaultProxy(backend.url)
        proxy.down()
        client, token = _client(store_url, {"transport": {
            "type": "async_http", "url": proxy.url, "timeout": 1, "max_concurrent_requests": 3,
            "retry": {"total": 0}, "auth": {"type": "api_key", "apiKey": backend_token}}}, forward_retry_max_s=0.2)
        events = bulk_events(12)
        try:
            forwarder = client.app.state.services.forwarder
            assert (forwarder.kind, forwarder.concurrency) == ("http", 3)
            assert forwarder.target == f"forward:http:{proxy.url}"
            assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).status_code == 201
            assert wait_for(lambda: forwarder.failed >= 3, 30), forwarder.stats()
            assert forwarder.sent == 0 and _status(client)["pending"] == 24
            proxy.up()
            assert wait_for(lambda: forwarder.stats()["pending"] == 0, 60), forwarder.stats()
            assert forwarder.sent == 24 and forwarder.refused == 0
        finally:
            client.close()
            proxy.close()
        assert _held_keys(backend_config.store) == _keys(events)


def test_lanes_keep_each_run_together_in_log_order() -> None:
    from metatrail.server.fanout import LogEvent, lanes

    page = [LogEvent(seq=s, id=f"e{s}", run_id=r, body={}) for s, r in
            [(1, "a"), (2, "b"), (3, "a"), (4, None), (5, "b"), (6, None), (7, "c")]]
    assert lanes(page) == [[0, 2], [1, 4], [3], [5], [6]]


def test_the_cursor_never_passes_an_event_a_lane_could_not_deliver(store_url: str, tmp_path: Path) -> None:
    # The target keeps failing one run's events (503, retried) and takes every other run's, side by side. The cursor
    # stays before the stuck event however many later events went out; after a restart with the fault gone, the
    # forwarder sends from there again: the stuck run arrives, and what the backend got twice it holds once.
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0)
    backend_token = make_token(backend_config.store, "write")
    events = bulk_events(10)
    stuck = events[0]["run"]["runId"].encode()
    with live(backend_config) as backend:
        proxy = FaultProxy(backend.url)
        proxy.fail_if = lambda body: stuck in body
        forward = {"transport": {"type": "http", "url": proxy.url, "timeout": 10, "retry": {"total": 0},
                                 "auth": {"type": "api_key", "apiKey": backend_token}}}
        client, token = _client(store_url, forward, forward_concurrency=4, forward_retry_max_s=0.2)
        try:
            forwarder = client.app.state.services.forwarder
            start = forwarder.position
            assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).status_code == 201
            assert wait_for(lambda: forwarder.sent == 18 and forwarder.failed >= 2, 30), forwarder.stats()
            status = _status(client)
            assert status["position"] == start and status["pending"] == 20
        finally:
            client.close()
        proxy.fail_if = None
        client, token = _client(store_url, forward, forward_concurrency=4)
        try:
            forwarder = client.app.state.services.forwarder
            assert forwarder.position == start  # the saved cursor
            assert wait_for(lambda: forwarder.stats()["pending"] == 0, 60), forwarder.stats()
            assert forwarder.sent == 20
        finally:
            client.close()
            proxy.close()
        assert _held_keys(backend_config.store) == _keys(events)  # each once


def test_a_composite_target_that_stops_at_a_failure_loses_nothing_for_a_part_that_was_down(
        store_url: str, tmp_path: Path) -> None:
    # As docs/server.md says: with continue_on_failure false, an event leaves the log only once every part took it.
    # The file part takes each event at once; the HTTP part is down, so the events wait (the file gets them again
    # on every try), then the HTTP part comes back and receives every one, once.
    out = tmp_path / "forwarded.jsonl"
    backend_config = ServerConfig(store=f"sqlite:///{tmp_path / 'backend.db'}", auth_cache_ttl=0)
    backend_token = make_token(backend_config.store, "write")
    with live(backend_config) as backend:
        proxy = FaultProxy(backend.url)
        proxy.down()
        client, token = _client(store_url, {"transport": {
            "type": "composite", "continue_on_failure": False, "transports": [
                {"type": "file", "log_file_path": str(out), "append": True},
                {"type": "http", "url": proxy.url, "timeout": 2, "retry": {"total": 0},
                 "auth": {"type": "api_key", "apiKey": backend_token}}]}}, forward_retry_max_s=0.2)
        events = bulk_events(5)
        try:
            forwarder = client.app.state.services.forwarder
            assert forwarder.concurrency == 1  # a composite goes one event at a time
            assert client.post("/api/v1/lineage/batch", json=events, headers=auth(token)).status_code == 201
            assert wait_for(lambda: forwarder.failed >= 2, 30), forwarder.stats()
            assert forwarder.sent == 0 and _status(client)["pending"] == 10
            proxy.up()
            assert wait_for(lambda: forwarder.stats()["pending"] == 0, 60), forwarder.stats()
        finally:
            client.close()
            proxy.close()
        assert _held_keys(backend_config.store) == _keys(events)
    assert set(_keys(_lines(out))) == set(_keys(events))  # every event, some of them more than once
