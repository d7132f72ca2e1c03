"""Federation and the two-site story, end to end over loopback: two servers on different ports, two client stores,
real Recorders hashing real files.

Site 1 records a pipeline (raw → clean → model) and pushes it to its server. Site 2 pulls the model's metadata from
server 1 (a read token restricted to that pipeline), records a refinement consuming the same model bytes, and
pushes to server 2. The servers federate (pull on demand, push on a schedule), and the lineage of site 2's final
output reaches site 1's raw data on both servers, joined by content hash, with each event's origin site recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Tokens
from srvkit import AsgiClient, auth, bulk_events, live, make_token, wait_for

from metatrail.config import load_settings
from metatrail.hashing import hash_path
from metatrail.recorder import Recorder
from metatrail.server import commands
from metatrail.server.config import ServerConfig
from metatrail.store import open_store
from metatrail.store.remote import RemoteStore
from metatrail.sync import Filter, SyncLog, pull, push


def _record(store: str, site: str, steps: list[tuple[str, str, list[Path], list[Path]]]) -> list[str]:
    recorder = Recorder(load_settings(store=store, site=site, energy="off"))
    pipeline_run = recorder.pipeline_run_started(steps[0][0], params={"site": site})
    ids = []
    for pipeline, stage, inputs, outputs in steps:
        for out in outputs:
            out.write_text(f"{stage} of {','.join(p.read_text() for p in inputs)}")
        ex = recorder.execution_started(pipeline, stage, pipeline_run=pipeline_run, inputs=inputs)
        recorder.execution_finished(ex, outputs=outputs)
        ids.append(ex.id)
    recorder.pipeline_run_finished(pipeline_run)
    assert recorder.flush(30)
    recorder.close()
    return ids


def _md5(path: Path) -> str:
    ref = hash_path(str(path), None)
    assert ref.hash is not None
    return ref.hash.value


def test_two_sites(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s1 = ServerConfig(store=store_url, site="site1", auth_cache_ttl=0, schedule_tick=0.2)
    s2 = ServerConfig(store=f"sqlite:///{tmp_path / 'server2.db'}", site="site2", auth_cache_ttl=0,
                      schedule_tick=0.2)
    site1_write, site1_share = make_token(s1.store, "write", site="site1"), \
        make_token(s1.store, "read", site="site2", pipelines=["trackml"])
    site2_write, site2_read = make_token(s2.store, "write", site="site2"), make_token(s2.store, "read", site="site2")
    s2_admin = make_token(s2.store, "admin", site="site2")
    s1_peer = make_token(s1.store, "read,write", site="site2", pipelines=["trackml", "refine"])
    s1_read = make_token(s1.store, "read", site="site1")
    d1, d2 = tmp_path / "site1", tmp_path / "site2"
    d1.mkdir()
    d2.mkdir()
    raw, clean, model = d1 / "raw.csv", d1 / "clean.csv", d1 / "model.pt"
    raw.write_text("hits")
    c1 = f"sqlite:///{d1 / '.metatrail' / 'metatrail.db'}"
    c2 = f"sqlite:///{d2 / '.metatrail' / 'metatrail.db'}"
    # A private pipeline at site 1 that must never leave it.
    _record(c1, "site1", [("private", "secret", [raw], [d1 / "secret.txt"])])
    site1_runs = _record(c1, "site1", [("trackml", "prep", [raw], [clean]), ("trackml", "train", [clean], [model])])

    with live(s1) as server1, live(s2) as server2:
        assert push(c1, server1.url, token=site1_write, show_progress=False).sent == 10
        # Site 2 pulls the model artifact's metadata: the run that produced it (and its pipeline run).
        train = RemoteStore(server1.url, token=site1_share).get_run(site1_runs[1])
        assert train is not None and train["site"] == "site1"
        pulled = pull(c2, server1.url, token=site1_share, filt=Filter(run_id=train["parent_run_id"]),
                      show_progress=False)
        assert pulled.sent == 6  # the trackml pipeline run and its two executions; nothing of "private"
        local2 = open_store(c2)
        assert local2.find_artifacts(key=f"md5:{_md5(model)}")[0]["stage"] == "train"
        local2.close()
        # Site 2 refines the same model bytes (a copy: the content hash joins them) and evaluates the result.
        model_copy, refined, report = d2 / "model.pt", d2 / "refined.pt", d2 / "report.json"
        shutil.copy(model, model_copy)
        _record(c2, "site2", [("refine", "tune", [model_copy], [refined]), ("refine", "evaluate", [refined], [report])])
        pushed = push(c2, server2.url, token=site2_write, show_progress=False)
        assert pushed.inserted == 12  # its own 6, plus the 6 it pulled

        # Federation: server 2 pulls from server 1 (on demand, via the CLI), and pushes to it on a schedule.
        assert commands.main(["peer", "add", "s1", server1.url, "--token", s1_peer, "--push", "--share", "refine",
                              "--store", s2.store]) == 0
        assert commands.main(["peer", "list", "--store", s2.store, "--json"]) == 0
        capsys.readouterr()
        admin = {"Authorization": f"Bearer {s2_admin}"}
        import httpx

        r = httpx.post(f"{server2.url}/api/v1/peers/s1/sync", params={"direction": "pull"}, headers=admin, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["pull"]["inserted"] == 0  # the model's metadata already came with site 2's push
        report_key = f"md5:{_md5(report)}"
        graph = RemoteStore(server2.url, token=site2_read).lineage([report_key], direction="upstream")
        stages = {(n["pipeline"], n["stage"], n["site"]) for n in graph["nodes"] if n["type"] == "run"}
        assert {("refine", "evaluate", "site2"), ("refine", "tune", "site2"), ("trackml", "train", "site1"),
                ("trackml", "prep", "site1")} <= stages
        assert f"artifact:md5:{_md5(raw)}" in {n["id"] for n in graph["nodes"]}
        # Origin sites are recorded on every event that came from elsewhere.
        served2 = open_store(s2.store)
        origins = {e.body["run"]["facets"]["metatrail_execution"]["pipeline"]: e.site for e in served2.iter_events()}
        served2.close()
        assert origins == {"trackml": "site1", "refine": "site2"}  # relayed by site 2, first recorded at site 1
        # The same on demand from the command line, where server 2's store is: a run recorded at site 1 since.
        retrain = _record(c1, "site1", [("trackml", "retrain", [clean], [d1 / "model2.pt"])])
        assert push(c1, server1.url, token=site1_write, show_progress=False).sent == 4
        assert commands.main(["peer", "sync", "s1", "--direction", "pull", "--site", "site2", "--store",
                              s2.store]) == 0
        synced = json.loads(capsys.readouterr().out)
        assert synced["pull"]["inserted"] == 4 and "push" not in synced
        assert RemoteStore(server2.url, token=site2_read).get_run(retrain[0])["site"] == "site1"

        # Scheduled push to server 1: the peer shares only "refine".
        r = httpx.post(f"{server2.url}/api/v1/peers", headers=admin, timeout=30, json={
            "name": "s1", "url": server1.url, "token": s1_peer, "pull": True, "push": True, "share": ["refine"],
            "interval_s": 1})
        assert r.status_code == 201
        assert wait_for(lambda: RemoteStore(server1.url, token=s1_read).list_runs(pipeline="refine") != [], 30)
        graph1 = RemoteStore(server1.url, token=s1_read).lineage([report_key], direction="upstream")
        assert f"artifact:md5:{_md5(raw)}" in {n["id"] for n in graph1["nodes"]}
        peers = httpx.get(f"{server2.url}/api/v1/peers", headers=admin).json()["peers"]
        assert peers[0]["last_sync_at"] and peers[0]["last_error"] is None and peers[0]["has_token"] is True
        served1 = SyncLog(s1.store)
        try:
            refine_sites = {s.site for _, s in served1.events_after(0, Filter(pipeline="refine"), 100)}
            private = served1.digest(Filter(pipeline="private"))["events"]
        finally:
            served1.close()
        assert refine_sites == {"site2"} and private == 4
        # The schedule pulls too: a run recorded at site 1 now reaches server 2 by itself.
        scheduled = _record(c1, "site1", [("trackml", "again", [clean], [d1 / "model3.pt"])])
        assert push(c1, server1.url, token=site1_write, show_progress=False).sent == 4
        assert wait_for(lambda: RemoteStore(server2.url, token=site2_read).get_run(scheduled[0]) is not None, 30)
        # Nothing of site 1's private pipeline reached site 2.
        served2 = SyncLog(s2.store)
        try:
            assert served2.digest(Filter(pipeline="private"))["events"] == 0
        finally:
            served2.close()
        # A peer's token cannot do more than its scopes: the share token is read-only.
        assert httpx.post(f"{server1.url}/api/v1/lineage", json=bulk_events(1)[0],
                          headers=auth(site1_share)).status_code == 403


def test_peer_routes_and_errors(client: AsgiClient, tokens: Tokens, tmp_path: Path) -> None:
    h = auth(tokens.admin)
    assert client.get("/api/v1/peers", headers=h).json() == {"peers": []}
    bad = [{"name": "../x", "url": "http://a"}, {"name": "p", "url": "ftp://a"},
           {"name": "p", "url": "http://a", "interval_s": 0.1}, {"name": "p", "url": "http://a", "share": "x"},
           {"name": "p"}, [1, 2]]
    for body in bad:
        assert client.post("/api/v1/peers", json=body, headers=h).status_code == 422, body
    r = client.post("/api/v1/peers", json={"name": "p1", "url": "http://127.0.0.1:9", "token": "t"}, headers=h)
    assert r.status_code == 201 and r.json()["has_token"] is True and "token" not in r.json()
    r = client.post("/api/v1/peers/p1/sync", headers=h)
    assert r.status_code == 502 and "unreachable" in r.json()["message"]
    assert client.get("/api/v1/peers", headers=h).json()["peers"][0]["last_error"]
    assert client.post("/api/v1/peers/nope/sync", headers=h).status_code == 404
    # A peer that names itself as this server's site: its events would pass for this site's own.
    with live(ServerConfig(store=f"sqlite:///{tmp_path / 'twin.db'}", site="hub")) as twin:
        r = client.post("/api/v1/peers", json={"name": "twin", "url": twin.url, "pull": True}, headers=h)
        assert r.status_code == 201
        r = client.post("/api/v1/peers/twin/sync", params={"direction": "pull"}, headers=h)
        assert r.status_code == 409 and "own site name" in r.json()["message"]
        assert client.delete("/api/v1/peers/twin", headers=h).status_code == 200
    assert client.delete("/api/v1/peers/p1", headers=h).json() == {"removed": "p1"}
    assert client.delete("/api/v1/peers/p1", headers=h).status_code == 404
    # token administration over HTTP
    r = client.post("/api/v1/admin/tokens", json={"scopes": ["read"], "site": "lab", "pipelines": ["a"]}, headers=h)
    assert r.status_code == 201 and r.json()["token"].startswith("mt_")
    made = r.json()
    assert client.get("/api/v1/runs", headers=auth(made["token"])).status_code == 200
    assert made["id"] in {t["id"] for t in client.get("/api/v1/admin/tokens", headers=h).json()["tokens"]}
    assert client.delete(f"/api/v1/admin/tokens/{made['id']}", headers=h).status_code == 200
    assert client.get("/api/v1/runs", headers=auth(made["token"])).status_code == 401
    assert client.post("/api/v1/admin/tokens", json={"scopes": ["root"], "site": "lab"}, headers=h).status_code == 422
    assert client.post("/api/v1/admin/rebuild", headers=h).json() == {"rebuilt": True}
    assert client.get("/api/v1/admin/status", headers=h).json()["writer"]["pending"] == 0
    assert json.loads(json.dumps(client.get("/api/v1/version").json()))["site"] == "hub"


def test_peer_cursors_follow_the_share_list_the_peer_url_and_the_reading_token(tmp_path: Path) -> None:
    """A cursor moves past what its selection left out, so it must belong to that selection: a share list widened
    by a pipeline sends that pipeline's history; a peer name pointed at another server pulls all of it; a pull
    with a wider token gets what a narrower one could not see. And a peer's word that an event was recorded at
    this very site is not taken on pull."""
    hub_store, b_store, c_store = (f"sqlite:///{tmp_path / n}.db" for n in ("hub", "b", "c"))
    hub_admin, hub_write = make_token(hub_store, "admin", site="hub"), make_token(hub_store, "write", site="hub")
    b_token = make_token(b_store, "read,write", site="hub")
    c_token, c_write = make_token(c_store, "read,write", site="hub"), make_token(c_store, "admin", site="c")
    p1, p2 = bulk_events(5, pipeline="P1", tag="p1"), bulk_events(5, pipeline="P2", tag="p2")
    with live(ServerConfig(store=hub_store, site="hub", auth_cache_ttl=0)) as hub, \
            live(ServerConfig(store=b_store, site="b", auth_cache_ttl=0)) as b, \
            live(ServerConfig(store=c_store, site="c", auth_cache_ttl=0)) as c:
        hub_client = RemoteStore(hub.url, token=hub_write)
        hub_client.ingest(p1 + p2)
        admin = RemoteStore(hub.url, token=hub_admin).client

        def add_peer(url: str, token: str, **how: object) -> None:
            admin.request("POST", "/api/v1/peers", json_body={"name": "b", "url": url, "token": token, **how})

        add_peer(b.url, b_token, pull=False, push=True, share=["P1"])
        admin.request("POST", "/api/v1/peers/b/sync", params={"direction": "push"})
        assert RemoteStore(b.url, token=b_token).stats()["events"] == 10
        add_peer(b.url, b_token, pull=False, push=True, share=["P1", "P2"])
        admin.request("POST", "/api/v1/peers/b/sync", params={"direction": "push"})
        assert RemoteStore(b.url, token=b_token).stats()["events"] == 20  # P2's history too

        # B holds 20 events; C holds 30, among them 4 whose origin it names as the hub itself.
        own_claims = bulk_events(2, pipeline="P3", tag="claimed")
        RemoteStore(c.url, token=c_write).ingest(p1 + p2 + bulk_events(3, pipeline="P3"))
        RemoteStore(c.url, token=c_write).ingest(own_claims, sites=["hub"] * 4)
        add_peer(b.url, b_token, pull=True, push=False)
        admin.request("POST", "/api/v1/peers/b/sync", params={"direction": "pull"})
        add_peer(c.url, c_token, pull=True, push=False)  # the same name, now another server
        admin.request("POST", "/api/v1/peers/b/sync", params={"direction": "pull"})
        assert RemoteStore(hub.url, token=hub_admin).stats()["events"] == 30
        claimed = [e for e in RemoteStore(hub.url, token=hub_admin).iter_events(pipeline="P3")
                   if e.body["run"]["runId"] in {x["run"]["runId"] for x in own_claims}]
        assert len(claimed) == 4 and {e.site for e in claimed} == {"c"}

    # metatrail pull: a cursor per reading token
    with live(ServerConfig(store=c_store, site="c", auth_cache_ttl=0)) as c:
        narrow = make_token(c_store, "read", site="x", pipelines=["P1"])
        local = f"sqlite:///{tmp_path / 'local.db'}"
        assert pull(local, c.url, token=narrow, show_progress=False).inserted == 10
        assert pull(local, c.url, token=c_token, show_progress=False).inserted == 20
