"""Security: every route has an explicit policy (deny by default), 401/403 rules, sites, token lifecycle and CLI,
start-up refusal on public addresses, TLS, request size limits, path traversal."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Tokens
from srvkit import AsgiClient, auth, bulk_events, live, make_token, self_signed_certificate

from metatrail.server import commands
from metatrail.server.app import FRAMEWORK_ROUTES, create_app, route_table
from metatrail.server.auth import PUBLIC, TokenStore, policy
from metatrail.server.config import ServerConfig
from metatrail.server.routes import make_router
from metatrail.store import ingest
from metatrail.store.remote import RemoteUnavailable, ServerClient

PUBLIC_ROUTES = {("/health", "GET"), ("/api/v1/version", "GET"), ("/openapi.json", "GET"), ("/openapi.json", "HEAD")}
SAMPLE = {"run_id": "123e4567-e89b-12d3-a456-426614174000", "hash": "d41d8cd98f00b204e9800998ecf8427e",
          "name": "peer1", "token_id": "0123456789ab"}


def _routes(client: AsgiClient) -> list[tuple[str, str, str | None]]:
    return [(path, m, pol) for path, methods, pol in route_table(client.app) for m in sorted(methods)]


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE[m.group(1)], path)


def test_every_route_has_an_explicit_policy(client: AsgiClient) -> None:
    routes = _routes(client)
    assert len(routes) >= 24
    assert all(pol in ("public", "read", "write", "admin") for _, _, pol in routes), routes
    assert {(p, m) for p, m, pol in routes if pol == "public"} == PUBLIC_ROUTES
    assert set(FRAMEWORK_ROUTES) == {"/openapi.json"}
    writes = {p for p, m, pol in routes if pol == "write"}
    assert writes == {"/api/v1/lineage", "/api/v1/lineage/batch", "/api/v1/sync/missing", "/api/v1/sync/push"}


def test_a_route_without_policy_is_denied(config: ServerConfig, tokens: Tokens) -> None:
    app = create_app(config)
    router = make_router()

    @router.get("/api/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {"secret": "leaked"}

    @router.get("/api/v1/declared")
    @policy(PUBLIC)
    async def declared() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(router)
    c = AsgiClient(app)
    try:
        for token in (None, tokens.read, tokens.admin):
            r = c.get("/api/v1/forgotten", headers=auth(token) if token else {})
            assert r.status_code == 403 and "secret" not in r.text
        assert c.get("/api/v1/declared").json() == {"ok": "yes"}
        assert ("/api/v1/forgotten", frozenset({"GET"}), None) in route_table(app)
    finally:
        c.close()


def test_authentication_and_scopes(client: AsgiClient, tokens: Tokens) -> None:
    for path, method, pol in _routes(client):
        url = _url(path)
        if pol == "public" or method == "HEAD":
            assert client.request(method, url).status_code < 400 or path != "/health"
            continue
        r = client.request(method, url)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.status_code)
        for bad in ("Bearer", "Bearer nonsense", "Basic dXNlcjpwYXNz", f"Token {tokens.admin}",
                    "Bearer mt_0123456789ab_" + "x" * 43):
            assert client.request(method, url, headers={"Authorization": bad}).status_code == 401, (path, bad)
        assert client.request(method, url, params={"token": tokens.admin}).status_code == 401
        if pol == "read":
            assert client.request(method, url, headers=auth(tokens.write)).status_code == 403, path
        elif pol == "write":
            assert client.request(method, url, headers=auth(tokens.read)).status_code == 403, path
        else:
            for token in (tokens.read, tokens.write, tokens.other_site):
                assert client.request(method, url, headers=auth(token)).status_code == 403, path


def test_sites(client: AsgiClient, tokens: Tokens) -> None:
    event = bulk_events(1)[0]
    h = {**auth(tokens.other_site), "X-Metatrail-Site": "site1"}
    r = client.post("/api/v1/lineage", json=event, headers=h)
    assert r.status_code == 403 and r.json()["error"] == "wrong_site"
    r = client.post("/api/v1/sync/push", json={"events": [event]}, headers=h)
    assert r.status_code == 403
    assert client.get("/api/v1/stats", headers=auth(tokens.read)).json()["events"] == 0
    ok = {**auth(tokens.other_site), "X-Metatrail-Site": "site2"}
    assert client.post("/api/v1/lineage", json=event, headers=ok).status_code == 201
    relay = {**auth(tokens.admin), "X-Metatrail-Site": "site9"}
    assert client.post("/api/v1/lineage", json=bulk_events(1, t0=1.9e9)[1], headers=relay).status_code == 201
    sites = [e["site"] for e in client.get("/api/v1/events", headers=auth(tokens.read)).json()["events"]]
    assert sites == ["site2", "site9"]


def test_token_lifecycle_cli_and_hashing(config: ServerConfig, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", config.store]
    assert commands.main(["token", "create", "--scope", "read,write", "--site", "lab", "--name", "ci", *store]) == 0
    text = capsys.readouterr().out.strip()
    assert re.fullmatch(r"mt_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", text)
    assert commands.main(["token", "list", "--json", *store]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["scopes"], t["site"]) for t in listed] == [("ci", ["read", "write"], "lab")]
    assert "secret_sha256" not in listed[0]
    # Stored hashed: the secret never appears in the database (SQLite: anywhere in its file; PostgreSQL: in any
    # text column of any table).
    secret = text.split("_", 2)[2]
    if config.store.startswith("sqlite"):
        assert secret.encode() not in Path(config.store[len("sqlite:///"):]).read_bytes()
    else:
        import psycopg

        with psycopg.connect(config.store) as conn:
            columns = conn.execute("SELECT table_name, column_name FROM information_schema.columns WHERE "
                                   "table_schema = 'public' AND data_type IN ('text', 'character varying')").fetchall()
            assert ("tokens", "secret_sha256") in columns
            for table, column in columns:
                found = conn.execute(f'SELECT count(*) FROM "{table}" WHERE "{column}" LIKE %s',
                                     [f"%{secret}%"]).fetchone()
                assert found == (0,), (table, column)
    app = create_app(config)
    c = AsgiClient(app)
    try:
        assert c.get("/api/v1/runs", headers=auth(text)).status_code == 200
        capsys.readouterr()
        assert commands.main(["token", "revoke", listed[0]["id"], *store]) == 0
        # The CLI cannot clear a running server's lookup cache: it says so, and how to revoke at once.
        assert f"DELETE /api/v1/admin/tokens/{listed[0]['id']}" in capsys.readouterr().out
        assert c.get("/api/v1/runs", headers=auth(text)).status_code == 401  # auth cache TTL 0: at once
    finally:
        c.close()
    assert commands.main(["token", "revoke", listed[0]["id"], *store]) == 1
    assert "no active token" in capsys.readouterr().err
    assert commands.main(["token", "create", "--scope", "root", *store]) == 1
    assert "scopes must be" in capsys.readouterr().err


def test_revoking_with_the_cli_says_how_long_a_running_server_may_accept_the_token(
        store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI (another process) cannot clear a running server's token cache: it names the server's real cache
    time and the API route that revokes at once; that route does, even for a token the server just checked."""
    from metatrail.server.config import AUTH_CACHE_TTL

    config = ServerConfig(store=store_url, site="hub")  # the token cache `metatrail server` runs with
    assert config.auth_cache_ttl == AUTH_CACHE_TTL > 0
    by_cli, by_api, admin = (make_token(store_url, scopes) for scopes in ("read", "read", "admin"))
    c = AsgiClient(create_app(config))
    try:
        assert all(c.get("/api/v1/runs", headers=auth(t)).status_code == 200 for t in (by_cli, by_api))
        capsys.readouterr()
        assert commands.main(["token", "revoke", by_cli.split("_")[1], "--store", store_url]) == 0
        out = capsys.readouterr().out
        assert f"may accept it for up to {AUTH_CACHE_TTL:g} s more" in out and "DELETE /api/v1/admin/tokens/" in out
        api_id = by_api.split("_")[1]
        assert c.delete(f"/api/v1/admin/tokens/{api_id}", headers=auth(admin)).json() == {"revoked": api_id}
        assert c.get("/api/v1/runs", headers=auth(by_api)).status_code == 401  # cached a moment ago: refused now
    finally:
        c.close()


