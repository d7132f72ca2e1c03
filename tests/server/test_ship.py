"""The shipper: a real Recorder records 1,000 events while the server is down, hanging, slow, or answering 5xx/429;
everything arrives later, once, and nothing blocks. Plus exit, restart and kill-switch behaviour in subprocesses.

The Recorder here carries the three-line hook the lead adds to ``core/recorder.py`` (see ``ShippingRecorder``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Tokens
from srvkit import FaultProxy, live, wait_for

from metatrail.config import load_settings
from metatrail.recorder import Recorder
from metatrail.server.config import ServerConfig
from metatrail.ship import LazyShipper, Shipper
from metatrail.store import open_store
from metatrail.sync import SyncLog

ROOT = Path(__file__).resolve().parents[2]


# The Recorder ships after each store write; tests hand it their own Shipper to watch its figures.
ShippingRecorder = Recorder


def _server_runs(store_url: str) -> dict[str, dict[str, Any]]:
    store = open_store(store_url)
    try:
        return {r["run_id"]: r for r in store.list_runs(limit=100_000)}
    finally:
        store.close()


def test_thousand_events_survive_every_fault(config: ServerConfig, tokens: Tokens, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_ENERGY", "0")
    local = f"sqlite:///{tmp_path / 'client' / 'metatrail.db'}"
    with live(config) as server:
        proxy = FaultProxy(server.url.replace("http://", ""))
        shipper = Shipper(local, proxy.url, tokens.write, base_delay=0.05, max_delay=0.5, timeout=1.0,
                          connect_timeout=1.0, exit_timeout=0)
        recorder = ShippingRecorder(load_settings(store=local), shipper=shipper)
        ledger: list[str] = []  # what the harness asked to record, kept by the harness

        def record(n: int) -> None:
            for _ in range(n):
                ex = recorder.execution_started("reliable", "step", params={"i": len(ledger)})
                recorder.execution_finished(ex)
                ledger.append(ex.id)

        try:
            # Each phase: the fault, and how to tell that the shipper met it (a refused connection it retried, a
            # request the proxy hung up or answered with an injected status, a request it served slowly).
            phases = [("down", lambda: proxy.down(), lambda b: shipper.stats()["retried"] > b["retried"]),
                      ("hang", lambda: setattr(proxy, "mode", "hang"), lambda b: proxy.faults > b["faults"]),
                      ("5xx", lambda: setattr(proxy, "statuses", [500, 502, 503, 504] * 3),
                       lambda b: proxy.faults >= b["faults"] + 4),
                      ("429", lambda: setattr(proxy, "statuses", [429] * 6), lambda b: proxy.faults >= b["faults"] + 2),
                      ("slow", lambda: setattr(proxy, "delay", 0.3) or setattr(proxy, "mode", "slow"),
                       lambda b: proxy.requests > b["requests"])]
            for name, fault, met in phases:
                before = {"retried": shipper.stats()["retried"], "faults": proxy.faults, "requests": proxy.requests}
                fault()
                record(100)  # 200 events per phase, 1,000 in all
                assert recorder.flush(30)
                assert wait_for(lambda b=before, m=met: m(b), 30), f"the shipper never met the {name} fault"
                proxy.up()
                proxy.mode, proxy.statuses, proxy.delay = "ok", [], 0.0
            assert recorder.flush(30)
            assert shipper.drain(60, give_up_on_failure=False), shipper.stats()
            runs = _server_runs(config.store)
            assert set(runs) == set(ledger) and len(ledger) == 500
            assert all(runs[r]["event_count"] == 2 and runs[r]["state"] == "completed" for r in ledger)
            served = SyncLog(config.store)
            try:
                assert served.digest()["events"] == 1000  # none duplicated
            finally:
                served.close()
            stats = shipper.stats()
            assert stats["retried"] > 0 and proxy.faults > 0 and stats["rejected"] == stats["dropped"] == 0
        finally:
            recorder.close(10)
            shipper.close(1)
            proxy.close()


def test_recording_goes_on_while_the_server_hangs(config: ServerConfig, tokens: Tokens, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipper's request hangs (the server accepts it and never answers, for longer than this test lasts): tasks
    # record and store all the same, each call on its own thread, and everything is delivered once the server
    # answers again.
    monkeypatch.setenv("METATRAIL_ENERGY", "0")
    local = f"sqlite:///{tmp_path / 'client' / 'metatrail.db'}"
    with live(config) as server:
        proxy = FaultProxy(server.url.replace("http://", ""))
        proxy.mode = "hang"
        shipper = Shipper(local, proxy.url, tokens.write, timeout=120.0, connect_timeout=120.0, exit_timeout=0,
                          base_delay=0.05, max_delay=0.2)
        recorder = ShippingRecorder(load_settings(store=local), shipper=shipper)
        try:
            first = recorder.execution_started("held", "first")
            recorder.execution_finished(first)
            assert recorder.flush(30)
            assert wait_for(lambda: proxy.faults >= 1, 30)  # the shipper is inside the request that hangs
            ids = [first.id]
            for i in range(200):
                ex = recorder.execution_started("held", "step", params={"i": i})
                recorder.execution_finished(ex)
                ids.append(ex.id)
            assert recorder.flush(30)  # all stored locally, the request still unanswered
            assert shipper.stats()["sent"] == 0 and proxy.forwarded == 0
            with open_store(local) as held:
                assert held.stats()["events"] == 402
            proxy.mode = "ok"
            proxy._release.set()  # the hung request ends (its connection closed): the shipper tries again
            assert shipper.drain(60, give_up_on_failure=False), shipper.stats()
            assert set(_server_runs(config.store)) == set(ids)
        finally:
            recorder.close(10)
            shipper.close(1)
            proxy.close()


def test_bad_events_are_isolated_and_counted(tmp_path: Path) -> None:
    from srvkit import bulk_events, make_token

    config = ServerConfig(store=f"sqlite:///{tmp_path / 'server.db'}", auth_cache_ttl=0)
    token = make_token(config.store, "write")
    local = f"sqlite:///{tmp_path / 'client.db'}"
    events = bulk_events(10)
    # The local store takes any run id; the server refuses one that is not a UUID (422).
    events[7]["run"]["runId"] = "run-42"
    store = open_store(local)
    store.ingest(events)
    store.close()
    with live(config) as server:
        shipper = Shipper(local, server.url, token, base_delay=0.05, max_delay=0.2)
        shipper.notify()
        assert shipper.drain(30)
        assert shipper.stats()["rejected"] == 1 and shipper.stats()["acked"] == 19
        assert len(_server_runs(config.store)) == 10  # run 4 arrived with its START only
        shipper.close(1)


def test_events_outside_a_restricted_tokens_pipelines_do_not_stall_the_shipper(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 403 for events the token may not write (not for the token itself) is isolated like an invalid event: the
    rest is delivered, and each skipped event is named in the log."""
    from srvkit import bulk_events, ids_of, make_token

    config = ServerConfig(store=f"sqlite:///{tmp_path / 'server.db'}", auth_cache_ttl=0)
    token = make_token(config.store, "write", pipelines=["p"])
    local = f"sqlite:///{tmp_path / 'client.db'}"
    foreign, wanted = bulk_events(1, pipeline="scratch"), bulk_events(10, pipeline="p", t0=1.9e9)
    with open_store(local) as store:
        store.ingest(foreign + wanted)
    with live(config) as server:
        shipper = Shipper(local, server.url, token, base_delay=0.05, max_delay=0.2)
        with caplog.at_level("WARNING", logger="metatrail"):
            shipper.notify()
            assert shipper.drain(30)
        assert shipper.stats()["rejected"] == 2 and shipper.stats()["acked"] == 20
        assert {e for e in ids_of(foreign) if e in caplog.text} == ids_of(foreign)
        shipper.close(1)
    with open_store(config.store) as held:
        assert {e.id for e in held.iter_events()} == ids_of(wanted)


