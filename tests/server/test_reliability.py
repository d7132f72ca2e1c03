"""Server reliability against a ledger the harness keeps itself: kill -9 of the server 20 times during ingest by 16
concurrent writers (every acknowledged event present afterwards), and many concurrent writers (exact counts).

SQLite takes 64 concurrent writer processes, PostgreSQL 256: each a Python process of its own, with one connection
(the writer uses only the standard library, so hundreds start in seconds).
"""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from srvkit import ForkedServer, ServerProcess, Zygote, make_token
from writer_proc import event, event_id

from metatrail.store import open_store
from metatrail.sync import SyncLog

WRITER = Path(__file__).with_name("writer_proc.py")


def _integrity(store_url: str) -> None:
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(store_url[len("sqlite:///"):])
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            conn.close()


def _check(store_url: str, acked: set[str], runs: int) -> None:
    log = SyncLog(store_url)
    try:
        assert log.missing(sorted(acked)) == []  # every acknowledged event is there
        digest = log.digest()
    finally:
        log.close()
    store = open_store(store_url)
    try:
        stats = store.stats()
        listed = store.list_runs(limit=100_000)
    finally:
        store.close()
    assert digest["events"] == stats["events"] == len(acked)  # and each once
    assert stats["runs"] == len(listed) == runs
    assert sum(r["event_count"] for r in listed) == len(acked)
    _integrity(store_url)


@pytest.mark.slow
def test_kill_9_during_ingest(store_url: str) -> None:
    token = make_token(store_url, "write")
    zygote = Zygote()
    server = ForkedServer(zygote, store_url)
    writers, batch = 16, 4
    acked: set[str] = set()
    lock = threading.Lock()
    finish = threading.Event()  # set after the last kill: writers complete their batch in flight, then stop

    def writer(w: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not finish.is_set():
            chunk = []
            for _ in range(batch // 2):
                rid = f"{w:08x}-0000-4000-8000-{n:012x}"
                chunk += [event(n, rid, "START"), event(n + 1, rid, "COMPLETE")]
                n += 1
            body = json.dumps(chunk).encode()
            while True:  # until acknowledged: the harness never gives up on an event it sent
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                    conn.request("POST", "/api/v1/lineage/batch", body=body,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    if response.status == 201:
                        with lock:
                            acked.update(event_id(e) for e in chunk)
                        break
                except (OSError, http.client.HTTPException):
                    conn = None
                    time.sleep(0.02)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    for t in threads:
        t.start()
    rng = random.Random(20)
    kills = 0
    try:
        for _ in range(20):
            server.start()
            before = len(acked)
            deadline = time.time() + 10
            while len(acked) == before and time.time() < deadline:  # kill it mid-ingest, not while idle
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            server.kill()
            kills += 1
        finish.set()
        server.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    finally:
        finish.set()
        server.stop()
        zygote.close()
    assert kills == 20 and len(acked) >= writers * batch * 5
    _check(store_url, acked, runs=len(acked) // 2)
    print(f"kill -9 x{kills}, {writers} writers: {len(acked)} acknowledged events, all present once")


def _run_writers(url: str, token: str, processes: int, connections: int, per: int, batch: int,
                 tmp_path: Path) -> set[str]:
    ledgers = [tmp_path / f"ledger-{p}.txt" for p in range(processes)]
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, str(WRITER), url, token, str(connections), str(per), str(batch),
                               str(ledger), str(gate)], stdout=subprocess.DEVNULL) for ledger in ledgers]
    try:
        # Every writer connected before any posts: all of them are writing at once.
        deadline = time.monotonic() + 300
        while len(list(gate.glob("ready-*"))) < processes * connections:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer did not connect"
            time.sleep(0.05)
        (gate / "go").touch()
        for p in procs:
            assert p.wait(300) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    acked: set[str] = set()
    for ledger in ledgers:
        lines = [line for line in ledger.read_text().splitlines() if line]
        assert len(lines) == connections * per
        acked.update(lines)
    return acked


@pytest.mark.slow
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_64_writer_processes_into_sqlite(store_url: str, tmp_path: Path) -> None:
    token = make_token(store_url, "write")
    server = ServerProcess(store_url).start()
    try:
        acked = _run_writers(server.url, token, processes=64, connections=1, per=40, batch=1, tmp_path=tmp_path)
    finally:
        server.stop()
    assert len(acked) == 64 * 40
    _check(store_url, acked, runs=64 * 20)
    print(f"64 writer processes into SQLite: {len(acked)} events, exact")


@pytest.mark.slow
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_256_writer_processes_into_postgresql(store_url: str, tmp_path: Path) -> None:
    token = make_token(store_url, "write")
    server = ServerProcess(store_url).start()
    try:
        acked = _run_writers(server.url, token, processes=256, connections=1, per=10, batch=1, tmp_path=tmp_path)
    finally:
        server.stop()
    assert len(acked) == 256 * 10
    _check(store_url, acked, runs=256 * 5)
    print(f"256 writer processes into PostgreSQL: {len(acked)} events, exact")


def test_the_server_keeps_answering_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    """Another connection holding the SQLite store's write lock (an admin rebuild, a ``metatrail`` command writing
    the same file) makes writes wait, never the whole server: a single event posted meanwhile once waited for the
    lock on the event loop, and the server answered nothing, not even /health, until it was released."""
    from srvkit import LiveServer

    from metatrail.server.config import ServerConfig

    store_url = f"sqlite:///{tmp_path / 'server.db'}"
    token = make_token(store_url)
    server = LiveServer(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0))  # uvicorn, in this process
    holder = sqlite3.connect(str(tmp_path / "server.db"), isolation_level=None, check_same_thread=False)
    released = threading.Timer(30, lambda: holder.execute("COMMIT"))  # the previous code served nothing till then
    posted: dict[str, int] = {}
    one = event(1, "0190b000-0000-7000-8000-000000000001", "START")

    def post() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/api/v1/lineage", body=json.dumps(one),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        posted["status"] = conn.getresponse().status
        conn.close()

    try:
        holder.execute("BEGIN IMMEDIATE")
        released.start()
        writer = threading.Thread(target=post)
        writer.start()
        deadline = time.monotonic() + 20
        while server.services.writer.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the event has reached the server's writer thread, which waits for the lock
        assert server.services.writer.pending == 1 and "status" not in posted
        for path in ("/health", "/api/v1/runs"):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            assert conn.getresponse().status == 200, path
            conn.close()
        released.cancel()
        holder.execute("COMMIT")
        writer.join(60)
        assert posted["status"] == 201
        with open_store(store_url) as store:
            assert [e.id for e in store.iter_events()] == [event_id(one)]
    finally:
        released.cancel()
        holder.close()
        server.stop()


