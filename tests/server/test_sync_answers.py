"""What the sync routes answer: nothing about events a token may not read, and answers bounded in bytes that a
client still gets everything through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from conftest import Tokens
from srvkit import AsgiClient, auth, bulk_events, ids_of, live, make_token

from metatrail.server.config import ServerConfig
from metatrail.store import open_store
from metatrail.store.remote import RemoteStore
from metatrail.sync import pull


def test_sync_missing_tells_a_restricted_token_nothing_of_other_pipelines(
        client: AsgiClient, tokens: Tokens, config: ServerConfig) -> None:
    """Event ids are content hashes: a token that can guess an event of a pipeline it may not read must not learn
    from ``/sync/missing`` whether the server holds it. Such ids are answered as missing (a push of them is refused
    like any write there); ids of events it may read are answered truthfully."""
    limited = make_token(config.store, "read,write", pipelines=["public"])
    write_only = make_token(config.store, "write", pipelines=["public"])
    secret = bulk_events(2, pipeline="secret", t0=1.8e9)
    public = bulk_events(1, pipeline="public", t0=1.7e9)
    absent = bulk_events(1, pipeline="public", t0=1.6e9)
    assert client.post("/api/v1/lineage/batch", json=secret + public, headers=auth(tokens.write)).status_code == 201
    ids = sorted(ids_of(secret)) + sorted(ids_of(public)) + sorted(ids_of(absent))
    for token in (limited, write_only):
        r = client.post("/api/v1/sync/missing", json={"ids": ids}, headers=auth(token))
        assert r.status_code == 200
        assert set(r.json()["missing"]) == ids_of(secret) | ids_of(absent)
    unrestricted = client.post("/api/v1/sync/missing", json={"ids": ids}, headers=auth(tokens.write)).json()
    assert set(unrestricted["missing"]) == ids_of(absent)
    pushed = client.post("/api/v1/sync/push", json={"events": secret[:1]}, headers=auth(limited))
    assert pushed.status_code == 403 and pushed.json()["error"] == "pipeline_forbidden"


def _large(count: int, size: int) -> list[dict[str, Any]]:
    """``count`` events of about ``size`` bytes each (a large parameter, as a big config would make)."""
    events = bulk_events(count // 2, pipeline="big")
    for i, e in enumerate(events):
        e["run"]["facets"]["metatrail_execution"]["params"] = {"blob": f"{i:08d}" + "x" * size}
    return events


def test_fetch_answers_are_bounded_in_bytes_and_a_pull_still_gets_everything(
        store_url: str, tokens: Tokens, tmp_path: Path) -> None:
    """Up to 10,000 ids per fetch, events of several MiB each: one answer could be gigabytes. The server stops at
    ``max_fetch_bytes`` of bodies (at least one event) and names the ids it did not get to; a client that does not
    say it takes such an answer gets a 413 rather than a silently short one. A pull over real HTTP still gets every
    event, in more requests; ``/api/v1/events`` is bounded the same way (``more``)."""
    budget = 200_000
    config = ServerConfig(store=store_url, site="hub", auth_cache_ttl=0, max_fetch_bytes=budget)
    events = _large(12, 60_000)
    ids = sorted(ids_of(events))
    with live(config) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post("/api/v1/lineage/batch", json=events, headers=auth(tokens.write))
            assert r.status_code == 201
            refused = client.post("/api/v1/sync/fetch", json={"ids": ids}, headers=auth(tokens.read))
            assert refused.status_code == 413 and refused.json()["error"] == "fetch_too_large"
            got: dict[str, Any] = {}
            asked, answers = ids, 0
            while asked:
                r = client.post("/api/v1/sync/fetch", json={"ids": asked, "partial": True}, headers=auth(tokens.read))
                assert r.status_code == 200
                assert len(r.content) < budget + 70_000  # the bound, overshot by at most one event
                answer = r.json()
                got.update((item["id"], item["event"]) for item in answer["events"])
                assert answer["events"] and len(answer.get("rest", [])) < len(asked)
                asked, answers = answer.get("rest", []), answers + 1
            assert set(got) == set(ids) and answers >= 4
            page = client.get("/api/v1/events", params={"limit": 1000}, headers=auth(tokens.read))
            assert len(page.content) < budget + 70_000 and page.json()["more"] is True
        local = f"sqlite:///{tmp_path / 'local.db'}"
        result = pull(local, server.url, token=tokens.read, show_progress=False)
        assert result.inserted == 12
        store = open_store(local)
        try:
            assert {e.id for e in store.iter_events()} == set(ids)
        finally:
            store.close()
        remote = RemoteStore(server.url, tokens.read)
        try:
            assert [e.id for e in remote.iter_events()] == [e.id for e in _stored(store_url)]
        finally:
            remote.close()


def _stored(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return list(store.iter_events())
    finally:
        store.close()
