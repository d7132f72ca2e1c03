"""Benchmark of the server's fan-out: how fast forwarded events reach another OpenLineage backend.

    python bench/bench_fanout.py            # 1,000 events direct, 400 events 20 ms away, 3 rounds
    python bench/bench_fanout.py --quick    # a smoke run with a fifth of each

A source ``metatrail server`` (SQLite) forwards with ``--forward-config`` (openlineage-python's HTTP transport) to a
backend, itself a ``metatrail server`` (SQLite) standing in for Marquez. The backend is reached either directly over
loopback or through a proxy in this process that holds each request 20 ms before passing it on (a backend across a
network, or a Marquez whose database write takes that long). Events are posted to the source in batches of 100; the
time measured runs from the first post until the source's admin status shows nothing left to forward. Each variant
runs ``--forward-concurrency 1`` (one request at a time, the forwarder before concurrency) and the default 8, rounds
alternating; the ratio is the speed-up of the default over one at a time, in the same run.

Prints a report and writes ``bench/results/fanout.txt``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import Server, make_events, token_for

RESULTS = Path(__file__).resolve().parent / "results" / "fanout.txt"


class DelayProxy:
    """Holds each request ``delay`` seconds, then passes it to ``target`` and its answer back."""

    def __init__(self, target: str, delay: float) -> None:
        host = target.replace("http://", "")
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                if getattr(local, "conn", None) is None:
                    local.conn = http.client.HTTPConnection(host, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                local.conn.request("POST", self.path, body=body, headers=headers)
                response = local.conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                self.send_header("Content-Type", response.getheader("Content-Type") or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def forward_once(work: Path, name: str, events: list[dict[str, Any]], target: str, target_token: str,
                 concurrency: int) -> float:
    """Seconds from the first post to the source until it has forwarded every event to ``target``."""
    store = f"sqlite:///{work / f'{name}.db'}"
    token = token_for(store, "read,write,admin")
    config = work / f"{name}.yml"
    config.write_text(json.dumps({"transport": {"type": "http", "url": target, "timeout": 60,
                                                "auth": {"type": "api_key", "apiKey": target_token}}}))
    source = Server("metatrail", work, store, extra=("--forward-config", str(config), "--forward-concurrency",
                                                     str(concurrency)))
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=source.url, headers=headers, timeout=60) as client:
            started = time.perf_counter()
            for i in range(0, len(events), 100):
                answer = client.post("/api/v1/lineage/batch", json=events[i : i + 100])
                answer.raise_for_status()
            while True:
                forward = client.get("/api/v1/admin/status").json()["forward"]
                if forward["pending"] == 0 and forward["sent"] >= len(events):
                    elapsed = time.perf_counter() - started
                    break
                if time.perf_counter() - started > 600:
                    raise RuntimeError(f"forwarding did not finish: {forward}")
                time.sleep(0.02)
            if forward["sent"] != len(events) or forward["failed"] or forward["refused"]:
                raise RuntimeError(f"unexpected forwarding counts: {forward}")
        return elapsed
    finally:
        source.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of each workload")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    scale = 5 if args.quick else 1
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    import openlineage.client
    from machine import cpu_model, tree_state

    import metatrail

    say(f"metatrail server fan-out benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say()
    say(f"machine       {cpu_model()}, {os.cpu_count()} logical CPUs (a shared VM); load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    say(f"versions      metatrail {metatrail.__version__}, openlineage-python "
        f"{getattr(openlineage.client, '__version__', '?')}, {platform.python_implementation()} "
        f"{platform.python_version()}")
    say(f"tree          {tree_state()}")
    say("setup         source and backend: metatrail server on SQLite, subprocesses on 127.0.0.1; the forwarder uses")
    say("              openlineage-python's HTTP transport (one POST per event); events posted in batches of 100")
    work = Path(tempfile.mkdtemp(prefix="mt-bench-fanout-"))
    backend_store = f"sqlite:///{work / 'backend.db'}"
    backend_token = token_for(backend_store, "write")
    backend = Server("metatrail", work, backend_store)
    proxy = DelayProxy(backend.url, 0.020)
    try:
        say()
        say(f"{'backend':<26} {'events':>6}  {'in flight':>9}  {'seconds per round':<24} {'median':>7}  "
            f"{'events/s':>8}  {'speed-up':>8}")
        for label, target, runs in (("direct (loopback)", backend.url, 500 // scale),
                                    ("20 ms away (proxy)", proxy.url, 200 // scale)):
            times: dict[int, list[float]] = {1: [], 8: []}
            for r in range(args.rounds):
                order = (1, 8) if r % 2 == 0 else (8, 1)
                for concurrency in order:
                    events = make_events(runs, pipeline=f"fanout-{label[:6]}-{r}-{concurrency}")
                    times[concurrency].append(forward_once(work, f"src-{target[-5:]}-{r}-{concurrency}", events,
                                                           target, backend_token, concurrency))
            n = 2 * runs
            one = statistics.median(times[1])
            for concurrency in (1, 8):
                med = statistics.median(times[concurrency])
                speedup = f"{one / med:8.2f}" if concurrency == 8 else f"{'1.00':>8}"
                say(f"{label:<26} {n:>6}  {concurrency:>9}  {', '.join(f'{t:.2f}' for t in times[concurrency]):<24} "
                    f"{med:7.2f}  {n / med:8,.0f}  {speedup}")
    finally:
        proxy.close()
        backend.stop()
    say()
    say("speed-up = median seconds with 1 in flight / median with 8 in flight (each run's events still in order)")
    say(f"load average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    args.out.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
