"""A run whose events name several pipelines: a token limited to some pipelines reads it only when every event of the
run names one of them.

The attack: a run's pipeline follows its latest event. A writer limited to pipeline A that can predict another
pipeline's run id (deterministic ids, as Airflow's) plants an event of that run naming A with a far-future time;
when the owner records the run under B, the run stays under A. The rule on reads keeps the owner's events, inputs,
outputs and parameters out of the planter's reach on every read route: runs, one run, lineage, artifacts, the sync
routes, and a peer pulling with (or pushed to with a share list of) that pipeline."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
from eventgen import artifact, execution_events
from srvkit import auth, ids_of, live, make_token

from metatrail.model import uuid7
from metatrail.server.config import ServerConfig
from metatrail.store.projection import event_pipeline
from metatrail.store.remote import RemoteStore
from metatrail.store.sql import SqlStore

T0 = 1.8e9


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _scenario() -> dict[str, Any]:
    """The owner's run R (pipeline B: an input, an output, a parameter), the attacker's planted far-future event of R
    (pipeline A), and the attacker's own run C (pipeline A), which reads R's output."""
    r_in, r_out, c_out = _md5("r-in"), _md5("r-out"), _md5("c-out")
    run_r, run_c = uuid7(T0), uuid7(T0 + 100)
    planted = execution_events("A", "plant", t0=T0 + 1e8, inputs=[], outputs=[], run_id=run_r)[:1]
    owner = execution_events("B", "train", t0=T0, run_id=run_r, params={"secret": "owner-param"},
                             inputs=[artifact("/data/B/in.csv", r_in)], outputs=[artifact("/data/B/out.csv", r_out)])
    own = execution_events("A", "use", t0=T0 + 100, run_id=run_c, inputs=[artifact("/data/A/seen.csv", r_out)],
                           outputs=[artifact("/data/A/c.csv", c_out)])
    return {"R": run_r, "C": run_c, "planted": planted, "owner": owner, "own": own,
            "r_in": r_in, "r_out": r_out, "c_out": c_out}


def _all_ids(url: str, token: str) -> set[str]:
    """Every event id ``/sync/ids`` lists to this token, page by page."""
    out: set[str] = set()
    after = 0
    while True:
        page = httpx.get(f"{url}/api/v1/sync/ids", params={"after": after, "limit": 500}, headers=auth(token),
                         timeout=30).json()
        out.update(item[1] if isinstance(item, list) else item["id"] for item in page["items"])
        after = page["last"]
        if not page["more"]:
            return out


def _event_ids(url: str, token: str) -> set[str]:
    """Every event id ``/api/v1/events`` serves to this token."""
    out: set[str] = set()
    after = 0
    while True:
        page = httpx.get(f"{url}/api/v1/events", params={"after": after, "limit": 1000}, headers=auth(token),
                         timeout=30).json()
        out.update(e["id"] for e in page["events"])
        if not page["more"] or not page["events"]:
            return out
        after = page["events"][-1]["seq"]


def _sees_run(url: str, token: str, s: dict[str, Any]) -> dict[str, bool]:
    """Through which read routes this token sees anything of run R."""
    h = auth(token)
    r_ids = ids_of(s["planted"] + s["owner"])
    runs = httpx.get(f"{url}/api/v1/runs", headers=h, timeout=30).json()["runs"]
    runs_a = httpx.get(f"{url}/api/v1/runs", params={"pipeline": "A"}, headers=h, timeout=30).json()["runs"]
    detail = httpx.get(f"{url}/api/v1/runs/{s['R']}", headers=h, timeout=30)
    by_run = httpx.get(f"{url}/api/v1/lineage", params={"run_id": s["R"], "direction": "both"}, headers=h,
                       timeout=30)
    graph = httpx.get(f"{url}/api/v1/lineage", params={"key": f"md5:{s['c_out']}", "direction": "upstream"},
                      headers=h, timeout=30).json()
    produced = httpx.get(f"{url}/api/v1/artifacts/{s['r_out']}", headers=h, timeout=30)
    consumed = httpx.get(f"{url}/api/v1/artifacts/{s['r_in']}", headers=h, timeout=30)
    found = httpx.get(f"{url}/api/v1/artifacts", params={"hash": s["r_in"]}, headers=h, timeout=30).json()
    fetched = httpx.post(f"{url}/api/v1/sync/fetch", json={"ids": sorted(r_ids)}, headers=h, timeout=30).json()
    pipelines = httpx.get(f"{url}/api/v1/pipelines", headers=h, timeout=30).json()["pipelines"]
    node = f"run:{s['R']}"
    return {
        # R is the only run with stage "plant" or "train"; A's count without R is C's alone.
        "pipelines": any({"plant", "train"} & set(p["stages"]) for p in pipelines)
        or any(p["pipeline"] == "A" and p["runs"] != 1 for p in pipelines),
        "runs": any(r["run_id"] == s["R"] for r in runs + runs_a),
        "run": detail.status_code == 200,
        "lineage_by_run": by_run.status_code == 200,
        "lineage_graph": any(n["id"] == node for n in graph["nodes"])
        or any(node in (e["from"], e["to"]) for e in graph["edges"])
        or any("/data/B/" in name for n in graph["nodes"] for name in n.get("names", [])),
        "artifact_producer": produced.status_code == 200
        and any(p["run_id"] == s["R"] for p in produced.json()["producers"]),
        "artifact_consumer": consumed.status_code == 200,
        "artifacts": any(a["run_id"] == s["R"] for a in found["artifacts"]),
        "sync_fetch": bool(fetched["events"]),
        "sync_ids": bool(_all_ids(url, token) & r_ids),
        "events": bool(_event_ids(url, token) & r_ids),
    }


def test_a_planted_future_event_does_not_open_the_owners_run(store_url: str, tmp_path: Any) -> None:
    s = _scenario()
    attacker = make_token(store_url, "read,write", site="siteA", pipelines=["A"])
    owner = make_token(store_url, "write", site="siteB")
    reader, reader_b = make_token(store_url, "read"), make_token(store_url, "read", pipelines=["B"])
    admin = make_token(store_url, "admin", site="hub")
    lab_store, lab3_store = f"sqlite:///{tmp_path / 'lab2.db'}", f"sqlite:///{tmp_path / 'lab3.db'}"
    lab_admin = make_token(lab_store, "admin", site="lab2")
    lab3_push = make_token(lab3_store, "write", site="hub")
    with live(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0)) as hub, \
            live(ServerConfig(store=lab_store, site="lab2", auth_cache_ttl=0)) as lab2, \
            live(ServerConfig(store=lab3_store, site="lab3", auth_cache_ttl=0)) as lab3:
        # The attacker plants first (allowed: R is not stored yet, and the event names its own pipeline), then
        # records its own run; the owner, unrestricted, records R afterwards and is not refused.
        assert RemoteStore(hub.url, token=attacker).ingest(s["planted"] + s["own"]).inserted == 3
        assert RemoteStore(hub.url, token=owner).ingest(s["owner"]).inserted == 2
        everyone = RemoteStore(hub.url, token=reader)
        stored = everyone.get_run(s["R"])
        assert stored is not None and stored["pipeline"] == "A"  # the latest event wins: the hole's premise
        assert stored["params"]["secret"] == "owner-param"

        # The attacker's token sees nothing of R on any read route, but its own run C.
        seen = _sees_run(hub.url, attacker, s)
        assert not any(seen.values()), seen
        h = auth(attacker)
        assert [r["run_id"] for r in httpx.get(f"{hub.url}/api/v1/runs", headers=h).json()["runs"]] == [s["C"]]
        assert [(p["pipeline"], p["runs"], p["stages"]) for p in
                httpx.get(f"{hub.url}/api/v1/pipelines", headers=h).json()["pipelines"]] == [("A", 1, ["use"])]
        assert httpx.get(f"{hub.url}/api/v1/runs/{s['R']}", headers=h).json()["error"] == \
            httpx.get(f"{hub.url}/api/v1/runs/{uuid7(T0 + 5)}", headers=h).json()["error"]  # as a foreign run
        # Lineage stops at R: upstream of C's output lies C, then R's output, which R produced.
        graph = httpx.get(f"{hub.url}/api/v1/lineage", params={"key": f"md5:{s['c_out']}", "depth": 5},
                          headers=h).json()
        assert {n["id"] for n in graph["nodes"] if n["type"] == "run"} == {f"run:{s['C']}"}
        assert {n["id"] for n in graph["nodes"] if n["type"] == "artifact"} == \
            {f"artifact:md5:{s['c_out']}", f"artifact:md5:{s['r_out']}"}
        assert _all_ids(hub.url, attacker) == ids_of(s["own"]) == _event_ids(hub.url, attacker)
        # To /sync/missing the owner's events are missing, as a foreign run's are: the answer tells nothing.
        r_ids = sorted(ids_of(s["planted"] + s["owner"]))
        missing = httpx.post(f"{hub.url}/api/v1/sync/missing", json={"ids": r_ids}, headers=h).json()["missing"]
        assert sorted(missing) == r_ids

        # An unrestricted token sees R whole; a token for B does not (R's events name A and B: same rule).
        assert all(_sees_run(hub.url, reader, s).values())
        assert not any(_sees_run(hub.url, reader_b, s).values())

        # A peer pulling with the attacker's token gets C, nothing of R.
        lab = httpx.Client(base_url=lab2.url, headers=auth(lab_admin), timeout=60)
        assert lab.post("/api/v1/peers", json={"name": "hub", "url": hub.url, "token": attacker, "pull": True,
                                               "push": False}).status_code in (200, 201)
        pulled = lab.post("/api/v1/peers/hub/sync", params={"direction": "pull"})
        assert pulled.status_code == 200, pulled.text
        lab_events = SqlStore(lab_store)
        try:
            assert {e.id for e in lab_events.iter_events()} == ids_of(s["own"])
        finally:
            lab_events.close()

        # The hub pushing with the share list ["A"] sends C, nothing of R.
        hub_admin = httpx.Client(base_url=hub.url, headers=auth(admin), timeout=60)
        assert hub_admin.post("/api/v1/peers", json={"name": "lab3", "url": lab3.url, "token": lab3_push,
                                                     "pull": False, "push": True, "share": ["A"]}).status_code \
            in (200, 201)
        pushed = hub_admin.post("/api/v1/peers/lab3/sync", params={"direction": "push"})
        assert pushed.status_code == 200, pushed.text
        lab3_events = SqlStore(lab3_store)
        try:
            assert {e.id for e in lab3_events.iter_events()} == ids_of(s["own"])
        finally:
            lab3_events.close()


def _body(run_id: str, job: str, facets: dict[str, Any], t: float) -> dict[str, Any]:
    return {"eventType": "START", "eventTime": f"2027-01-15T08:00:{int(t) % 60:02d}Z", "producer": "https://x/p",
            "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent",
            "run": {"runId": run_id, "facets": facets}, "job": {"namespace": "ns", "name": job},
            "inputs": [], "outputs": []}


def test_the_stores_rule_names_each_events_pipeline_as_the_projection_does(store_url: str) -> None:
    """The SQL that names a stored event's pipeline agrees with :func:`event_pipeline` on the shapes events take:
    our facet's pipeline, an empty or non-text one (then the parent job), a parent without a job name, none."""
    parent = {"run": {"runId": uuid7(T0)}, "job": {"namespace": "ns", "name": "dag"}}
    shapes = [
        {"metatrail_execution": {"pipeline": "ours"}},
        {"metatrail_execution": {"pipeline": ""}, "parent": parent},
        {"metatrail_execution": {"pipeline": 7}, "parent": parent},
        {"parent": {"run": {"runId": uuid7(T0)}, "job": {"namespace": "ns", "name": ""}}},
        {"parent": {"run": {"runId": uuid7(T0)}, "job": {"namespace": "ns", "name": ["x"]}}},
        {},
    ]
    store = SqlStore(store_url)
    try:
        bodies = [_body(uuid7(T0 + i), f"dag.task{i}", facets, T0 + i) for i, facets in enumerate(shapes)]
        store.ingest(bodies)
        for body in bodies:
            run_id, named = body["run"]["runId"], event_pipeline(body)
            assert named and store.get_run(run_id)["pipeline"] == named  # type: ignore[index]
            assert store.readable_runs([run_id], frozenset({named})) == {run_id}, body
            assert store.readable_runs([run_id], frozenset({named + "x", "other"})) == set(), body
        # A second event naming another pipeline makes the run unreadable to a reader of either one alone.
        mixed = bodies[0]["run"]["runId"]
        store.ingest([{**_body(mixed, "other.job", {}, T0 + 50), "eventType": "COMPLETE"}])
        assert store.readable_runs([mixed], frozenset({"ours"})) == set()
        assert store.readable_runs([mixed], frozenset({"other.job"})) == set()
        assert store.readable_runs([mixed], frozenset({"ours", "other.job"})) == {mixed}
        assert mixed in {r["run_id"] for r in store.list_readable_runs(frozenset({"ours", "other.job"}))}
        assert mixed not in {r["run_id"] for r in store.list_readable_runs(frozenset({"ours"}))}
    finally:
        store.close()
