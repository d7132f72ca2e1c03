"""OpenLineage ingest over ASGI, on SQLite and PostgreSQL: Marquez's fixtures, idempotency, out-of-order events,
dataset/job events, batches, malformed input (4xx and nothing stored)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from conftest import Tokens
from srvkit import FIXTURES, AsgiClient, auth, bulk_events, make_token

from metatrail.openlineage.events import event_id
from metatrail.server.config import ServerConfig
from metatrail.store import open_store

ACCEPTED = sorted(FIXTURES.glob("accepted/**/*.json"))
REJECTED = sorted(FIXTURES.glob("rejected/*.json"))


def _stored(store_url: str) -> list[dict]:
    store = open_store(store_url)
    try:
        return [e.body for e in store.iter_events()]
    finally:
        store.close()


def _expected_status(path: Path) -> int:
    prefix = path.name.split("_", 1)[0]
    return 400 if prefix == "json" else int(prefix)


def test_marquez_fixtures(client: AsgiClient, tokens: Tokens, store_url: str) -> None:
    assert len(ACCEPTED) >= 14 and len(REJECTED) >= 7
    for path in REJECTED:
        r = client.post("/api/v1/lineage", content=path.read_bytes(), headers=auth(tokens.write))
        assert r.status_code == _expected_status(path), (path.name, r.status_code, r.text)
        assert r.json()["error"] == "invalid_event"
    assert _stored(store_url) == []
    posted = []
    for path in ACCEPTED:
        body = json.loads(path.read_text())
        r = client.post("/api/v1/lineage", json=body, headers={**auth(tokens.write), "Accept": "application/json"})
        assert r.status_code == 201, (path.name, r.text)
        assert r.json()["id"] == event_id(body)
        posted.append(body)
    stored = _stored(store_url)
    # Read back exactly what was posted (the facets too, as Marquez's round-trip test checks).
    assert sorted(map(event_id, stored)) == sorted(map(event_id, posted))
    # And over the API: every event's whole body, as posted.
    served = client.get("/api/v1/events?limit=1000", headers=auth(tokens.read)).json()["events"]
    assert sorted(json.dumps(e["event"], sort_keys=True) for e in served) == \
        sorted(json.dumps(b, sort_keys=True) for b in posted)
    kinds = {r["run_id"] for r in client.get("/api/v1/runs?limit=1000", headers=auth(tokens.read)).json()["runs"]}
    run_ids = {b["run"]["runId"] for b in posted if b.get("run")}
    assert kinds == run_ids  # projections hold the runs and skip the run-less dataset/job events


def test_dataset_and_job_events_are_stored_not_projected(client: AsgiClient, tokens: Tokens, store_url: str) -> None:
    kinds = []
    for name in ("event_dataset_event.json", "event_job_event.json"):
        r = client.post("/api/v1/lineage", content=(FIXTURES / "accepted" / name).read_bytes(),
                        headers={**auth(tokens.write), "Accept": "application/json"})
        assert r.status_code == 201
        kinds.append(r.json()["kind"])
    assert kinds == ["DatasetEvent", "JobEvent"]
    stats = client.get("/api/v1/stats", headers=auth(tokens.read)).json()
    assert stats["events"] == 2 and stats["runs"] == 0
    events = client.get("/api/v1/events", headers=auth(tokens.read)).json()["events"]
    assert {e["event"].get("schemaURL", "").rsplit("/", 1)[-1] for e in events} == {"DatasetEvent", "JobEvent"}
    assert {e["site"] for e in events} == {"site1"}


def test_idempotent_and_out_of_order(client: AsgiClient, tokens: Tokens, store_url: str) -> None:
    events = bulk_events(20)
    shuffled = events * 3
    random.Random(7).shuffle(shuffled)  # every event three times, COMPLETE often before START
    for e in shuffled:
        assert client.post("/api/v1/lineage", json=e, headers=auth(tokens.write)).status_code == 201
    stored = _stored(store_url)
    assert len(stored) == 40 and {event_id(e) for e in stored} == {event_id(e) for e in events}
    runs = client.get("/api/v1/runs?limit=100", headers=auth(tokens.read)).json()["runs"]
    assert len(runs) == 20 and {r["state"] for r in runs} == {"completed"}
    assert all(r["event_count"] == 2 for r in runs)
    again = client.post("/api/v1/lineage", json=events[0],
                        headers={**auth(tokens.write), "Accept": "application/json"}).json()
    assert again["stored"] is False


def test_batch_is_atomic(client: AsgiClient, tokens: Tokens, store_url: str) -> None:
    good = bulk_events(5)
    bad = json.loads(json.dumps(good[3]))
    bad["run"]["runId"] = "not-a-uuid"
    r = client.post("/api/v1/lineage/batch", json=[*good, bad], headers=auth(tokens.write))
    assert r.status_code == 422
    assert r.json()["details"][0]["index"] == 10 and r.json()["details"][0]["path"] == "$.run.runId"
    assert _stored(store_url) == []
    r = client.post("/api/v1/lineage/batch", json=good + good[:2], headers=auth(tokens.write))
    assert r.status_code == 201 and r.json() == {"received": 12, "inserted": 10}
    assert len(_stored(store_url)) == 10


def test_gzip_bodies(client: AsgiClient, tokens: Tokens) -> None:
    events = bulk_events(50)
    body = gzip.compress(json.dumps(events).encode())
    r = client.post("/api/v1/lineage/batch", content=body,
                    headers={**auth(tokens.write), "Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 201 and r.json()["inserted"] == 100


def _deep(n: int) -> str:
    return '{"eventTime":"2024-01-01T00:00:00Z","producer":"p","run":{"runId":"' + \
        "123e4567-e89b-12d3-a456-426614174000" + '","facets":{"x":' + "[" * n + "]" * n + "}}," + \
        '"job":{"namespace":"n","name":"j"}}'


MALFORMED: list[tuple[str, bytes, dict[str, str], int]] = [
    ("not json", b"{not json", {}, 400),
    ("truncated", b'{"eventTime": "2024-01-01T00:00:00Z", "producer"', {}, 400),
    ("invalid utf-8", b'{"producer": "\xff\xfe"}', {}, 400),
    ("NaN", b'{"eventTime":"2024-01-01T00:00:00Z","producer":"p","x":NaN}', {}, 400),
    ("array, not object", b"[]", {}, 400),
    ("wrong types", json.dumps({"eventTime": "2024-01-01T00:00:00Z", "producer": "p", "run": "r",
                                "job": {"namespace": "n", "name": "j"}}).encode(), {}, 422),
    ("missing required", json.dumps({"eventTime": "2024-01-01T00:00:00Z", "producer": "p"}).encode(), {}, 422),
    ("unknown eventType", json.dumps({"eventType": "EXPLODED", "eventTime": "2024-01-01T00:00:00Z", "producer": "p",
                                      "run": {"runId": "123e4567-e89b-12d3-a456-426614174000"},
                                      "job": {"namespace": "n", "name": "j"}}).encode(), {}, 422),
    ("non-UUID runId", json.dumps({"eventTime": "2024-01-01T00:00:00Z", "producer": "p", "run": {"runId": "42"},
                                   "job": {"namespace": "n", "name": "j"}}).encode(), {}, 422),
    ("NUL byte", json.dumps({"eventTime": "2024-01-01T00:00:00Z", "producer": "p\u0000",
                             "run": {"runId": "123e4567-e89b-12d3-a456-426614174000"},
                             "job": {"namespace": "n", "name": "j"}}).encode(), {}, 422),
    ("100-deep nesting", _deep(100).encode(), {}, 422),
    ("10,000-deep nesting", _deep(10_000).encode(), {}, 422),
    ("year 0", json.dumps({"eventTime": "0000-01-01T00:00:00Z", "producer": "p",
                           "run": {"runId": "123e4567-e89b-12d3-a456-426614174000"},
                           "job": {"namespace": "n", "name": "j"}}).encode(), {}, 400),
    ("wrong content type", b"{}", {"Content-Type": "application/xml"}, 415),
    ("gzip bomb", gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]"), {"Content-Encoding": "gzip"}, 413),
    ("bad gzip", b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400),
    ("huge body", b'{"producer":"' + b"x" * (6 * 1024 * 1024) + b'"}', {}, 413),
    ("number past a double", b'{"eventTime":"2024-01-01T00:00:00Z","producer":"p","run":{"runId":'
     b'"123e4567-e89b-12d3-a456-426614174000"},"job":{"namespace":"n","name":"j","facets":{"c":{"_producer":"p",'
     b'"_schemaURL":"s","rows":1e400}}}}', {}, 400),
    ("runId with a newline", json.dumps({"eventTime": "2024-01-01T00:00:00Z", "producer": "p",
                                         "run": {"runId": "123e4567-e89b-12d3-a456-426614174000\n"},
                                         "job": {"namespace": "n", "name": "j"}}).encode(), {}, 422),
    ("DatasetEvent with a run", json.dumps({
        "eventTime": "2024-01-01T00:00:00Z", "producer": "p", "dataset": {"namespace": "n", "name": "d"},
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/DatasetEvent",
        "run": {"runId": "../../not-a-uuid"}, "job": {"namespace": "n", "name": "j"}}).encode(), {}, 422),
    ("data after the gzip stream", gzip.compress(b"{}") + gzip.compress(b"{}") + b"tail",
     {"Content-Encoding": "gzip"}, 400),
]
GZIPPED = ("gzip bomb", "bad gzip", "data after the gzip stream")


def test_malformed_is_4xx_and_stores_nothing(client: AsgiClient, tokens: Tokens, store_url: str) -> None:
    for name, body, headers, status in MALFORMED:
        head = {"Content-Type": "application/json", **headers, **auth(tokens.write)}
        r = client.post("/api/v1/lineage", content=body, headers=head)
        assert r.status_code == status, (name, r.status_code, r.text[:200])
        assert r.json()["error"], name
        if name in (*GZIPPED, "huge body", "wrong content type"):
            batch = body
        elif name == "array, not object":
            batch = b"{}"
        else:
            batch = b"[" + body + b"]"
        r = client.post("/api/v1/lineage/batch", content=batch, headers=head)
        assert 400 <= r.status_code < 500, (name, "batch", r.status_code, r.text[:200])
        for route in ("/api/v1/sync/push",):
            r = client.post(route, content=b'{"events":[' + body + b"]}" if name not in (
                *GZIPPED, "huge body", "wrong content type") else body, headers=head)
            assert 400 <= r.status_code < 500, (name, route, r.status_code, r.text[:200])
    assert _stored(store_url) == []


def _facet(**fields: object) -> dict[str, object]:
    return {"_producer": "p", "_schemaURL": "https://example.com/facet", **fields}


def test_facet_values_of_any_shape_are_stored_and_projected(client: AsgiClient, tokens: Tokens,
                                                            store_url: str) -> None:
    """Facets other than the spec's are free-form, also when they bear our names: a value of the wrong type is
    stored as sent and counts as absent in the projection. It must neither be refused as a store failure (503,
    retried for ever) nor poison the run for its later events."""
    template = bulk_events(1)[0]
    odd_run_facets = [
        {"metatrail_execution": _facet(pipeline="p", kind={"a": 1})},
        {"metatrail_execution": _facet(pipeline="p", stage=[1], site=7, integration={"x": 1})},
        {"metatrail_execution": _facet(pipeline=["p"], params=[1])},
        {"errorMessage": _facet(message={"m": 1}, programmingLanguage="python")},
        {"metatrail_execution": _facet(pipeline="p", params="not an object", energy=None)},
    ]
    for i, facets in enumerate(odd_run_facets):
        event = json.loads(json.dumps(template))
        event["run"]["runId"] = f"123e4567-e89b-12d3-a456-4266141741{i:02d}"
        event["run"]["facets"] = facets
        r = client.post("/api/v1/lineage", json=event, headers=auth(tokens.write))
        assert r.status_code == 201, (facets, r.text)
    event = json.loads(json.dumps(template))
    event["run"]["runId"] = "123e4567-e89b-12d3-a456-426614174099"
    event["outputs"] = [{"namespace": "file", "name": "/o", "facets": {
        "version": _facet(datasetVersion={"v": 1}),
        "metatrail_artifact": _facet(hash=["h"], algorithm="x" * 40, size=2**70, hashError={"e": 1})}}]
    assert client.post("/api/v1/lineage", json=event, headers=auth(tokens.write)).status_code == 201
    run = client.get(f"/api/v1/runs/{event['run']['runId']}", headers=auth(tokens.read)).json()
    assert [(o["name"], o["hash"], o["size"]) for o in run["outputs"]] == [("/o", None, None)]
    # One early event with parameters that are not an object, then the run's own events: all stored, all counted.
    rid = "223e4567-e89b-12d3-a456-426614174100"
    poison = {**json.loads(json.dumps(template)), "eventType": "OTHER", "eventTime": "2024-01-01T09:00:00Z"}
    poison["run"] = {"runId": rid, "facets": {"metatrail_execution": _facet(params=[1])}}
    assert client.post("/api/v1/lineage", json=poison, headers=auth(tokens.write)).status_code == 201
    for event_type, at in (("START", "10:00"), ("COMPLETE", "11:00")):
        legit = json.loads(json.dumps(template))
        legit.update(eventType=event_type, eventTime=f"2024-01-01T{at}:00Z")
        legit["run"]["runId"] = rid
        r = client.post("/api/v1/lineage", json=legit, headers=auth(tokens.write))
        assert r.status_code == 201, r.text
    run = client.get(f"/api/v1/runs/{rid}", headers=auth(tokens.read)).json()
    assert run["state"] == "completed" and run["event_count"] == 3
    assert len(_stored(store_url)) == len(odd_run_facets) + 4


def test_a_runs_site_is_where_its_events_came_from(client: AsgiClient, tokens: Tokens) -> None:
    """A facet may name any site; the run shows the site the server authenticated its events from."""
    start, end = bulk_events(1)
    for event in (start, end):
        event["run"]["facets"]["metatrail_execution"]["site"] = "hub"
    r = client.post("/api/v1/lineage/batch", json=[start, end], headers=auth(tokens.other_site))
    assert r.status_code == 201
    run = client.get(f"/api/v1/runs/{start['run']['runId']}", headers=auth(tokens.read)).json()
    assert run["site"] == "site2"


def test_sending_an_event_again_under_another_site_does_not_take_over_its_attribution(
        client: AsgiClient, tokens: Tokens, config: ServerConfig) -> None:
    """A run's site is this server's record of where it first got the events: a token of another site that sends
    them again (as a push naming an earlier origin, too) stores nothing and changes nothing."""
    events = bulk_events(1, tag="attributed")
    assert client.post("/api/v1/lineage/batch", json=events, headers=auth(tokens.write)).status_code == 201
    rid = events[0]["run"]["runId"]
    before = client.get(f"/api/v1/runs/{rid}", headers=auth(tokens.read)).json()
    assert before["site"] == "site1"
    aaa = make_token(config.store, "read,write", site="aaa")
    again = client.post("/api/v1/lineage/batch", json=events, headers=auth(aaa))
    assert again.status_code == 201 and again.json()["inserted"] == 0
    pushed = client.post("/api/v1/sync/push", json={"events": events, "origins": ["a0", "a0"]}, headers=auth(aaa))
    assert pushed.status_code == 201 and pushed.json()["inserted"] == 0
    after = client.get(f"/api/v1/runs/{rid}", headers=auth(tokens.read)).json()
    assert after["site"] == "site1" and after == before
    got = client.get("/api/v1/events", params={"run_id": rid}, headers=auth(tokens.read)).json()["events"]
    assert [e["site"] for e in got] == ["site1", "site1"]


def test_push_origins(client: AsgiClient, tokens: Tokens, store_url: str) -> None:
    """Origins relay other sites' events (a client pushes what it pulled from elsewhere), but a token of another
    site cannot pass events off as this server's own site's; and a push is one transaction."""
    own = bulk_events(1, tag="own")
    r = client.post("/api/v1/sync/push", json={"events": own, "origins": ["hub", None]},
                    headers=auth(tokens.other_site))
    assert r.status_code == 403 and r.json()["error"] == "site_forbidden"
    assert _stored(store_url) == []
    relayed = bulk_events(1, tag="relayed")
    r = client.post("/api/v1/sync/push", json={"events": relayed, "origins": ["site3", None]},
                    headers=auth(tokens.other_site))
    assert r.status_code == 201 and r.json()["inserted"] == 2
    rid = relayed[0]["run"]["runId"]
    got = client.get("/api/v1/events", params={"run_id": rid}, headers=auth(tokens.read)).json()["events"]
    assert sorted(e["site"] for e in got) == ["site2", "site3"]
    r = client.post("/api/v1/sync/push", json={"events": own, "origins": ["hub", None]}, headers=auth(tokens.admin))
    assert r.status_code == 201 and r.json()["inserted"] == 2, r.text


def test_dataset_namespaces_of_ipv6_urls_are_accepted(client: AsgiClient, tokens: Tokens) -> None:
    """The Recorder names a dataset read from ``http://[::1]:9000/x.csv`` in namespace ``http://[::1]:9000``."""
    from metatrail.hashing import dataset_name

    namespace, name = dataset_name("http://[::1]:9000/x.csv")
    event = bulk_events(1)[0]
    event["inputs"] = [{"namespace": namespace, "name": name}]
    r = client.post("/api/v1/lineage", json=event, headers=auth(tokens.write))
    assert namespace == "http://[::1]:9000" and r.status_code == 201, r.text
