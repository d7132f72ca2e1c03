"""Benchmark of the metatrail server: single-event ingest, batched ingest, push of a large store.

    python bench/bench_server.py            # full: 2,000 single events x 3 rounds, 20,000 batched, 100,000 pushed
    python bench/bench_server.py --quick    # a smoke run with a tenth of each

(a) Single-event POST throughput, driven by openlineage-python's own ``HttpTransport`` (one POST per event, as
    every OpenLineage producer sends them), against (1) a no-op FastAPI endpoint (reads the body, answers 201) and
    (2) ``metatrail server`` on a fresh SQLite store. Both are uvicorn subprocesses on 127.0.0.1; the same prebuilt
    events; 1 and 4 client threads; five rounds alternate baseline and server (a round takes two to three seconds,
    and this VM's speed drifts from one to the next), medians reported. Target: server >= 0.7 x the no-op endpoint.
(b) Batched ingest into PostgreSQL: ``POST /api/v1/lineage/batch`` with 1,000-event batches (openlineage-python has
    no batch endpoint, so metatrail's own client sends them) into a fresh database. Target ≥ 5,000 events/s.
(c) ``metatrail push`` of 100,000 events from a local SQLite store to a fresh server (SQLite store) over loopback,
    then a second push of the same store; three rounds, each to a fresh server, medians reported. Targets: first
    ≤ 10 s, second sends nothing.

Each figure comes with its baseline from the same run. Prints a report and writes ``bench/results/server.txt``.
Where a target is missed, the report says where the time goes (a profile of the server's store ingest).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "server.txt"
ROOT = Path(__file__).resolve().parents[1]
PG = os.environ.get("METATRAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
NOOP_APP = '''
from fastapi import FastAPI, Request, Response
app = FastAPI()
@app.post("/api/v1/lineage")
async def lineage(request: Request) -> Response:
    await request.body()
    return Response(status_code=201)
@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_health(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import http.client

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


class Server:
    """A uvicorn subprocess: the no-op app or ``metatrail server`` (with ``extra`` arguments)."""

    def __init__(self, kind: str, workdir: Path, store: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "noop":
            app = workdir / "noop_app.py"
            app.write_text(NOOP_APP)
            args = [sys.executable, "-m", "uvicorn", "noop_app:app", "--port", str(self.port), "--log-level",
                    "warning", "--no-server-header"]
            cwd: str | None = str(workdir)
        else:
            args = [sys.executable, "-m", "metatrail.server", "server", "--store", str(store), "--port",
                    str(self.port), *extra]
            cwd = None
        self.proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_health(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.proc.stderr:
            self.proc.stderr.close()


def make_events(runs: int, pipeline: str = "bench") -> list[dict[str, Any]]:
    """Realistic metatrail events (``build_run_event``: START with an input, COMPLETE with input and output)."""
    from metatrail.model import ArtifactRef, HashInfo, uuid7
    from metatrail.openlineage.events import build_run_event, iso_time
    from metatrail.openlineage.facets import MetatrailExecutionRunFacet

    facet = MetatrailExecutionRunFacet(pipeline=pipeline, kind="execution", site="bench", integration="PYTHON",
                                       stage="step", params={"lr": 0.01, "epochs": 10, "seed": 1})
    ref_in = ArtifactRef(uri="/data/in.csv", namespace="file", name="/data/in.csv", hash=HashInfo("md5", "a" * 32),
                         size=1000)
    ref_out = ArtifactRef(uri="/data/out.csv", namespace="file", name="/data/out.csv",
                          hash=HashInfo("md5", "b" * 32), size=1000)
    common = {"namespace": "bench", "job_name": f"{pipeline}.step", "integration": "PYTHON", "job_type": "TASK",
              "execution_facet": facet}
    start = json.dumps(build_run_event("START", run_id=uuid7(), event_time=1.8e9, inputs=[ref_in], **common))
    end = json.dumps(build_run_event("COMPLETE", run_id=uuid7(), event_time=1.8e9 + 1, inputs=[ref_in],
                                     outputs=[ref_out], **common))
    out = []
    for i in range(runs):
        rid = uuid7(1.8e9 + i)
        for text, dt in ((start, 0.0), (end, 1.0)):
            e = json.loads(text)
            e["run"]["runId"] = rid
            e["eventTime"] = iso_time(1.8e9 + i + dt)
            out.append(e)
    return out


def ol_throughput(url: str, token: str | None, events: list[dict[str, Any]], threads: int) -> float:
    """Events/s emitted through openlineage-python's HttpTransport, ``threads`` transports in parallel."""
    from openlineage.client.transport.http import HttpConfig, HttpTransport

    config: dict[str, Any] = {"url": url, "endpoint": "api/v1/lineage", "timeout": 30,
                              "retry": {"total": 0}}
    if token:
        config["auth"] = {"type": "api_key", "apiKey": token}
    transports = [HttpTransport(HttpConfig.from_dict(config)) for _ in range(threads)]
    for t in transports:  # warm the connection
        t.emit(events[0])
    parts = [events[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def run(t: Any, part: list[dict[str, Any]]) -> None:
        try:
            for e in part:
                t.emit(e)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(t, p)) for t, p in zip(transports, parts, strict=True)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(events) / elapsed


def pg_database(name: str) -> str:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG}/{name}"


