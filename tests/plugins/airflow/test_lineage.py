"""Lineage across the three-stage file pipeline of ``mt_pipeline`` (extract → raw.csv → transform → clean.csv →
load → report.txt), queried the way a user would: ``metatrail lineage`` on the report file, and the store API."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import BIN, DagRun

from metatrail.hashing import hash_path


def _chain(graph: dict[str, Any], start: str) -> list[str]:
    """Walk ``artifact <- run <- artifact …`` upstream from ``start``; returns stage names and file names in order."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    produced_by = {e["to"]: e["from"] for e in graph["edges"] if e["type"] == "output"}
    inputs_of: dict[str, list[str]] = {}
    for e in graph["edges"]:
        if e["type"] == "input":
            inputs_of.setdefault(e["to"], []).append(e["from"])
    walk, node = [], start
    while node in produced_by:
        run = produced_by[node]
        walk.append(nodes[run]["stage"])
        upstream = inputs_of.get(run, [])
        if not upstream:
            break
        node = upstream[0]
        walk.append(nodes[node]["names"][0].rsplit("/", 1)[-1])
    return walk


def _key(path: Any) -> str:
    ref = hash_path(path)
    assert ref.hash is not None
    return f"artifact:md5:{ref.hash.value}"


def test_metatrail_lineage_cli_walks_the_report_back_to_extract(pipeline_run: DagRun) -> None:
    report = pipeline_run.data / "report.txt"
    done = subprocess.run([str(BIN / "metatrail"), "lineage", str(report), "--store", pipeline_run.store_url,
                           "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    graph = json.loads(done.stdout)
    assert _chain(graph, _key(report)) == ["load", "clean.csv", "transform", "raw.csv", "extract"]
    runs = [n for n in graph["nodes"] if n["type"] == "run"]
    assert {(n["pipeline"], n["state"]) for n in runs} == {("mt_pipeline", "completed")}


def test_store_lineage_downstream_of_the_raw_file_reaches_the_report(pipeline_run: DagRun) -> None:
    from metatrail.store import open_store

    raw = _key(pipeline_run.data / "raw.csv").removeprefix("artifact:")
    with open_store(pipeline_run.store_url) as store:
        graph = store.lineage([raw], direction="downstream")
    stages = {n["stage"] for n in graph["nodes"] if n["type"] == "run"}
    assert stages == {"transform", "load"}
    assert _key(pipeline_run.data / "report.txt") in {n["id"] for n in graph["nodes"]}