def test_a_request_whose_events_the_store_does_not_take_in_time_gets_a_503_and_they_are_stored_later(
        tmp_path: Path) -> None:
    """A request waits for the commit of its events at most ``write_wait_s``, then answers 503 with Retry-After
    (before, it waited for as long as the store did not take writes: a lock held elsewhere, a database connection
    gone silent). Its events stay queued and are stored once the store takes writes; the client's retry stores
    nothing twice."""
    from srvkit import AsgiClient

    from metatrail.server.app import create_app
    from metatrail.server.config import ServerConfig

    store_url = f"sqlite:///{tmp_path / 'server.db'}"
    token = make_token(store_url)
    client = AsgiClient(create_app(ServerConfig(store=store_url, site="hub", auth_cache_ttl=0, write_wait_s=1.0)))
    holder = sqlite3.connect(str(tmp_path / "server.db"), isolation_level=None, check_same_thread=False)
    released = threading.Timer(60, lambda: holder.execute("COMMIT"))
    one = event(2, "0190b000-0000-7000-8000-000000000002", "START")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        holder.execute("BEGIN IMMEDIATE")  # the store takes no write until it is released
        released.start()
        answer = client.post("/api/v1/lineage", json=one, headers=headers)
        assert answer.status_code == 503 and answer.json()["error"] == "store_busy"
        assert answer.headers["retry-after"] == "5"
        released.cancel()
        holder.execute("COMMIT")
        deadline = time.monotonic() + 60
        stored: list[str] = []
        while time.monotonic() < deadline and not stored:
            with open_store(store_url) as store:
                stored = [e.id for e in store.iter_events()]
            time.sleep(0.1)
        assert stored == [event_id(one)]  # the queued event was written after all
        again = client.post("/api/v1/lineage", json=one, headers={**headers, "Accept": "application/json"})
        assert again.status_code == 201 and again.json()["stored"] is False  # the retry stores nothing twice
    finally:
        released.cancel()
        holder.close()
        client.close()
