"""What a token limited to some pipelines learns from the lineage graph about runs it may not read: nothing.

Artifacts join by content hash across pipelines, so a walk from a readable run's artifact reaches other pipelines'
runs. Those runs are cut out of the graph; so must be what lies behind them (a readable run two hops on, reached only
through a foreign run, tells the reader that the foreign run links the two), an artifact that only foreign runs
touch (asked for by key, its node would say that the server holds it, and its size), and what a foreign run's edge
says of an artifact (its size) when a readable run's edge says otherwise. Over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
from eventgen import artifact, execution_events
from srvkit import auth, live, make_token

from metatrail.model import uuid7
from metatrail.server.config import ServerConfig

T0 = 1.8e9


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _graph(url: str, token: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/lineage", params=params, headers=auth(token), timeout=30)
    assert r.status_code == 200, r.text
    graph: dict[str, Any] = r.json()
    return graph


def _ids(graph: dict[str, Any], kind: str) -> set[str]:
    return {n["id"] for n in graph["nodes"] if n["type"] == kind}


def _store(url: str, token: str, events: list[dict[str, Any]]) -> None:
    r = httpx.post(f"{url}/api/v1/lineage/batch", json=events, headers=auth(token), timeout=30)
    assert r.status_code == 201, r.text


def test_lineage_stops_at_a_run_the_token_may_not_read(store_url: str) -> None:
    """R1 (A) writes X; F (B) reads X and writes Y; R2 (A) reads Y and writes Z. To a token for A, the graph around
    Z or Y ends at F: neither R1 nor X appears (that would say F links them), and from X nothing lies downstream."""
    x, y, z = _md5("x"), _md5("y"), _md5("z")
    r1, f, r2 = uuid7(T0), uuid7(T0 + 10), uuid7(T0 + 20)
    events = (execution_events("A", "make", t0=T0, run_id=r1, inputs=[], outputs=[artifact("/a/x.csv", x)])
              + execution_events("B", "secret", t0=T0 + 10, run_id=f, inputs=[artifact("/b/x.csv", x)],
                                 outputs=[artifact("/b/y.csv", y)])
              + execution_events("A", "use", t0=T0 + 20, run_id=r2, inputs=[artifact("/a/y.csv", y)],
                                 outputs=[artifact("/a/z.csv", z)]))
    writer, reader, limited = (make_token(store_url, "write"), make_token(store_url, "read"),
                               make_token(store_url, "read", pipelines=["A"]))
    with live(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0)) as hub:
        _store(hub.url, writer, events)
        # The whole chain, to an unrestricted token: the premise.
        full = _graph(hub.url, reader, key=f"md5:{z}", depth=5)
        assert _ids(full, "run") == {f"run:{r1}", f"run:{f}", f"run:{r2}"}

        upstream = _graph(hub.url, limited, key=f"md5:{z}", depth=5)
        assert _ids(upstream, "run") == {f"run:{r2}"}
        assert _ids(upstream, "artifact") == {f"artifact:md5:{z}", f"artifact:md5:{y}"}
        assert {(e["from"], e["to"]) for e in upstream["edges"]} == {
            (f"artifact:md5:{y}", f"run:{r2}"), (f"run:{r2}", f"artifact:md5:{z}")}

        by_run = _graph(hub.url, limited, run_id=r2, direction="upstream", depth=5)
        assert _ids(by_run, "run") == set()  # only F produced Y
        assert _ids(by_run, "artifact") == {f"artifact:md5:{y}"}  # R2's own input
        assert by_run["edges"] == []

        both = _graph(hub.url, limited, key=f"md5:{y}", direction="both", depth=5)
        assert _ids(both, "run") == {f"run:{r2}"}
        assert _ids(both, "artifact") == {f"artifact:md5:{y}", f"artifact:md5:{z}"}

        downstream = _graph(hub.url, limited, key=f"md5:{x}", direction="downstream", depth=5)
        assert _ids(downstream, "run") == set()
        assert _ids(downstream, "artifact") == {f"artifact:md5:{x}"}  # R1 wrote it: the token knows it
        assert downstream["edges"] == []


def test_an_artifact_only_other_pipelines_touch_is_as_unknown(store_url: str) -> None:
    """Asked for by key, an artifact that only runs the token may not read produced or consumed answers as an
    artifact the server never saw: no node (it would say the server holds it, and its size), no edges."""
    w, v = _md5("w"), _md5("v")
    f = uuid7(T0)
    events = execution_events("B", "secret", t0=T0, run_id=f, inputs=[artifact("/b/v.csv", v, size=4321)],
                              outputs=[artifact("/b/w.csv", w, size=1234), artifact("/b/plain.csv", None)])
    writer, limited = make_token(store_url, "write"), make_token(store_url, "read", pipelines=["A"])
    with live(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0)) as hub:
        _store(hub.url, writer, events)
        unknown = _md5("never stored")
        for direction in ("upstream", "downstream", "both"):
            nothing = _graph(hub.url, limited, key=f"md5:{unknown}", direction=direction)
            assert nothing["nodes"] == [] and nothing["edges"] == [], direction
            for key in (f"md5:{w}", f"md5:{v}", "file:/b/plain.csv"):
                graph = _graph(hub.url, limited, key=key, direction=direction)
                assert graph == {"roots": [key], "nodes": [], "edges": []}, (key, direction)
        assert httpx.get(f"{hub.url}/api/v1/artifacts/{w}", headers=auth(limited), timeout=30).status_code == 404


def test_an_artifact_node_says_what_readable_runs_say_of_it(store_url: str) -> None:
    """F (B) wrote X and says it has 999,999 bytes; R (A) read X and says 10. The token for A sees R's word."""
    x = _md5("x")
    f, r = uuid7(T0), uuid7(T0 + 10)
    events = (execution_events("B", "secret", t0=T0, run_id=f, inputs=[],
                               outputs=[artifact("/b/x.csv", x, size=999_999)])
              + execution_events("A", "use", t0=T0 + 10, run_id=r, inputs=[artifact("/a/x.csv", x, size=10)],
                                 outputs=[]))
    writer, reader, limited = (make_token(store_url, "write"), make_token(store_url, "read"),
                               make_token(store_url, "read", pipelines=["A"]))
    with live(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0)) as hub:
        _store(hub.url, writer, events)
        node = f"artifact:md5:{x}"
        full = _graph(hub.url, reader, key=f"md5:{x}", direction="upstream")
        assert [n["size"] for n in full["nodes"] if n["id"] == node] == [999_999]  # F's edge came first
        for params in ({"key": f"md5:{x}", "direction": "upstream"}, {"key": f"md5:{x}", "direction": "both"},
                       {"run_id": r, "direction": "upstream"}):
            graph = _graph(hub.url, limited, **params)
            assert [n["size"] for n in graph["nodes"] if n["id"] == node] == [10], params
            assert _ids(graph, "run") <= {f"run:{r}"}, params