def _backlog(tmp_path: Path, running_every: int) -> tuple[ServerConfig, str, str, list[Any], list[Any]]:
    """A server's config and write token, and a local store (its URL) holding 20 runs' START and COMPLETE plus a
    RUNNING event (non-essential) for every ``running_every``-th of their events; those events."""
    from srvkit import bulk_events, make_token

    config = ServerConfig(store=f"sqlite:///{tmp_path / 'server.db'}", auth_cache_ttl=0)
    token = make_token(config.store, "write")
    local = f"sqlite:///{tmp_path / 'client.db'}"
    events = bulk_events(20)
    running = []
    for e in events[::running_every]:
        r = json.loads(json.dumps(e))
        r["eventType"] = "RUNNING"
        r["eventTime"] = r["eventTime"].replace(".000000", ".250000")
        running.append(r)
    with open_store(local) as store:
        store.ingest(events + running)
    return config, token, local, events, running


def test_backlog_bound_drops_only_non_essential_events(tmp_path: Path) -> None:
    config, token, local, _events, _running = _backlog(tmp_path, 2)  # a RUNNING event per run
    with live(config) as server:
        # The first push of the page fails after its events were chosen: they are skipped again at the next try
        # of the page, and counted once.
        proxy = FaultProxy(server.url)
        proxy.fail_after = 1  # /sync/missing answered, the push and what follows refused
        shipper = Shipper(local, proxy.url, token, max_backlog=45, base_delay=0.05, max_delay=0.2)
        shipper.notify()
        assert wait_for(lambda: proxy.faults >= 2, 30)
        proxy.fail_after = None
        assert shipper.drain(30, give_up_on_failure=False)
        stats = shipper.stats()
        assert stats["retried"] > 0
        assert stats["dropped"] == 15 and stats["acked"] == 45 and stats["sent"] == 45
        runs = _server_runs(config.store)
        assert len(runs) == 20 and all(r["state"] == "completed" for r in runs.values())
        shipper.close(1)
        # The skipped events stay in the local store. The shipper's cursor (shared with metatrail push) has moved
        # past them, so only a push that compares the whole log sends them, and it leaves that cursor alone.
        from metatrail.sync import SyncLog, push

        assert push(local, proxy.url, token=token, show_progress=False).sent == 0
        proxy.close()
        full = push(local, server.url, token=token, show_progress=False, compare_all=True)
        assert full.sent == 15 and full.inserted == 15
        log = SyncLog(config.store)
        try:
            assert log.digest()["events"] == 60
        finally:
            log.close()
        assert push(local, server.url, token=token, show_progress=False, compare_all=True).sent == 0