def drop_pg(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def token_for(store: str, scopes: str = "read,write") -> str:
    from metatrail.server.auth import TokenStore

    tokens = TokenStore(store, ttl=0)
    try:
        return tokens.create(name="bench", scopes=scopes.split(","), site="bench")[1]
    finally:
        tokens.close()


def profile_ingest(store: str, events: list[dict[str, Any]], batch: int) -> str:
    """Where the store's ingest spends its time (top functions by cumulative time)."""
    from metatrail.store import open_store

    s = open_store(store)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(0, len(events), batch):
        s.ingest(events[i : i + batch])
    prof.disable()
    s.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(14)
    lines = [line for line in buf.getvalue().splitlines() if line.strip()][:34]
    return "\n".join("    " + line for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of each workload")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    single_n, rounds = 2000 // scale, 5
    batched_n, pushed_n = 20_000 // scale, 100_000 // scale
    push_rounds = 1 if args.quick else 3
    report: list[str] = []
    missed: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    import openlineage.client
    import sqlalchemy

    import metatrail

    say(f"metatrail server benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say()
    say(f"cores         {os.cpu_count()} logical; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "at start (machine shared with other developers)")
    say(f"python        {platform.python_implementation()} {platform.python_version()}")
    say(f"versions      metatrail {metatrail.__version__}, openlineage-python {openlineage.client.__version__ if hasattr(openlineage.client, '__version__') else '?'}, "  # noqa: E501
        f"SQLAlchemy {sqlalchemy.__version__}")
    say(f"os            {platform.platform()}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_model, memory_total, tree_state

    say(f"machine       {cpu_model()}, {memory_total()}")
    say(f"tree          {tree_state()}")
    work = Path(tempfile.mkdtemp(prefix="mt-bench-server-"))
    try:
        # (a) single-event POSTs --------------------------------------------------------------------------------
        events = make_events(single_n // 2 + 8)
        size = statistics.mean(len(json.dumps(e)) for e in events[:50])
        say()
        say(f"(a) single-event POST, openlineage-python HttpTransport, {single_n} events per measurement "
            f"({size:,.0f} bytes each), {rounds} rounds alternating; metatrail server on SQLite")
        for threads in (1, 4):
            noop_rates, server_rates = [], []
            for r in range(rounds):
                noop = Server("noop", work)
                try:
                    noop_rates.append(ol_throughput(noop.url, None, events[8 : 8 + single_n], threads))
                finally:
                    noop.stop()
                store = f"sqlite:///{work / f'single-{threads}-{r}.db'}"
                token = token_for(store)
                server = Server("metatrail", work, store)
                try:
                    server_rates.append(ol_throughput(server.url, token, events[8 : 8 + single_n], threads))
                finally:
                    server.stop()
            n_med, s_med = statistics.median(noop_rates), statistics.median(server_rates)
            ratio = s_med / n_med
            verdict = "PASS" if ratio >= 0.7 else "MISS"
            if ratio < 0.7:
                missed.append(f"single-event ratio ({threads} client threads)")
            say(f"  {threads} client thread(s): no-op FastAPI {n_med:8,.0f} ev/s  (rounds "
                f"{', '.join(f'{x:,.0f}' for x in noop_rates)})")
            say(f"                      metatrail    {s_med:8,.0f} ev/s  (rounds "
                f"{', '.join(f'{x:,.0f}' for x in server_rates)})")
            say(f"                      ratio {ratio:.2f}  target >= 0.70: {verdict}")
        from metatrail.store import open_store

        bound = open_store(f"sqlite:///{work / 'single-store.db'}")
        start = time.perf_counter()
        for e in events[8 : 8 + single_n // 2]:
            bound.ingest([e])
        store_rate = (single_n // 2) / (time.perf_counter() - start)
        bound.close()
        say(f"  baseline, same run: the store's own single-event ingest (no HTTP, one transaction per event): "
            f"{store_rate:,.0f} ev/s")

        # (b) batched ingest into PostgreSQL ---------------------------------------------------------------------
        from metatrail.store.remote import ServerClient

        say()
        batch_events = make_events(batched_n // 2)
        name = f"mt_bench_{uuid.uuid4().hex[:8]}"
        store = pg_database(name)
        token = token_for(store)
        server = Server("metatrail", work, store)
        try:
            client = ServerClient(server.url, token, timeout=300, compress=False)
            bodies = [json.dumps(batch_events[i : i + 1000]).encode() for i in range(0, len(batch_events), 1000)]
            start = time.perf_counter()
            for body in bodies:
                client.request("POST", "/api/v1/lineage/batch", raw_body=body)
            elapsed = time.perf_counter() - start
            client.close()
        finally:
            server.stop()
        rate = len(batch_events) / elapsed
        verdict = "PASS" if rate >= 5000 else "MISS"
        say(f"(b) batched ingest into PostgreSQL: {len(batch_events):,} events in batches of 1,000: "
            f"{elapsed:.2f} s = {rate:,.0f} events/s; target >= 5,000: {verdict}")
        from metatrail.store import open_store

        direct_store = pg_database(name + "_direct")
        s = open_store(direct_store)
        start = time.perf_counter()
        for i in range(0, len(batch_events), 1000):
            s.ingest(batch_events[i : i + 1000])
        direct = len(batch_events) / (time.perf_counter() - start)
        s.close()
        say(f"    baseline, same run: the store's own ingest (no HTTP), same batches: {direct:,.0f} events/s; "
            f"server / store = {rate / direct:.2f}")
        if rate < 5000:
            missed.append("batched PostgreSQL ingest")
            say("    where the time goes (store ingest into PostgreSQL, 4,000 events, batches of 1,000):")
            say(profile_ingest(pg_database(name + "_prof"), make_events(2000), 1000))
            drop_pg(name + "_prof")
        drop_pg(name)
        drop_pg(name + "_direct")

        # (c) push of a large store ------------------------------------------------------------------------------
        from metatrail.sync import SyncLog, push

        say()
        local = f"sqlite:///{work / 'client' / 'metatrail.db'}"
        s = open_store(local)
        big = make_events(pushed_n // 2)
        start = time.perf_counter()
        for i in range(0, len(big), 5000):
            s.ingest(big[i : i + 5000])
        fill = time.perf_counter() - start
        s.close()
        # Each round pushes to a fresh server (its own store, its own URL: the local store keeps a cursor per
        # server), then pushes again; the median round is what the target is held to (this VM's speed drifts).
        firsts, seconds_, sent, held_counts, sent_again = [], [], [], [], []
        for r in range(push_rounds):
            server_store = f"sqlite:///{work / f'push-server-{r}.db'}"
            token = token_for(server_store)
            server = Server("metatrail", work, server_store)
            try:
                start = time.perf_counter()
                first = push(local, server.url, token=token, show_progress=False, timeout=600)
                firsts.append(time.perf_counter() - start)
                start = time.perf_counter()
                second = push(local, server.url, token=token, show_progress=False)
                seconds_.append(time.perf_counter() - start)
            finally:
                server.stop()
            log = SyncLog(server_store)
            held_counts.append(log.digest()["events"])
            log.close()
            sent.append(first.sent)
            sent_again.append(second.sent)
        t_first, t_second = statistics.median(firsts), statistics.median(seconds_)
        verdict1 = "PASS" if t_first <= 10 else "MISS"
        verdict2 = "PASS" if not any(sent_again) else "MISS"
        say(f"(c) push of {len(big):,} events to a fresh server (SQLite) over loopback, {push_rounds} rounds: median "
            f"{t_first:.2f} s ({len(big) / t_first:,.0f} events/s; rounds {', '.join(f'{t:.2f}' for t in firsts)}), "
            f"sent {'/'.join(f'{n:,}' for n in sent)}, server holds {'/'.join(f'{n:,}' for n in held_counts)}; "
            f"target <= 10 s: {verdict1}")
        say(f"    second push of the same store: {t_second * 1000:.0f} ms, sent {max(sent_again)}, "
            f"examined {second.scanned}; target: sends nothing: {verdict2}")
        say(f"    baseline, same run: filling the local store with the same events (the store's own ingest, "
            f"batches of 5,000): {fill:.2f} s = {len(big) / fill:,.0f} events/s; push / fill = {t_first / fill:.2f}")
        if t_first > 10:
            missed.append("push of 100,000 events")
            say("    where the time goes (store ingest into SQLite, the server's side of a push, 4,000 events, "
                "batches of 500):")
            say(profile_ingest(f"sqlite:///{work / 'prof.db'}", make_events(2000), 500))
        if any(sent_again):
            missed.append("second push")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say()
    say("targets missed: " + (", ".join(missed) if missed else "none"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