def test_a_revoke_during_a_lookup_is_not_undone_by_its_cache_entry(store_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that read the token's row just before a revoke through the server must not cache the principal it
    read just after (the revoke's cache clear would be undone for a whole TTL)."""
    from metatrail.server import auth as auth_module

    tokens = TokenStore(store_url, ttl=60)
    record, text = tokens.create(name="t", scopes=["read"], site="s")
    reading = auth_module.dialect.reading

    @contextlib.contextmanager
    def read_then_revoke(engine: Any) -> Iterator[Any]:
        with reading(engine) as conn:
            yield conn
        assert tokens.revoke(record["id"])  # lands between the lookup's read and its cache write

    monkeypatch.setattr(auth_module.dialect, "reading", read_then_revoke)
    try:
        assert tokens.verify(text) is not None  # the request in flight was checked before the revoke
        monkeypatch.setattr(auth_module.dialect, "reading", reading)
        assert tokens.verify(text) is None
    finally:
        tokens.close()


def test_revocation_within_cache_ttl(store_url: str) -> None:
    tokens = TokenStore(store_url, ttl=0.5)
    record, text = tokens.create(name="t", scopes=["read"], site="s")
    assert tokens.verify(text) is not None
    other = TokenStore(store_url, ttl=0)  # another process (the CLI) revokes it
    assert other.revoke(record["id"])
    assert tokens.verify(text) is not None  # still cached
    time.sleep(0.6)
    assert tokens.verify(text) is None
    tokens.close()
    other.close()


def test_refuses_public_address_without_admin_token(config: ServerConfig, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    def serve(*args: Any, **kwargs: Any) -> None:  # a regression fails here instead of serving forever
        raise AssertionError(f"the server started on {kwargs.get('host')!r} with no admin token")

    monkeypatch.setattr(uvicorn, "run", serve)
    for host in ("0.0.0.0", "", "::", "192.0.2.1", "127.0.0.1.example", "localhost.example"):
        # an empty host binds every interface too; a name that merely starts like a loopback one is not one
        code = commands.main(["server", "--store", config.store, "--host", host, "--port", "1"])
        assert code == 1, host
        assert "no admin token" in capsys.readouterr().err
    assert commands.main(["server", "--store", config.store, "--host", ""]) == 1
    assert "refusing to listen on every interface" in capsys.readouterr().err
    assert commands.main(["server", "--store", config.store, "--tls-cert", "x.pem"]) == 1
    assert "--tls-key" in capsys.readouterr().err
    assert commands.main(["server", "--store", config.store, "--forward", "--forward-concurrency", "0"]) == 1
    assert "--forward-concurrency must be at least 1" in capsys.readouterr().err


def test_only_explicit_loopback_addresses_are_loopback() -> None:
    """What lets a server start without an admin token (and a client skip compression): an address that says it
    is loopback. An empty host, a wildcard or a look-alike name is not one."""
    from metatrail.store.remote import is_loopback

    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("", " ", "0.0.0.0", "::", "[::]", "192.0.2.1", "localhost.example",
                                            "127.0.0.1.example", "example.org"))
    assert ServerClient("http://localhost:1")._compress is False
    assert ServerClient("http://192.0.2.1:1")._compress is True


def test_tls(config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    with live(config, ssl_certfile=cert, ssl_keyfile=key) as server:
        assert server.url.startswith("https://")
        client = ServerClient(server.url, tokens.write, ca_bundle=cert)
        reply = client.request("POST", "/api/v1/lineage", json_body=bulk_events(1)[0])
        assert reply["stored"] is True
        client.close()
        untrusting = ServerClient(server.url, tokens.write)
        with pytest.raises(RemoteUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            untrusting.request("GET", "/health")
        plain = ServerClient(server.url.replace("https", "http"), tokens.write)
        with pytest.raises(RemoteUnavailable):
            plain.request("GET", "/api/v1/stats")


def test_body_limits_on_every_route(client: AsgiClient, tokens: Tokens) -> None:
    big = 65 * 1024 * 1024

    async def chunks() -> object:
        block = b" " * (1024 * 1024)
        for _ in range(big // len(block)):
            yield block

    for path in ("/api/v1/admin/tokens", "/api/v1/peers", "/api/v1/sync/missing", "/api/v1/sync/push"):
        r = client.post(path, content=chunks(), headers=auth(tokens.admin))  # chunked: no Content-Length
        assert r.status_code == 413, path
        r = client.post(path, content=b"{}", headers={**auth(tokens.admin), "Content-Length": str(big)})
        assert r.status_code in (400, 413), path


TRAVERSAL = ["../x", "..%2fx", "%2e%2e%2fx", "%252e%252e%252fx", "..\\x", "..%5cx", "/etc/passwd", "C:\\x", "C:x",
             "\\\\srv\\share", "a/../../b", "a;/../b", "a#/../b", "a?q=../../b", "file:///etc/passwd", "%00",
             "\uff0e\uff0e\uff0f", "%c0%ae%c0%ae/", "....//....//etc/passwd"]


def test_path_traversal_is_refused(client: AsgiClient, tokens: Tokens, tmp_path: Path) -> None:
    canary = tmp_path.parent / "canary.txt"
    canary.write_text("do not read")
    prefixes = ["/api/v1/runs/", "/api/v1/artifacts/", "/api/v1/peers/", "/api/v1/admin/tokens/"]
    for prefix in prefixes:
        for attack in TRAVERSAL:
            for method in ("GET", "DELETE", "POST"):
                r = client.request(method, prefix + attack, headers=auth(tokens.admin))
                assert 400 <= r.status_code < 500, (method, prefix + attack, r.status_code)
                assert "do not read" not in r.text
    for attack in TRAVERSAL:
        r = client.get("/api/v1/lineage", params={"key": attack}, headers=auth(tokens.read))
        assert 400 <= r.status_code < 500 or r.json()["nodes"] == [], attack
        r = client.get("/api/v1/artifacts", params={"hash": attack}, headers=auth(tokens.read))
        assert r.status_code == 422, attack
    assert canary.read_text() == "do not read"
    for params in ({"name": "\x00"}, {"pipeline": "a\x00b"}, {"key": "md5:\x00"}):
        for path in ("/api/v1/artifacts", "/api/v1/runs", "/api/v1/lineage"):
            r = client.get(path, params=params, headers=auth(tokens.read))
            assert r.status_code == 400 and r.json()["error"] == "bad_query", (path, params)
    r = client.post("/api/v1/lineage", json=bulk_events(1)[0], headers={**auth(tokens.admin),
                                                                         "X-Metatrail-Site": "a\tb"})
    assert r.status_code == 400


def test_names_with_a_trailing_newline_are_refused(store_url: str) -> None:
    """Patterns end at the end of the text, not before a final newline (``$`` allows one)."""
    from metatrail.errors import ConfigError

    tokens = TokenStore(store_url, ttl=0)
    try:
        with pytest.raises(ConfigError, match="site"):
            tokens.create(name="t", scopes=["read"], site="lab\n")
        _, text = tokens.create(name="t", scopes=["read"], site="lab")
        assert tokens.verify(text) is not None and tokens.verify(text + "\n") is None
    finally:
        tokens.close()


def _step_of(parent: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` made steps of ``parent``'s run (the spec's parent facet)."""
    for event in events:
        event["run"]["facets"]["parent"] = {
            "_producer": "p", "_schemaURL": "https://openlineage.io/spec/facets/1-0-1/ParentRunFacet.json",
            "run": {"runId": parent["run"]["runId"]}, "job": {"namespace": "bulk", "name": parent["job"]["name"]}}
    return events


def _refused(client: AsgiClient, token: str, event: dict[str, Any]) -> None:
    """Every write route refuses ``event`` from ``token`` with 403 pipeline_forbidden."""
    for route, body in (("/api/v1/lineage", event), ("/api/v1/lineage/batch", [event]),
                        ("/api/v1/sync/push", {"events": [event]})):
        r = client.post(route, json=body, headers=auth(token))
        assert r.status_code == 403 and r.json()["error"] == "pipeline_forbidden", (route, r.text)


def test_a_pipeline_restricted_token_cannot_relabel_a_run_it_may_not_read(client: AsgiClient, tokens: Tokens,
                                                                          config: ServerConfig) -> None:
    """A run's pipeline follows its latest event: a token that may read only ``public`` must not move a run of
    ``secret`` into ``public`` with a later event (and then read it, parameters and all)."""
    limited = make_token(config.store, "read,write", pipelines=["public"])
    secret = bulk_events(1, pipeline="secret", tag="api_key")
    assert client.post("/api/v1/lineage/batch", json=secret, headers=auth(tokens.write)).status_code == 201
    rid = secret[0]["run"]["runId"]
    relabel = json.loads(json.dumps(secret[1]))
    relabel["eventTime"] = "2030-01-01T00:00:00Z"
    relabel["run"]["facets"]["metatrail_execution"]["pipeline"] = "public"
    _refused(client, limited, relabel)
    assert "belongs to a pipeline this token may not read" in client.post(
        "/api/v1/lineage", json=relabel, headers=auth(limited)).json()["message"]
    assert client.get(f"/api/v1/runs/{rid}", headers=auth(limited)).status_code == 404
    assert client.get("/api/v1/events", params={"run_id": rid}, headers=auth(limited)).json()["events"] == []
    assert client.get(f"/api/v1/runs/{rid}", headers=auth(tokens.read)).json()["event_count"] == 2  # nothing stored


def test_a_pipeline_restricted_token_writes_only_into_its_pipelines(client: AsgiClient, tokens: Tokens,
                                                                     config: ServerConfig) -> None:
    """An event's own pipeline is derived as the projection derives a run's: our facet's pipeline, else the parent
    job's name, else the job's name. The token may write it only where it may read it."""
    limited = make_token(config.store, "read,write", pipelines=["public"])
    new_secret = bulk_events(1, pipeline="secret", t0=1.9e9)[0]
    _refused(client, limited, new_secret)
    bare = json.loads(json.dumps(new_secret))
    del bare["run"]["facets"]["metatrail_execution"]
    _refused(client, limited, bare)  # no facet: the job's name ("secret.step") is its pipeline
    parent = bulk_events(1, pipeline="public", t0=1.95e9)[0]
    parent["job"]["name"] = "public"
    stepped = _step_of(parent, [json.loads(json.dumps(bare))])[0]
    assert client.post("/api/v1/lineage", json=stepped, headers=auth(limited)).status_code == 201  # parent's job
    job_event = {"eventTime": "2030-01-01T00:00:00Z", "producer": "p", "job": {"namespace": "ns", "name": "public"},
                 "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/JobEvent"}
    r = client.post("/api/v1/lineage", json=job_event, headers=auth(limited))
    assert r.status_code == 403 and "no pipeline" in r.json()["message"]  # no run: no pipeline it may read
    assert client.post("/api/v1/lineage", json=job_event, headers=auth(tokens.write)).status_code == 201
    mine = bulk_events(2, pipeline="public", t0=1.7e9)
    assert client.post("/api/v1/lineage/batch", json=mine[:2], headers=auth(limited)).status_code == 201
    assert client.post("/api/v1/lineage", json=mine[2], headers=auth(limited)).status_code == 201
    assert client.post("/api/v1/sync/push", json={"events": mine[3:]}, headers=auth(limited)).status_code == 201
    # a later event into its own run, already stored under its pipeline: fine
    later = json.loads(json.dumps(mine[1]))
    later["eventTime"], later["eventType"] = "2030-01-01T00:00:00Z", "OTHER"
    assert client.post("/api/v1/lineage", json=later, headers=auth(limited)).status_code == 201
    assert client.get(f"/api/v1/runs/{mine[0]['run']['runId']}", headers=auth(limited)).json()["event_count"] == 3


def test_unrestricted_writes_look_nothing_up(client: AsgiClient, tokens: Tokens,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline check costs an unrestricted token nothing: no store lookup on any write route."""
    def no_lookup(*args: Any) -> None:
        raise AssertionError("an unrestricted write looked up run pipelines")

    monkeypatch.setattr(ingest, "refuse_foreign_runs", no_lookup)
    events = bulk_events(3, pipeline="secret")
    assert client.post("/api/v1/lineage", json=events[0], headers=auth(tokens.write)).status_code == 201
    assert client.post("/api/v1/lineage/batch", json=events[1:4], headers=auth(tokens.write)).status_code == 201
    r = client.post("/api/v1/sync/push", json={"events": events[4:]}, headers=auth(tokens.admin))
    assert r.status_code == 201


def test_a_restricted_token_sees_no_steps_of_other_pipelines(client: AsgiClient, tokens: Tokens,
                                                              config: ServerConfig) -> None:
    """A run it may read lists only the steps (child runs) it may read: not another pipeline's ids and stages."""
    limited = make_token(config.store, "read", pipelines=["public"])
    parent = bulk_events(1, pipeline="public", t0=1.6e9)
    steps = _step_of(parent[0], bulk_events(1, pipeline="secret", t0=1.6e9 + 10)
                     + bulk_events(1, pipeline="public", t0=1.6e9 + 20))
    assert client.post("/api/v1/lineage/batch", json=parent + steps, headers=auth(tokens.write)).status_code == 201
    pid, secret_step, public_step = (e["run"]["runId"] for e in (parent[0], steps[0], steps[2]))
    children = client.get(f"/api/v1/runs/{pid}", headers=auth(tokens.read)).json()["children"]
    assert [c["run_id"] for c in children] == [secret_step, public_step]
    children = client.get(f"/api/v1/runs/{pid}", headers=auth(limited)).json()["children"]
    assert [c["run_id"] for c in children] == [public_step]


def test_lineage_lists_an_artifact_only_under_names_readable_runs_gave_it(client: AsgiClient, tokens: Tokens,
                                                                          config: ServerConfig) -> None:
    """Artifacts join by content hash across pipelines; the path another pipeline read the same bytes from is that
    pipeline's business, not something a token limited to the first may learn from the graph."""
    public = make_token(config.store, "read", pipelines=["pub"])
    digest = "0123456789abcdef0123456789abcdef"

    def dataset(name: str) -> dict[str, object]:
        return {"namespace": "file", "name": name, "facets": {"metatrail_artifact": {
            "_producer": "p", "_schemaURL": "https://example.com/s", "uri": name, "kind": "file",
            "algorithm": "md5", "hash": digest, "size": 10}}}

    export, ingest = bulk_events(1, pipeline="pub", t0=1.7e9)[1], bulk_events(1, pipeline="sec", t0=1.8e9)[1]
    export["outputs"], export["inputs"] = [dataset("/data/pub/report.csv")], []
    ingest["inputs"], ingest["outputs"] = [dataset("/vault/sec/payroll.csv")], []
    assert client.post("/api/v1/lineage/batch", json=[export, ingest], headers=auth(tokens.write)).status_code == 201
    both_names = ["/data/pub/report.csv", "/vault/sec/payroll.csv"]
    for query, everyone, limited_to_pub in (
            ({"key": f"md5:{digest}", "direction": "both"}, both_names, ["/data/pub/report.csv"]),
            # downstream of the public run: only the secret run used the bytes after it, under its own path
            ({"run_id": export["run"]["runId"], "direction": "downstream"}, ["/vault/sec/payroll.csv"], [])):
        full = client.get("/api/v1/lineage", params=query, headers=auth(tokens.read)).json()
        limited = client.get("/api/v1/lineage", params=query, headers=auth(public)).json()
        assert [n["names"] for n in full["nodes"] if n["type"] == "artifact"] == [everyone], query
        assert [n["names"] for n in limited["nodes"] if n["type"] == "artifact"] == [limited_to_pub], query
        assert {n.get("pipeline") for n in limited["nodes"] if n["type"] == "run"} <= {"pub"}
