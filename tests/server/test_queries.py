"""Query routes, and RemoteStore (``--store http://…``) over real loopback HTTP: the same answers as the store the
server serves, for the CLI's runs/show/lineage too."""

from __future__ import annotations

import json

import pytest
from conftest import Tokens
from eventgen import artifact, chain, execution_events
from srvkit import AsgiClient, auth, live

from metatrail import cli
from metatrail.server.config import ServerConfig
from metatrail.store import open_store
from metatrail.store.remote import RemoteRejected, RemoteStore


def _seed(client: AsgiClient, token: str) -> list[dict]:
    events = chain("shared", 3, seed=1) + chain("private", 2, seed=2)
    r = client.post("/api/v1/lineage/batch", json=events, headers=auth(token))
    assert r.status_code == 201
    return events


def test_query_routes(client: AsgiClient, tokens: Tokens) -> None:
    events = _seed(client, tokens.write)
    h = auth(tokens.read)
    pipelines = {p["pipeline"]: p for p in client.get("/api/v1/pipelines", headers=h).json()["pipelines"]}
    assert set(pipelines) == {"shared", "private"} and pipelines["shared"]["stages"] == ["s0", "s1", "s2"]
    runs = client.get("/api/v1/runs", params={"pipeline": "shared", "state": "completed"}, headers=h).json()["runs"]
    assert len(runs) == 3 and all(r["pipeline"] == "shared" for r in runs)
    times = [r["started_at"] for r in runs]
    assert times == sorted(times, reverse=True)
    window = client.get("/api/v1/runs", params={"since": times[1], "until": times[0], "pipeline": "shared"},
                        headers=h).json()["runs"]
    assert [r["started_at"] for r in window] == [times[1]]
    run = client.get(f"/api/v1/runs/{runs[0]['run_id']}", headers=h).json()
    assert run["inputs"][0]["hash"] and run["outputs"][0]["hash"] and run["params"] == {}
    last_output = run["outputs"][0]["artifact_key"]
    graph = client.get("/api/v1/lineage", params={"key": last_output, "depth": 10}, headers=h).json()
    stages = sorted(n["stage"] for n in graph["nodes"] if n["type"] == "run")
    assert stages == ["s0", "s1", "s2"]
    around = client.get("/api/v1/lineage", params={"run_id": runs[-1]["run_id"], "direction": "downstream"},
                        headers=h).json()
    assert sorted(n["stage"] for n in around["nodes"] if n["type"] == "run") == ["s1", "s2"]
    digest = run["outputs"][0]["hash"]
    art = client.get(f"/api/v1/artifacts/{digest}", headers=h).json()
    assert [p["stage"] for p in art["producers"]] == ["s2"] and art["consumers"] == []
    assert client.get("/api/v1/artifacts", params={"key": last_output}, headers=h).json()["artifacts"]
    assert client.get("/api/v1/stats", headers=h).json()["events"] == len(events)
    assert client.get("/api/v1/runs/00000000-0000-4000-8000-000000000000", headers=h).status_code == 404


def test_restricted_token_sees_only_its_pipelines(client: AsgiClient, tokens: Tokens) -> None:
    _seed(client, tokens.write)
    h = auth(tokens.restricted)
    assert [p["pipeline"] for p in client.get("/api/v1/pipelines", headers=h).json()["pipelines"]] == ["shared"]
    runs = client.get("/api/v1/runs", headers=h).json()["runs"]
    assert len(runs) == 3 and {r["pipeline"] for r in runs} == {"shared"}
    assert client.get("/api/v1/runs", params={"pipeline": "private"}, headers=h).json()["runs"] == []
    private = client.get("/api/v1/runs", params={"pipeline": "private"}, headers=auth(tokens.read)).json()["runs"]
    assert client.get(f"/api/v1/runs/{private[0]['run_id']}", headers=h).status_code == 404
    assert client.get("/api/v1/stats", headers=h).status_code == 403
    ids = client.get("/api/v1/sync/ids", headers=h).json()["items"]
    assert len(ids) == 6  # the shared pipeline's 3 runs x 2 events; the private pipeline's events are not offered
    bodies = client.post("/api/v1/sync/fetch", json={"ids": [i for _, i in ids]}, headers=h).json()["events"]
    assert {b["event"]["run"]["facets"]["metatrail_execution"]["pipeline"] for b in bodies} == {"shared"}


def test_remote_store_and_cli_over_loopback(config: ServerConfig, tokens: Tokens, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with live(config) as server:
        writer = RemoteStore(server.url, token=tokens.write)
        remote = RemoteStore(server.url, token=tokens.read)
        events = chain("p", 3, seed=3) + execution_events("p", "side", t0=1.9e9, inputs=[],
                                                          outputs=[artifact("/data/side", "c" * 32)])
        result = writer.ingest(events)
        assert (result.received, result.inserted) == (len(events), len(events))
        assert writer.ingest(events).inserted == 0
        relayed = execution_events("q", "relayed", t0=1.95e9, inputs=[], outputs=[])
        assert writer.ingest(relayed, sites=["site7", None]).inserted == 2
        assert [e.site for e in remote.iter_events(after_seq=len(events))] == ["site7", "site1"]
        events += relayed
        local = open_store(config.store)
        try:
            assert remote.list_runs(limit=1000) == local.list_runs(limit=1000)
            run_id = local.list_runs(pipeline="p", limit=1)[0]["run_id"]
            assert remote.get_run(run_id) == local.get_run(run_id)
            assert remote.get_run("00000000-0000-4000-8000-000000000000") is None
            assert remote.list_pipelines() == local.list_pipelines()
            key = remote.get_run(run_id)["outputs"][0]["artifact_key"]
            for direction in ("upstream", "downstream", "both"):
                assert remote.lineage([key], direction=direction) == local.lineage([key], direction=direction)
            assert remote.find_artifacts(key=key) == local.find_artifacts(key=key)
            assert [e.id for e in remote.iter_events()] == [e.id for e in local.iter_events()]
            assert [e.id for e in remote.iter_events(pipeline="p", limit=3)] == \
                [e.id for e in local.iter_events(pipeline="p", limit=3)]
            stats = remote.stats()
            assert stats["events"] == local.stats()["events"] and "url" not in stats
        finally:
            local.close()
        with pytest.raises(RemoteRejected) as err:
            RemoteStore(server.url, token=tokens.read).ingest(events[:1])
        assert err.value.status == 403
        remote.close()
        writer.close()

        monkeypatch.setenv("METATRAIL_TOKEN", tokens.read)
        assert cli.main(["runs", "--store", server.url, "--json", "--pipeline", "p"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 4 and {r["pipeline"] for r in rows} == {"p"}
        assert cli.main(["show", rows[0]["run_id"], "--store", server.url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["run_id"] == rows[0]["run_id"]
        final = next(r for r in rows if r["stage"] == "s2")
        final_run = RemoteStore(server.url, token=tokens.read).get_run(final["run_id"])
        assert final_run is not None
        out_key = local_key = final_run["outputs"][0]["artifact_key"]
        assert cli.main(["lineage", out_key, "--store", server.url, "--json"]) == 0
        graph = json.loads(capsys.readouterr().out)
        assert sorted(n["stage"] for n in graph["nodes"] if n["type"] == "run") == ["s0", "s1", "s2"]
        assert local_key.startswith("md5:")
        monkeypatch.delenv("METATRAIL_TOKEN")
        assert cli.main(["runs", "--store", server.url]) != 0  # no token: the CLI says so, exit code not 0
        assert "401" in capsys.readouterr().err

