"""Lineage across a three-task Prefect pipeline, from the store and from the ``metatrail lineage`` command: the
report file traces back, by content hash, through load ← clean.txt ← transform ← raw.txt ← extract."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect_flows import etl

from metatrail import get_recorder
from metatrail.cli import main as metatrail_main
from metatrail.hashing import hash_path
from metatrail.store import open_store


def _key(path: Path) -> str:
    ref = hash_path(path)
    assert ref.hash is not None
    return f"md5:{ref.hash.value}"


def test_lineage_of_the_report(tmp_path: Path, events: Callable[[], list[dict[str, Any]]],
                               capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    etl(str(work))
    evs = events()
    report, clean, raw = (_key(work / name) for name in ("report.json", "clean.txt", "raw.txt"))
    runs = {e["run"]["runId"]: e["job"]["name"] for e in evs if e["eventType"] == "COMPLETE"}

    with open_store(get_recorder().settings.store) as store:
        graph = store.lineage([report], direction="upstream")
    edges = {(e["from"], e["to"], e["type"]) for e in graph["edges"]}
    by_stage = {n["stage"]: n["id"] for n in graph["nodes"] if n["type"] == "run"}
    assert set(by_stage) == {"extract", "transform", "load"}  # the failed first try of load produced nothing
    assert all(n["state"] == "completed" for n in graph["nodes"] if n["type"] == "run")
    assert {runs[n["run_id"]] for n in graph["nodes"] if n["type"] == "run"} == {"etl.extract", "etl.transform",
                                                                                 "etl.load"}
    assert edges == {
        (by_stage["load"], f"artifact:{report}", "output"),
        (f"artifact:{clean}", by_stage["load"], "input"),
        (by_stage["transform"], f"artifact:{clean}", "output"),
        (f"artifact:{raw}", by_stage["transform"], "input"),
        (by_stage["extract"], f"artifact:{raw}", "output"),
    }

    # The command users run gives the same graph, found from the file's path.
    code = metatrail_main(["lineage", str(work / "report.json"), "--json", "--store", get_recorder().settings.store])
    assert code == 0
    cli_graph = json.loads(capsys.readouterr().out)
    assert {(e["from"], e["to"], e["type"]) for e in cli_graph["edges"]} == edges
