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
