"""push/pull between local stores and a server over real loopback HTTP: only missing events travel, cursors make
it resumable, selections filter, origins are recorded, and PostgreSQL log positions follow commit order."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Tokens
from eventgen import chain
from srvkit import FaultProxy, auth, bulk_events, ids_of, live

from metatrail.errors import EventError
from metatrail.server import commands
from metatrail.server.config import ServerConfig
from metatrail.store import open_store
from metatrail.store.remote import RemoteUnavailable, ServerClient
from metatrail.sync import Filter, HttpEndpoint, LocalEndpoint, Shipped, SyncLog, parse_since, peer_key, pull, push


def _local(tmp_path: Path, name: str, events: list[dict] | None = None) -> str:
    url = f"sqlite:///{tmp_path / name / 'metatrail.db'}"
    store = open_store(url)
    if events:
        store.ingest(events)
    store.close()
    return url


def _ids(url: str) -> set[str]:
    store = open_store(url)
    try:
        return {e.id for e in store.iter_events()}
    finally:
        store.close()


def test_push_then_pull_exchange_only_missing(config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    a_events = chain("alpha", 4, seed=1)
    b_events = chain("beta", 3, seed=2) + a_events[:2]  # b already holds two of a's events
    a = _local(tmp_path, "a", a_events)
    b = _local(tmp_path, "b", b_events)
    with live(config) as server:
        first = push(a, server.url, token=tokens.write, show_progress=False)
        assert (first.sent, first.inserted, first.scanned) == (8, 8, 8)
        second = push(a, server.url, token=tokens.write, show_progress=False)
        assert (second.sent, second.pages) == (0, 1)  # the cursor is at the end: nothing examined, nothing sent
        assert not second.rewound  # its anchor (the newest event pushed) is where it was, on both sides
        from_b = push(b, server.url, token=tokens.other_site, show_progress=False)
        assert (from_b.sent, from_b.inserted) == (6, 6)  # b's copies of a's two events stayed home
        pulled = pull(a, server.url, token=tokens.read, show_progress=False)
        assert (pulled.sent, pulled.inserted) == (6, 6)  # only b's pipeline came back; a's own did not travel
        assert _ids(a) == ids_of(a_events + b_events)
        again = pull(a, server.url, token=tokens.read, show_progress=False)
        assert again.sent == 0
        # Pulled events carry their origin: what b pushed was recorded as site2 on the server and here.
        store = open_store(a)
        sites = {e.id: e.site for e in store.iter_events()}
        store.close()
        assert {sites[i] for i in ids_of(b_events[:-2])} == {"site2"}
        assert {sites[i] for i in ids_of(a_events)} == {None}
        # push of events pulled from the server sends nothing: the server has them
        assert push(a, server.url, token=tokens.write, show_progress=False).sent == 0
        log = SyncLog(a)
        assert {(c["direction"], c["scope"]) for c in log.cursors()} == {("push", ""), ("pull", "")}
        log.close()


def test_selections(config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    events = chain("keep", 2, seed=1, t0=1.8e9) + chain("skip", 2, seed=2, t0=1.8e9) + \
        chain("late", 2, seed=3, t0=1.9e9)
    a = _local(tmp_path, "a", events)
    with live(config) as server:
        r = push(a, server.url, token=tokens.write, filt=Filter(pipeline="keep"), show_progress=False)
        assert r.sent == 4
        r = push(a, server.url, token=tokens.write, filt=Filter(since=1.85e9), show_progress=False)
        assert r.sent == 4
        store = open_store(a)
        parent = store.list_runs(pipeline="skip", kind="execution", limit=1)[0]["parent_run_id"]
        store.close()
        r = push(a, server.url, token=tokens.write, filt=Filter(run_id=parent), show_progress=False)
        assert r.sent == 4  # the pipeline run's executions (the run filter takes a run and its children)
        assert push(a, server.url, token=tokens.write, show_progress=False).sent == 0
        b = _local(tmp_path, "b")
        assert pull(b, server.url, token=tokens.read, filt=Filter(pipeline="late"), show_progress=False).sent == 4
        assert pull(b, server.url, token=tokens.restricted, show_progress=False).sent == 0  # only "shared"


def test_push_is_resumable_after_interruption(config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    events = bulk_events(2500)  # three pages: two in flight at once, then one more
    a = _local(tmp_path, "a", events)
    with live(config) as server:
        proxy = FaultProxy(server.url.replace("http://", ""))
        try:
            proxy.fail_after = 3  # the server becomes unavailable mid-push (after the first page's requests)
            with pytest.raises(RemoteUnavailable):
                push(a, proxy.url, token=tokens.write, show_progress=False)
            log = SyncLog(a)
            position = log.get_cursor(peer_key(proxy.url), "push")
            log.close()
            assert 0 < position < 5000  # the acknowledged pages are remembered
            proxy.fail_after = None
            rest = push(a, proxy.url, token=tokens.write, show_progress=False)
            assert rest.scanned == 5000 - position
        finally:
            proxy.close()
        served = SyncLog(config.store)
        try:
            assert served.missing(sorted(ids_of(events))) == []
            assert served.digest()["events"] == 5000
        finally:
            served.close()


def test_pull_is_resumable_after_interruption(config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    events = bulk_events(2500)
    held = open_store(config.store)
    try:
        held.ingest(events)
    finally:
        held.close()
    b = _local(tmp_path, "b")
    with live(config) as server:
        proxy = FaultProxy(server.url.replace("http://", ""))
        try:
            proxy.fail_after = 4  # the server becomes unavailable mid-pull (after the first pages' requests)
            with pytest.raises(RemoteUnavailable):
                pull(b, proxy.url, token=tokens.read, show_progress=False)
            local = SyncLog(b)
            got = local.digest()["events"]
            local.close()
            assert 0 < got < 5000  # what arrived is kept
            proxy.fail_after = None
            rest = pull(b, proxy.url, token=tokens.read, show_progress=False)
            assert rest.inserted == 5000 - got  # only what the first pull did not bring
            assert rest.scanned < 5000  # from the cursor the first pull left, not from the start
        finally:
            proxy.close()
    local = SyncLog(b)
    try:
        assert local.missing(sorted(ids_of(events))) == []
        assert local.digest()["events"] == 5000
    finally:
        local.close()


def test_a_long_push_on_a_terminal_shows_its_progress(config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    a = _local(tmp_path, "a", bulk_events(1500))  # 3,000 events: past the size that draws a bar
    with live(config) as server:
        terminal, child_end = pty.openpty()  # the command's output is a terminal, as a user's is
        proc = subprocess.Popen([sys.executable, "-m", "metatrail.server", "push", "--store", a, "--to", server.url,
                                 "--token", tokens.write], stdin=subprocess.DEVNULL, stdout=child_end,
                                stderr=child_end, env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
        os.close(child_end)
        shown = b""
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                if not select.select([terminal], [], [], 1.0)[0]:
                    continue
                try:
                    chunk = os.read(terminal, 65536)
                except OSError:  # EIO: the command has ended and closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            assert proc.wait(60) == 0
        finally:
            os.close(terminal)
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = shown.decode(errors="replace")
    assert f"push to {server.url}" in text and "/3000" in text  # the bar: what moves where, done of all
    assert "pushed 3000 events" in text


def test_cli_push_pull(config: ServerConfig, tokens: Tokens, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    a = _local(tmp_path, "a", chain("cli", 2, seed=5))
    b = _local(tmp_path, "b")
    with live(config) as server:
        assert commands.main(["push", "--store", a, "--to", server.url, "--token", tokens.write]) == 0
        assert "pushed 4 events" in capsys.readouterr().out
        # --all compares the whole log: it examines every event again and sends none the server already has.
        assert commands.main(["push", "--all", "--store", a, "--to", server.url, "--token", tokens.write]) == 0
        assert "pushed 0 events (0 new to the server) of 4 examined" in capsys.readouterr().out
        monkeypatch.setenv("METATRAIL_SERVER", server.url)
        monkeypatch.setenv("METATRAIL_TOKEN", tokens.read)
        assert commands.main(["pull", "--store", b, "--pipeline", "cli", "--since", "2020-01-01"]) == 0
        assert "pulled 4 events" in capsys.readouterr().out
        assert commands.main(["push", "--store", b, "--token", tokens.read]) == 1
        assert "403" in capsys.readouterr().err
    assert commands.main(["pull", "--store", b, "--from", "http://127.0.0.1:9"]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_pull_refuses_what_a_peer_should_not_send(tmp_path: Path) -> None:
    store = open_store(_local(tmp_path, "a"))
    local = LocalEndpoint(store)
    bad = bulk_events(1)[0]
    bad["inputs"][0]["namespace"] = "file://../../etc/passwd\u0000"
    with pytest.raises(EventError):
        local.receive([Shipped(id="0" * 64, site="evil", text=json.dumps(bad))])
    assert local.log.digest()["events"] == 0
    local.close()
    store.close()


def test_parse_since() -> None:
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("2024-01-01") == 1704067200.0
    assert parse_since("2024-01-01T00:00:00+01:00") == 1704063600.0
    assert parse_since(None) is None
    before = time.time()
    age = parse_since("2h")
    assert age is not None and before - 7200 - 1 <= age <= time.time() - 7200


def test_cursor_scopes_name_everything_that_selects() -> None:
    # an age is keyed as given, so `--since 2h` resumes the next time instead of adding a cursor per run
    assert Filter(since=1.0, since_text="2h").scope == Filter(since=2.0, since_text="2h").scope == "since=2h"
    # a selection of pipelines (a peer's share list) has a cursor of its own, whatever the order it was given in
    assert Filter(pipelines=frozenset({"b", "a"})).scope == "pipelines=a,b" != Filter(pipelines=frozenset({"a"})).scope
    assert Filter().scope == ""


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_postgres_log_positions_follow_commit_order(store_url: str, tmp_path: Path) -> None:
    """Concurrent writers on PostgreSQL while a reader pages the log with a cursor: nothing may be skipped. (Without
    the store's log lock a sequence value can commit after a larger one, and this reader misses ~10% of events.)"""
    open_store(store_url).close()
    batches = [bulk_events(60, t0=1.8e9 + 1000 * w, tag=str(w)) for w in range(8)]

    def writer(events: list[dict]) -> None:
        store = open_store(store_url)
        try:
            for i in range(0, len(events), 2):
                store.ingest(events[i : i + 2])
        finally:
            store.close()

    threads = [threading.Thread(target=writer, args=(b,)) for b in batches]
    log = SyncLog(store_url)
    seen: set[str] = set()
    cursor, reads = 0, 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        page = log.page(cursor, Filter(), 50)
        seen.update(i for _, i in page.items)
        cursor, reads = page.last, reads + 1
    for t in threads:
        t.join()
    while True:
        page = log.page(cursor, Filter(), 50)
        seen.update(i for _, i in page.items)
        cursor = page.last
        if not page.more:
            break
    assert reads > 10 and log.digest()["events"] == 960
    assert seen == ids_of([e for b in batches for e in b])
    log.close()
    # and a whole transfer to a local store agrees
    from metatrail.sync import transfer

    source, target = LocalEndpoint(open_store(store_url)), LocalEndpoint(open_store(_local(tmp_path, "reader")))
    transfer(source, target, log=target.log, peer="pg", direction="pull")
    assert target.log.digest() == source.log.digest()
    for endpoint in (source, target):
        endpoint.close()
        endpoint.store.close()


def test_http_endpoint_refuses_malformed_ids(config: ServerConfig, tokens: Tokens) -> None:
    with live(config) as server:
        client = ServerClient(server.url, tokens.read)
        endpoint = HttpEndpoint(client)
        assert endpoint.page(0, Filter(), 10).items == []
        client.request("GET", "/api/v1/sync/ids", params={"after": 0})
        assert client.request("POST", "/api/v1/sync/fetch", json_body={"ids": []}) == {"events": []}
        r = ServerClient(server.url, tokens.read)
        try:
            r.request("POST", "/api/v1/sync/fetch", json_body={"ids": ["../../etc/passwd"]})
        except Exception as exc:
            assert getattr(exc, "status", None) == 422
        else:
            raise AssertionError("malformed ids accepted")
        assert auth(tokens.read)


def test_push_splits_batches_the_server_finds_too_large(store_url: str, tmp_path: Path) -> None:
    from dataclasses import replace

    from srvkit import make_token

    config = ServerConfig(store=store_url, auth_cache_ttl=0)
    config = replace(config, max_batch_bytes=256 * 1024)  # ~80 events of ~3 KB per request at most
    token = make_token(store_url, "write")
    events = bulk_events(300)
    huge = bulk_events(1, pipeline="huge", t0=1.9e9)[0]
    huge["run"]["facets"]["metatrail_execution"]["params"] = {"blob": "x" * 300 * 1024}  # too large even alone
    a = _local(tmp_path, "a", [*events, huge])
    with live(config) as server:
        result = push(a, server.url, token=token, show_progress=False)
    assert (result.sent, result.inserted) == (601, 600)
    assert [i for i, _ in result.refused] == [next(iter(ids_of([huge])))]  # refused alone, named, left home


def test_events_the_server_refuses_are_isolated_reported_and_left_home(config: ServerConfig, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """One event a server will not take (invalid there, or outside what the token may write) must not stall a push
    for good: the batch is halved until it stands alone, the rest is delivered, and the refused ones are named."""
    from srvkit import make_token

    limited = make_token(config.store, "read,write", pipelines=["p"])
    scratch = bulk_events(1, pipeline="scratch")
    wanted = bulk_events(20, pipeline="p", t0=1.9e9)
    odd = {"eventTime": "2024-01-01T00:00:00Z", "producer": "p", "dataset": {"namespace": "n", "name": "d"},
           "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/DatasetEvent",
           "run": {"runId": "123e4567-e89b-12d3-a456-426614174000"}, "job": {"namespace": "n", "name": "j"}}
    local = _local(tmp_path, "a", [*scratch, *wanted[:7], odd, *wanted[7:]])
    with live(config) as server:
        result = push(local, server.url, token=limited, show_progress=False)
        assert result.inserted == len(wanted) and result.skipped == 3
        refused = dict(result.refused)
        assert set(refused) == ids_of([*scratch, odd])
        assert "pipeline_forbidden" in " ".join(refused.values()) or "403" in " ".join(refused.values())
        again = push(local, server.url, token=limited, show_progress=False)
        assert (again.sent, again.rewound) == (0, False)  # the cursor moved on; a refused event is never its anchor
        code = commands.main(["push", "--store", local, "--to", server.url, "--token", limited, "--no-progress",
                              "--all"])
        assert code == 1 and "refused 3 event(s)" in capsys.readouterr().err
        with open_store(config.store) as held:
            assert {e.id for e in held.iter_events()} == ids_of(wanted)


def _backup(db: Path, copy: Path) -> None:
    import sqlite3

    with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
        source.backup(target)


def _restore(db: Path, backup: Path) -> None:
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    backup.rename(db)


def test_a_pull_after_the_server_was_restored_compares_the_whole_log(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A server restored from a backup hands out log positions again: events that arrive after the restore take
    positions a client's cursor has already passed. The cursor's anchor (the newest event it passed, at its
    position) is no longer there, so the next pull sees that and compares the whole log: nothing is skipped."""
    from srvkit import make_token

    db = tmp_path / "server.db"
    config = ServerConfig(store=f"sqlite:///{db}", site="hub", auth_cache_ttl=0)
    token = make_token(config.store, "read,write")
    with open_store(config.store) as store:
        store.ingest(bulk_events(10, t0=1.7e9))
    _backup(db, tmp_path / "backup.db")
    with open_store(config.store) as store:
        store.ingest(bulk_events(5, t0=1.8e9))
    local = _local(tmp_path, "a")
    with live(config) as server:
        port = server.port  # the restored server answers at the same address
        assert pull(local, server.url, token=token, show_progress=False).inserted == 30
        steady = pull(local, server.url, token=token, show_progress=False)
        assert (steady.rewound, steady.sent, steady.scanned) == (False, 0, 0)  # an intact log: no comparison
    _restore(db, tmp_path / "backup.db")  # positions 21-30 will be handed out again
    later = bulk_events(8, t0=1.9e9)
    with open_store(config.store) as store:
        store.ingest(later)
    with live(config, port=port) as server:
        assert commands.main(["pull", "--store", local, "--from", server.url, "--token", token, "--no-progress"]) == 0
        out, err = capsys.readouterr()
        assert "pulled 16 events (16 new here) of 36 examined" in out  # not only positions 31-36
        assert "no longer matches the two logs" in err
        assert ids_of(later) <= _ids(local)
        after = pull(local, server.url, token=token, show_progress=False)
        assert (after.rewound, after.sent) == (False, 0)  # the cursor and its anchor describe the new log
        assert pull(local, server.url, token=token, show_progress=False, compare_all=True).inserted == 0


def test_a_push_after_the_server_lost_what_it_was_given_sends_it_again(tmp_path: Path) -> None:
    """The push cursor says what the server was given; a server restored from an older backup no longer has it. The
    anchor (the newest event pushed) is missing there, so the next push compares the whole log and sends it again."""
    from srvkit import make_token

    db = tmp_path / "server.db"
    config = ServerConfig(store=f"sqlite:///{db}", site="hub", auth_cache_ttl=0)
    token = make_token(config.store, "read,write")
    first, second = bulk_events(6, t0=1.7e9), bulk_events(4, t0=1.8e9)
    local = _local(tmp_path, "a", first)
    with live(config) as server:
        port = server.port
        assert push(local, server.url, token=token, show_progress=False).inserted == 12
        _backup(db, tmp_path / "backup.db")
        with open_store(local) as store:
            store.ingest(second)
        assert push(local, server.url, token=token, show_progress=False).inserted == 8
    _restore(db, tmp_path / "backup.db")  # the server lost the second push
    with live(config, port=port) as server:
        again = push(local, server.url, token=token, show_progress=False)
        assert again.rewound and (again.sent, again.inserted, again.scanned) == (8, 8, 20)
        assert _ids(config.store) == ids_of(first + second)
        assert not push(local, server.url, token=token, show_progress=False).rewound


def test_a_push_after_the_local_store_was_restored_sends_its_new_events(tmp_path: Path) -> None:
    """A local store restored from a backup takes its cursor back with it (both live in the store), so the cursor
    still describes both logs: the next push sends the events recorded since the restore, without a comparison."""
    from srvkit import make_token

    config = ServerConfig(store=f"sqlite:///{tmp_path / 'server.db'}", site="hub", auth_cache_ttl=0)
    token = make_token(config.store, "read,write")
    local = _local(tmp_path, "a", bulk_events(3, t0=1.7e9))
    db = Path(local.removeprefix("sqlite:///"))
    with live(config) as server:
        assert push(local, server.url, token=token, show_progress=False).inserted == 6
        _backup(db, tmp_path / "local-backup.db")
        with open_store(local) as store:
            store.ingest(bulk_events(3, t0=1.8e9))
        assert push(local, server.url, token=token, show_progress=False).inserted == 6
        _restore(db, tmp_path / "local-backup.db")
        fresh = bulk_events(2, t0=1.9e9)
        with open_store(local) as store:
            store.ingest(fresh)  # positions 7-10 again, after the restored cursor (6)
        result = push(local, server.url, token=token, show_progress=False)
        assert (result.rewound, result.inserted) == (False, 4)
        assert ids_of(fresh) <= _ids(config.store)


def test_a_filtered_pull_takes_the_earlier_events_of_a_run_that_joins_the_selection(
        config: ServerConfig, tokens: Tokens, tmp_path: Path) -> None:
    """A run's pipeline follows its latest event. A pull of pipeline "train" passes over a run's START while the run
    is in another pipeline; when a later event moves the run into "train", the page that carries it lists the
    run's earlier events too, so the START is not lost behind the cursor."""
    start, end = bulk_events(1, pipeline="scratch")
    end = json.loads(json.dumps(end))
    end["run"]["facets"]["metatrail_execution"]["pipeline"] = "train"
    end["job"]["name"] = "train.step"
    local = _local(tmp_path, "a")
    with live(config) as server:
        writer = ServerClient(server.url, tokens.write)
        try:
            writer.request("POST", "/api/v1/lineage", json_body=start)
            assert pull(local, server.url, token=tokens.read, filt=Filter(pipeline="train"),
                        show_progress=False).sent == 0  # not in "train" (yet): passed over, the cursor moves on
            writer.request("POST", "/api/v1/lineage", json_body=end)
        finally:
            writer.close()
        later = pull(local, server.url, token=tokens.read, filt=Filter(pipeline="train"), show_progress=False)
        assert later.inserted == 2
    assert _ids(local) == ids_of([start, end])
