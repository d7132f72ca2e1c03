"""Golden-event tests: the real workflow under ThreadPool and HTEX, every event valid, the whole set as reviewed.

The workflow (workflows/pipeline.py) has a fan-out, a 3-stage file chain, a retried failure, a failure with a
dependent task, a join app and a memoized app called twice; a second test reruns it from its checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from golden import assert_golden
from mounts import fake_mountinfo
from olspec import assert_valid
from parsl_helpers import EXPECTED_RESULTS, golden_view, outcome, run_pipeline, store_url, stored_events

from metatrail.hashing import hash_path
from metatrail.store.drop import drop_dir, pending_segments

GOLDEN = Path(__file__).parent / "golden"


def _executions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["run"]["facets"]["metatrail_execution"]["kind"] == "execution"]


def _assert_lineage_chain(work: Path) -> None:
    """``metatrail lineage final.txt --upstream --json`` walks summarise <- mid <- transform <- raw <- generate."""
    digest = {name: hash_path(str(work / name)).hash for name in ("raw.txt", "mid.txt", "final.txt")}
    assert all(digest.values())
    cli = os.path.join(os.path.dirname(sys.executable), "metatrail")
    proc = subprocess.run([cli, "lineage", str(work / "final.txt"), "--upstream", "--json", "--store", store_url()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    graph = json.loads(proc.stdout)
    arts = {n["key"]: n for n in graph["nodes"] if n["type"] == "artifact"}
    runs = {n["id"]: n for n in graph["nodes"] if n["type"] == "run"}
    assert set(arts) == {f"md5:{digest[n].value}" for n in digest}
    for name, d in digest.items():
        assert arts[f"md5:{d.value}"]["names"] == [str(work / name)]
        assert arts[f"md5:{d.value}"]["hash"] == d.value
    assert sorted(r["stage"] for r in runs.values()) == ["generate", "summarise", "transform"]
    assert all(r["state"] == "completed" for r in runs.values())
    stage_of = {rid: r["stage"] for rid, r in runs.items()}
    edges = {(e["from"], e["to"], e["type"]) for e in graph["edges"]}
    named = {(stage_of.get(a, a), stage_of.get(b, b), t) for a, b, t in edges}
    assert named == {
        ("generate", f"artifact:md5:{digest['raw.txt'].value}", "output"),
        (f"artifact:md5:{digest['raw.txt'].value}", "transform", "input"),
        ("transform", f"artifact:md5:{digest['mid.txt'].value}", "output"),
        (f"artifact:md5:{digest['mid.txt'].value}", "summarise", "input"),
        ("summarise", f"artifact:md5:{digest['final.txt'].value}", "output"),
    }


def _check_run(tmp_path: Path, executor: str, **how: Any) -> list[dict[str, Any]]:
    results = run_pipeline(tmp_path / "work", executor, "track", **how)
    assert outcome(results) == EXPECTED_RESULTS
    events = stored_events()
    for event in events:
        assert_valid(event)
    assert_golden(golden_view(events, tmp_path), GOLDEN / f"{executor}.json")
    _assert_lineage_chain(tmp_path / "work")
    return events


def test_threadpool_events_match_golden(tmp_path: Path) -> None:
    events = _check_run(tmp_path, "threads")
    pids = {e["run"]["facets"]["metatrail_execution"]["pid"] for e in events}
    assert len(pids) == 1  # ThreadPool tasks run in the DFK process


def test_htex_events_match_golden_and_are_recorded_on_workers(tmp_path: Path) -> None:
    events = _check_run(tmp_path, "htex")
    dfk_pid = next(e for e in events if e["job"]["name"] == "pipeline")["run"]["facets"]["metatrail_execution"]["pid"]
    on_workers = [e for e in _executions(events) if e["run"]["facets"]["metatrail_execution"]["extra"]
                  .get("executor") == "workers" and "from_memo" not in e["run"]["facets"]["metatrail_execution"]
                  ["extra"] and "dependency_failed" not in e["run"]["facets"]["metatrail_execution"]["extra"]]
    assert on_workers
    # start and end were taken in the worker processes (the energy monitor watched those pids, too)
    assert all(e["run"]["facets"]["metatrail_execution"]["pid"] != dfk_pid for e in on_workers)
    assert all("metatrail_energy" in e["run"]["facets"] for e in on_workers if e["eventType"] != "START")


def test_htex_workers_drop_their_events_beside_a_store_on_a_network_filesystem(tmp_path: Path) -> None:
    """The store on (faked) NFS: the workers, which could be on other nodes, write segment files instead of sharing
    SQLite's locks, and the DFK takes them in before it ends. The events are the reviewed ones all the same."""
    db = Path(store_url()[len("sqlite:///"):])
    mountinfo = fake_mountinfo(tmp_path, {str(tmp_path.resolve()): "nfs4"})
    _check_run(tmp_path, "htex", prefix=[str(Path(__file__).parent / "workflows" / "on_network_fs.py")],
               env={"METATRAIL_TEST_MOUNTINFO": str(mountinfo)})
    assert drop_dir(db).is_dir()  # made by the workers' first segment
    assert pending_segments(db) == [] and not (drop_dir(db) / "rejected").exists()


def test_rerun_from_checkpoint_is_recorded_as_memo_hit(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert outcome(run_pipeline(work, "threads", "track")) == EXPECTED_RESULTS
    first = len(stored_events())
    rerun = outcome(run_pipeline(work, "threads", "track", "cached"))
    # Parsl's checkpoint still answers the call: the app body did not run again
    assert rerun == {"cached_again": 101, "cached_executions": 1}
    events = stored_events()[first:]
    for event in events:
        assert_valid(event)
    assert_golden(golden_view(events, tmp_path), GOLDEN / "threads_rerun.json")


def test_dfk_only_mode_records_every_try_from_the_dfk(tmp_path: Path) -> None:
    assert outcome(run_pipeline(tmp_path / "work", "threads", "track-dfk")) == EXPECTED_RESULTS
    events = stored_events()
    for event in events:
        assert_valid(event)
    tries = _executions(events)
    expected = [e for e in json.loads((GOLDEN / "threads.json").read_text())
                if e["run"]["facets"]["metatrail_execution"]["kind"] == "execution"]
    # the same executions, states and datasets as worker-side recording; no energy (nothing ran in our sight)
    def shape(e: dict[str, Any]) -> tuple[Any, ...]:
        f = e["run"]["facets"]["metatrail_execution"]
        return (e["job"]["name"], e["eventType"], f["tryNumber"], f["extra"]["parsl_task_id"],
                [d["facets"]["metatrail_artifact"]["hash"] for d in e["inputs"] + e["outputs"]])
    assert sorted(map(shape, tries)) == sorted(map(shape, expected))
    assert not any("metatrail_energy" in e["run"]["facets"] for e in tries)
    _assert_lineage_chain(tmp_path / "work")


def test_results_are_the_same_without_the_plugin(tmp_path: Path) -> None:
    assert outcome(run_pipeline(tmp_path / "work", "threads", "plain")) == EXPECTED_RESULTS
    assert not (tmp_path / ".metatrail").exists()  # nothing recorded, nothing written