def test_a_backlog_of_essential_events_past_the_bound_is_shipped_whole(tmp_path: Path) -> None:
    # The excess (45 past a bound of 5) is larger than what may be skipped (10 RUNNING events): those are skipped
    # and counted, and every START and COMPLETE still goes.
    from srvkit import ids_of

    config, token, local, events, running = _backlog(tmp_path, 4)
    with live(config) as server:
        shipper = Shipper(local, server.url, token, max_backlog=5, base_delay=0.05, max_delay=0.2)
        shipper.notify()
        assert shipper.drain(30, give_up_on_failure=False)
        stats = shipper.stats()
        shipper.close(1)
    assert stats["dropped"] == len(running) == 10 and stats["acked"] == len(events) == 40
    with open_store(config.store) as held:
        assert {e.id for e in held.iter_events()} == ids_of(events)


SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_ship import ShippingRecorder
    from metatrail.config import load_settings
    rec = ShippingRecorder(load_settings())
    for i in range(int(sys.argv[1])):
        ex = rec.execution_started("exiting", "step", params={{"i": i}})
        rec.execution_finished(ex)
    print(time.time(), flush=True)
""")


def _child(tmp_path: Path, n: int, env: dict[str, str]) -> tuple[float, float]:
    script = tmp_path / "child.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    start = time.time()
    out = subprocess.run([sys.executable, str(script), str(n)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1]) - start, time.time() - float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_exit_restart_and_kill_switch(config: ServerConfig, tokens: Tokens, tmp_path: Path, writer: str) -> None:
    """Shipping is the recording process's job whether its events were stored by its thread or its writer process."""
    local = f"sqlite:///{tmp_path / 'client' / 'metatrail.db'}"
    env = {**os.environ, "METATRAIL_STORE": local, "METATRAIL_ENERGY": "0", "METATRAIL_TOKEN": tokens.write,
           "PYTHONPATH": str(ROOT / "tests"), "METATRAIL_WRITER": writer}
    # 1. Server down: the process still exits promptly (bounded exit drain); events stay in the local store.
    env["METATRAIL_SERVER"] = "http://127.0.0.1:9"
    _, exit_delay = _child(tmp_path, 20, env)
    assert exit_delay < 10
    log = SyncLog(local)
    assert log.digest()["events"] == 40
    log.close()
    with live(config) as server:
        env["METATRAIL_SERVER"] = server.url
        # 2. Restart: the next process's shipper picks up the earlier backlog too, and ships its own at exit.
        _child(tmp_path, 5, env)
        assert wait_for(lambda: len(_server_runs(config.store)) == 25, 30)
        # 3. The kill switch: nothing recorded, nothing shipped.
        _child(tmp_path, 5, {**env, "METATRAIL_DISABLED": "1"})
        time.sleep(0.5)
        assert len(_server_runs(config.store)) == 25


def test_lazy_shipper_without_server_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_SERVER", raising=False)
    lazy = LazyShipper(load_settings)
    lazy.notify()
    assert lazy.shipper is None
    monkeypatch.setenv("METATRAIL_SERVER", "http://127.0.0.1:9")
    monkeypatch.setenv("METATRAIL_DISABLED", "1")
    other = LazyShipper(load_settings)
    other.notify()
    assert other.shipper is None  # the kill switch is checked before any configuration is read


