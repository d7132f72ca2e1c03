"""A load-test writer process: ``python writer_proc.py URL TOKEN CONNECTIONS EVENTS BATCH LEDGER [GATE]``.

Opens CONNECTIONS keep-alive connections (one thread each); each posts EVENTS OpenLineage events in batches of
BATCH (1 = the single-event route), retrying a batch until acknowledged, and writes the ids of acknowledged events
to LEDGER (one per line). With GATE (a directory), each connection, once open, says so with a file
``GATE/ready-<pid>-<n>`` and posts nothing before ``GATE/go`` exists: the harness starts every writer, waits until
all are connected, then lets them go at once. Only the standard library, so hundreds start quickly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import threading
import time
import uuid


def event(i: int, run_id: str, kind: str) -> dict:
    return {"eventType": kind, "eventTime": f"2024-01-01T00:00:{i % 60:02d}.{i % 1000000:06d}+00:00",
            "producer": "https://example.com/load-writer", "schemaURL":
            "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
            "run": {"runId": run_id, "facets": {}}, "job": {"namespace": "load", "name": "load.writer"},
            "inputs": [{"namespace": "file", "name": f"/in/{i % 7}"}], "outputs": []}


def event_id(e: dict) -> str:
    text = json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> None:
    url, token, connections, per, batch, ledger = sys.argv[1:7]
    gate = sys.argv[7] if len(sys.argv) > 7 else None
    host, port = url.replace("http://", "").split(":")
    acked: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        events = []
        while len(events) < int(per):
            rid = str(uuid.uuid4())
            events += [event(len(events), rid, "START"), event(len(events) + 1, rid, "COMPLETE")]
        events = events[: int(per)]
        conn = None
        if gate is not None:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.connect()
            open(os.path.join(gate, f"ready-{os.getpid()}-{n}"), "w").close()
            deadline = time.monotonic() + 600  # a harness that died never says go: give up
            while not os.path.exists(os.path.join(gate, "go")):
                if time.monotonic() > deadline:
                    raise SystemExit("writer: no go from the harness")
                time.sleep(0.01)
        for i in range(0, len(events), int(batch)):
            chunk = events[i : i + int(batch)]
            path, body = ("/api/v1/lineage", chunk[0]) if int(batch) == 1 else ("/api/v1/lineage/batch", chunk)
            data = json.dumps(body).encode()
            while True:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(host, int(port), timeout=60)
                    conn.request("POST", path, body=data, headers={"Authorization": f"Bearer {token}",
                                                                   "Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    if response.status == 201:
                        break
                    time.sleep(0.05)
                except (OSError, http.client.HTTPException):
                    conn = None
                    time.sleep(0.05)
            with lock:
                acked.extend(event_id(e) for e in chunk)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(int(connections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(ledger, "w") as fh:
        fh.write("\n".join(acked) + "\n")


if __name__ == "__main__":
    main()
