"""``metatrail server`` as users start it (a subprocess of the real command, real HTTP on loopback), fed by the
real ``openlineage-python`` client as any OpenLineage producer feeds it: plain and gzip bodies, with TLS from
``--tls-cert``/``--tls-key``, on a public address only once an admin token exists, forwarding as its
``--forward-config`` file says."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import error_message_run, parent_run, schema_dataset
from openlineage.client.transport.http import HttpConfig, HttpTransport
from srvkit import ServerProcess, auth, free_port, make_token, new_run_id, self_signed_certificate

PRODUCER = "https://github.com/OpenLineage/OpenLineage/tree/1.0.0/client/python"
RAW = ("s3://lake", "raw/clicks")
FEATURES = ("s3://lake", "features/clicks")
MODEL = ("s3://models", "ctr/model")


def _client(url: str, token: str, *, compression: str | None = None, ca_file: str | None = None) -> Any:
    """openlineage-python's client, configured as its users configure it (the transport's dict form)."""
    transport: dict[str, Any] = {"type": "http", "url": url, "endpoint": "api/v1/lineage", "timeout": 30,
                                 "auth": {"type": "api_key", "apiKey": token}, "retry": {"total": 0}}
    if compression:
        transport["compression"] = compression
    if ca_file:
        transport["sslContext"] = {"caCertPath": ca_file}
    return OpenLineageClient(config={"transport": transport})


def _events(pipeline_run: str) -> list[RunEvent]:
    """A three-step pipeline in openlineage-python's own classes: extract writes the features, train reads them and
    writes the model, evaluate reads the model and fails; each step a child of the pipeline run."""
    parent = parent_run.ParentRunFacet(run=parent_run.Run(runId=pipeline_run),
                                       job=parent_run.Job(namespace="ml", name="ctr"))
    schema = schema_dataset.SchemaDatasetFacet(fields=[schema_dataset.SchemaDatasetFacetFields(name="user", type="int"),
                                                       schema_dataset.SchemaDatasetFacetFields(name="clicks",
                                                                                               type="int")])
    out: list[RunEvent] = [RunEvent(eventType=RunState.START, eventTime="2026-11-01T10:00:00.000Z",
                                    run=Run(runId=pipeline_run), job=Job(namespace="ml", name="ctr"),
                                    producer=PRODUCER)]
    steps = [("extract", [RAW], [FEATURES], RunState.COMPLETE), ("train", [FEATURES], [MODEL], RunState.COMPLETE),
             ("evaluate", [MODEL], [], RunState.FAIL)]
    for minute, (name, inputs, outputs, end) in enumerate(steps, start=1):
        run_id = new_run_id()
        job = Job(namespace="ml", name=f"ctr.{name}")
        ins = [InputDataset(namespace=ns, name=n) for ns, n in inputs]
        outs = [OutputDataset(namespace=ns, name=n, facets={"schema": schema}) for ns, n in outputs]
        facets: dict[str, Any] = {"parent": parent}
        out.append(RunEvent(eventType=RunState.START, eventTime=f"2026-11-01T10:{minute:02d}:00.000Z",
                            run=Run(runId=run_id, facets=facets), job=job, inputs=ins, producer=PRODUCER))
        if end == RunState.FAIL:
            facets = {**facets, "errorMessage": error_message_run.ErrorMessageRunFacet(
                message="AUC below threshold", programmingLanguage="python")}
        out.append(RunEvent(eventType=end, eventTime=f"2026-11-01T10:{minute:02d}:30.000Z",
                            run=Run(runId=run_id, facets=facets), job=job, inputs=ins, outputs=outs,
                            producer=PRODUCER))
    out.append(RunEvent(eventType=RunState.FAIL, eventTime="2026-11-01T10:05:00.000Z", run=Run(runId=pipeline_run),
                        job=Job(namespace="ml", name="ctr"), producer=PRODUCER))
    return out


def _get(url: str, token: str, path: str, ca_file: str | None = None, **params: Any) -> Any:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    reply = httpx.get(f"{url}{path}", params=params, headers=auth(token), verify=verify, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_the_openlineage_client_records_a_pipeline_into_the_server(store_url: str, compression: str | None) -> None:
    write, read = make_token(store_url, "write"), make_token(store_url, "read")
    server = ServerProcess(store_url).start()
    try:
        client = _client(server.url, write, compression=compression)
        pipeline_run = new_run_id()
        events = _events(pipeline_run)
        for event in events:
            client.emit(event)
        client.emit(events[1])  # sent again: stored once
        stats = _get(server.url, read, "/api/v1/stats")
        assert stats["events"] == len(events)

        runs = {r["job_name"]: r for r in _get(server.url, read, "/api/v1/runs", pipeline="ctr")["runs"]}
        assert set(runs) == {"ctr", "ctr.extract", "ctr.train", "ctr.evaluate"}
        assert {name: r["state"] for name, r in runs.items()} == {
            "ctr": "failed", "ctr.extract": "completed", "ctr.train": "completed", "ctr.evaluate": "failed"}
        assert {r["stage"] for r in runs.values() if r["parent_run_id"] == pipeline_run} == \
            {"extract", "train", "evaluate"}
        assert runs["ctr.evaluate"]["error"] == "AUC below threshold"
        train = _get(server.url, read, f"/api/v1/runs/{runs['ctr.train']['run_id']}")
        assert [(e["namespace"], e["name"]) for e in train["inputs"]] == [FEATURES]
        assert [(e["namespace"], e["name"]) for e in train["outputs"]] == [MODEL]

        # The lineage joins the producer's datasets by name: upstream of the model lie train, the features,
        # extract and the raw clicks.
        graph = _get(server.url, read, "/api/v1/lineage", key=f"{MODEL[0]}:{MODEL[1]}", direction="upstream")
        run_ids = {n["run_id"] for n in graph["nodes"] if n["type"] == "run"}
        assert run_ids == {runs["ctr.train"]["run_id"], runs["ctr.extract"]["run_id"]}
        artifacts = {n["id"] for n in graph["nodes"] if n["type"] == "artifact"}
        assert artifacts == {f"artifact:{ns}:{name}" for ns, name in (RAW, FEATURES, MODEL)}
        shallow = _get(server.url, read, "/api/v1/lineage", key=f"{MODEL[0]}:{MODEL[1]}", direction="upstream",
                       depth=1)
        assert {n["run_id"] for n in shallow["nodes"] if n["type"] == "run"} == {runs["ctr.train"]["run_id"]}

        # A read token may not write: the client sees the server's 403, and nothing is stored.
        with pytest.raises(requests.HTTPError) as refused:
            _client(server.url, read, compression=compression).emit(_events(new_run_id())[0])
        assert refused.value.response.status_code == 403
        assert _get(server.url, read, "/api/v1/stats")["events"] == len(events)
    finally:
        server.stop()


def test_server_command_serves_tls_from_its_certificate_and_key(store_url: str, tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    write, read = make_token(store_url, "write"), make_token(store_url, "read")
    server = ServerProcess(store_url, tls=(cert, key)).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        events = _events(new_run_id())
        client = _client(server.url, write, ca_file=cert)
        for event in events:
            client.emit(event)
        assert _get(server.url, read, "/api/v1/stats", ca_file=cert)["events"] == len(events)
        # A client that does not trust the certificate is refused the connection; plain HTTP gets no answer.
        untrusting = HttpTransport(HttpConfig.from_dict({"url": server.url, "auth": {"type": "api_key",
                                                                                    "apiKey": write},
                                                         "retry": {"total": 0}}))
        with pytest.raises(requests.exceptions.SSLError):
            untrusting.emit(events[0])
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        server.stop()


def _command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metatrail.server", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_server_command_listens_on_every_interface_only_with_an_admin_token(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'site.db'}"
    port = free_port()
    refused = _command("server", "--store", store, "--host", "0.0.0.0", "--port", str(port))
    assert refused.returncode == 1
    assert "no admin token" in refused.stderr
    created = _command("token", "create", "--store", store, "--name", "ops", "--scope", "admin", "--site", "hub")
    assert created.returncode == 0, created.stderr
    server = ServerProcess(store, port=port, extra=["--host", "0.0.0.0"]).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/v1/stats")
        assert conn.getresponse().status == 401  # serving, and still deny by default
        conn.close()
    finally:
        server.stop()


def test_server_command_forwards_as_its_forward_config_file_says(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'site.db'}"
    out = tmp_path / "forwarded.jsonl"
    config = tmp_path / "openlineage.yml"
    config.write_text(f"transport:\n  type: file\n  log_file_path: {out}\n  append: true\n")
    write = make_token(store, "write")
    server = ServerProcess(store, extra=["--forward-config", str(config)]).start()
    try:
        events = _events(new_run_id())
        client = _client(server.url, write)
        for event in events:
            client.emit(event)
        deadline = time.monotonic() + 60

        def whole_lines() -> int:  # a line the transport is still writing is not counted
            text = out.read_text() if out.exists() else ""
            return len(text[: text.rfind("\n") + 1].splitlines())

        while time.monotonic() < deadline and whole_lines() < len(events):
            time.sleep(0.05)
        forwarded = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(e["run"]["runId"] + e["eventType"] for e in forwarded) == \
            sorted(e.run.runId + e.eventType.value for e in events)
    finally:
        server.stop()
    broken = tmp_path / "broken.yml"
    broken.write_text("transport: [file]\n")
    refused = _command("server", "--store", store, "--forward-config", str(broken))
    assert refused.returncode != 0 and "transport" in refused.stderr
