"""Lineage across a 3-stage workflow (shell -> run: -> shell), recorded through a profile's ``logger: [metatrail]``:
the final output's upstream graph, through the store API and through ``metatrail lineage --upstream --json``, is the
whole chain with each file's content hash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from smkrun import Snakemake, md5, store_url

from metatrail.store import open_store

CHAIN = ("source", "extract", "stage1", "transform", "stage2", "finalize", "final")


def _chain(graph: dict[str, Any], final_key: str) -> list[str]:
    """Walk the graph upstream from the final artifact: artifact, producing stage, its input, …"""
    nodes = {n["id"]: n for n in graph["nodes"]}
    produced_by = {e["to"]: e["from"] for e in graph["edges"] if e["type"] == "output"}
    inputs_of: dict[str, list[str]] = {}
    for e in graph["edges"]:
        if e["type"] == "input":
            inputs_of.setdefault(e["to"], []).append(e["from"])
    walk, node = [], f"artifact:{final_key}"
    while True:
        walk.append(node)
        run = produced_by.get(node)
        if run is None:
            return [nodes[n]["stage"] if nodes[n]["type"] == "run" else nodes[n]["hash"] for n in walk]
        walk.append(run)
        (node,) = inputs_of[run]


def test_upstream_lineage_of_final_output(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("chain")
    (wf / "data").mkdir()
    (wf / "data/source.txt").write_text("# header\nalpha\nbeta\ngamma\n")
    # Enabled the other documented way: the workflow's default profile, not a command-line flag.
    (wf / "profiles/default").mkdir(parents=True)
    (wf / "profiles/default/config.yaml").write_text("cores: 1\nlogger: [metatrail]\n")
    result = snakemake.run(wf, logger=False)
    assert result.returncode == 0, result.stderr

    files = {"source": wf / "data/source.txt", "stage1": wf / "stage1.txt", "stage2": wf / "stage2.txt",
             "final": wf / "final.txt"}
    assert (wf / "final.txt").read_text() == "ahpla\nammag\nateb\n"
    expected = [md5(files[name]) if name in files else name for name in reversed(CHAIN)]
    final_key = f"md5:{md5(files['final'])}"

    with open_store(store_url()) as store:
        graph = store.lineage([final_key], direction="upstream")
    assert _chain(graph, final_key) == expected
    names = {n["hash"]: n["names"] for n in graph["nodes"] if n["type"] == "artifact"}
    assert names[md5(files["stage1"])] == [str(files["stage1"])]
    runs = [n for n in graph["nodes"] if n["type"] == "run"]
    assert {(n["pipeline"], n["stage"], n["state"]) for n in runs} == {
        ("chain", stage, "completed") for stage in ("extract", "transform", "finalize")}

    cli = subprocess.run([str(Path(sys.executable).parent / "metatrail"), "lineage", str(files["final"]), "--upstream",
                          "--json"], capture_output=True, text=True, timeout=120, check=False, cwd=wf)
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    assert _chain(from_cli, final_key) == expected