def test_other_pipelines_occurrences_do_not_crowd_out_the_readable_ones(store_url: str) -> None:
    """An answer about an artifact holds at most 1,000 occurrences. Counted before the token's rule, a thousand newer
    occurrences in another pipeline left none of the token's own (a 404 for an artifact its run used: which told it
    that another pipeline used the bytes, a thousand times, since)."""
    x = _md5("x")
    r, f = uuid7(T0), uuid7(T0 + 10)
    events = (execution_events("A", "use", t0=T0, run_id=r, inputs=[artifact("/a/x.csv", x)], outputs=[])
              + execution_events("B", "secret", t0=T0 + 10, run_id=f, outputs=[],
                                 inputs=[artifact(f"/b/copy{i}.csv", x) for i in range(1000)]))
    writer, reader, limited = (make_token(store_url, "write"), make_token(store_url, "read"),
                               make_token(store_url, "read", pipelines=["A"]))
    with live(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0)) as hub:
        _store(hub.url, writer, events)
        full = httpx.get(f"{hub.url}/api/v1/artifacts/{x}", headers=auth(reader), timeout=30).json()
        assert {c["run_id"] for c in full["consumers"]} == {f}  # newest first, cut at 1,000: the premise
        mine = httpx.get(f"{hub.url}/api/v1/artifacts/{x}", headers=auth(limited), timeout=30)
        assert mine.status_code == 200, mine.text
        assert [c["run_id"] for c in mine.json()["consumers"]] == [r] and mine.json()["producers"] == []
        for params in ({"hash": x}, {"key": f"md5:{x}"}, {"namespace": "file"}):
            found = httpx.get(f"{hub.url}/api/v1/artifacts", params=params, headers=auth(limited), timeout=30)
            assert [a["run_id"] for a in found.json()["artifacts"]] == [r], params