def _shipper_threads() -> list[Any]:
    import threading

    return [t for t in threading.enumerate() if t.name == "metatrail-shipper" and t.is_alive()]


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_closing_a_recorder_ships_its_events_and_stops_its_shipper(
        config: ServerConfig, tokens: Tokens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """One Recorder after another in a process (a Parsl DFK each) each ship what they stored by the time their close
    returns, and leave no shipper thread (nor its store connection and HTTP client) behind."""
    monkeypatch.setenv("METATRAIL_ENERGY", "0")
    monkeypatch.setenv("METATRAIL_WRITER", writer)
    monkeypatch.setenv("METATRAIL_TOKEN", tokens.write)
    local = f"sqlite:///{tmp_path / 'client' / 'metatrail.db'}"
    before = len(_shipper_threads())
    with live(config) as server:
        monkeypatch.setenv("METATRAIL_SERVER", server.url)
        recorded: list[str] = []
        for round_ in range(3):
            recorder = Recorder(load_settings(store=local))
            for i in range(5):
                ex = recorder.execution_started("closing", "step", params={"round": round_, "i": i})
                recorder.execution_finished(ex)
                recorded.append(ex.id)
            recorder.close(10)
            assert set(_server_runs(config.store)) == set(recorded)  # shipped by the time close returned
            assert len(_shipper_threads()) == before
            assert recorder._shipper.shipper is not None and recorder._shipper.shipper._parts is None
            assert recorder._shipper.shipper.stats()["pending"] == 0  # nothing left for the exit step to try


def test_a_closed_shipper_ships_again_when_notified(tmp_path: Path) -> None:
    """Events recorded after the Recorder's close (late hooks) are still shipped: a notify restarts the thread."""
    from srvkit import bulk_events, ids_of, make_token

    config = ServerConfig(store=f"sqlite:///{tmp_path / 'server.db'}", auth_cache_ttl=0)
    token = make_token(config.store, "write")
    local = f"sqlite:///{tmp_path / 'client.db'}"
    first, late = bulk_events(3), bulk_events(4, t0=1.9e9)
    with open_store(local) as store:
        store.ingest(first)
    with live(config) as server:
        shipper = Shipper(local, server.url, token, base_delay=0.05, max_delay=0.2)
        shipper.notify()
        shipper.close(30)
        assert shipper._thread is not None and not shipper._thread.is_alive() and shipper._parts is None
        with open_store(local) as store:
            store.ingest(late)
        shipper.notify()
        assert shipper.drain(30)
        shipper.close(5)
    with open_store(config.store) as held:
        assert {e.id for e in held.iter_events()} == ids_of(first) | ids_of(late)


def test_closing_a_shipper_whose_server_is_down_keeps_to_its_time(tmp_path: Path) -> None:
    """A server that refuses connections costs close at most its timeout; the events stay in the local store."""
    from srvkit import bulk_events

    local = f"sqlite:///{tmp_path / 'client.db'}"
    with open_store(local) as store:
        store.ingest(bulk_events(5))
    shipper = Shipper(local, "http://127.0.0.1:9", "token", base_delay=5, max_delay=5, connect_timeout=1.0)
    shipper.notify()
    started = time.monotonic()
    shipper.close(2)
    assert time.monotonic() - started < 4
    assert shipper._thread is not None
    shipper._thread.join(5)  # it was waiting out its backoff: the stop ends that wait
    assert not shipper._thread.is_alive() and shipper._parts is None
    assert shipper.stats()["pending"] > 0 and shipper.stats()["retried"] >= 1


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_recording_without_a_server_loads_no_http_client(tmp_path: Path, writer: str) -> None:
    """The writer reads the shipper's settings after its first write; with no server configured it must not pay for
    the HTTP client and TLS modules (a third of a short-lived process's first flush), nor hold them under the lock a
    fork waits for. With a server, the shipper's own thread loads them."""
    script = textwrap.dedent("""
        import json, sys
        from metatrail.recorder import Recorder
        rec = Recorder()
        rec.execution_finished(rec.execution_started("light", "step"))
        assert rec.flush(60)
        shipper = rec._shipper.shipper
        if shipper is not None:
            shipper.drain(30)
        print(json.dumps([m for m in ("metatrail.store.remote", "ssl", "http.client") if m in sys.modules]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METATRAIL_")}
    env.update(METATRAIL_STORE=f"sqlite:///{tmp_path / 'store.db'}", METATRAIL_ENERGY="0", METATRAIL_WRITER=writer,
               METATRAIL_HASH_CACHE=str(tmp_path / "hc.db"), METATRAIL_CONFIG=str(tmp_path / "none.toml"))

    def loaded(**extra: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        modules: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
        return modules

    assert loaded() == []
    assert "metatrail.store.remote" in loaded(METATRAIL_SERVER="http://127.0.0.1:9", METATRAIL_SHIP_EXIT_TIMEOUT="0")
