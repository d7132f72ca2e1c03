"""Fault tests: whatever goes wrong on metatrail's side, the Parsl workflow completes with the same results.

Each fault is real: a store path that cannot be created, a store held locked by another connection (every write
waits), a metatrail module that fails to import (in the DFK process and, through the inherited environment, in the
HTEX workers), the kill switch.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from olspec import assert_valid
from parsl_helpers import EXPECTED_RESULTS, HERE, outcome, run_pipeline, run_script, stored_events

from metatrail.store import open_store


@pytest.mark.parametrize("executor", ["threads", "htex"])
def test_unwritable_store(tmp_path: Path, executor: str) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store directory should be\n")
    env = {"METATRAIL_STORE": f"sqlite:///{blocker / 'store' / 'metatrail.db'}",
           "METATRAIL_HASH_CACHE": str(blocker / "store" / "hashcache.db"), "METATRAIL_FLUSH_TIMEOUT": "3"}
    results = run_pipeline(tmp_path / "work", executor, "track", env=env)
    assert outcome(results) == EXPECTED_RESULTS
    assert "metatrail" in results["_stderr"]  # the problem was reported (once), not swallowed silently
    assert blocker.read_text() == "a file where the store directory should be\n"


def test_store_locked_by_another_writer_hits_the_caps(tmp_path: Path) -> None:
    path = tmp_path / "locked" / "metatrail.db"
    path.parent.mkdir()
    open_store(f"sqlite:///{path}").close()  # a valid store...
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # ...that no one else can write while this transaction is open
    try:
        env = {"METATRAIL_STORE": f"sqlite:///{path}", "METATRAIL_TIMEOUT": "1", "METATRAIL_FLUSH_TIMEOUT": "2"}
        results = run_pipeline(tmp_path / "work", "threads", "track", env=env)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert outcome(results) == EXPECTED_RESULTS
    assert "not stored before exit" in results["_stderr"]  # the exit flush gave up at its cap instead of hanging
    # The store is intact. The run's events need not be missing from it: a writer process the Recorder started
    # outlives the workflow and stores what it was handed once the lock is gone (on a loaded machine, before this
    # look). Whatever is there is whole and this run's.
    stored = stored_events(f"sqlite:///{path}")
    for event in stored:
        assert_valid(event)
    # one pipeline run: every execution's parent, and the run of the pipeline's own events
    runs = {e["run"]["facets"]["parent"]["run"]["runId"] if e["job"]["name"] != "pipeline" else e["run"]["runId"]
            for e in stored}
    assert len(runs) <= 1


@pytest.mark.parametrize(("executor", "broken"), [
    ("threads", "metatrail.recorder"),
    ("threads", "metatrail.plugins.parsl.memoizer"),
    ("htex", "metatrail.recorder"),
])
def test_import_error(tmp_path: Path, executor: str, broken: str) -> None:
    # sitecustomize runs at start-up in the workflow process and in every process it starts (HTEX workers):
    # the module then fails to import with a real ImportError wherever the plugin needs it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{broken!r}] = None\n")
    results = run_pipeline(tmp_path / "work", executor, "track", env={"PYTHONPATH": str(site)})
    assert outcome(results) == EXPECTED_RESULTS
    assert "ImportError" in results["_stderr"] or "ModuleNotFoundError" in results["_stderr"]
    assert not (tmp_path / ".metatrail" / "metatrail.db").exists() or stored_events() == []


def test_kill_switch_does_no_io(tmp_path: Path) -> None:
    results = run_pipeline(tmp_path / "work", "threads", "track", env={"METATRAIL_DISABLED": "1"})
    assert outcome(results) == EXPECTED_RESULTS
    assert not (tmp_path / ".metatrail").exists()


def test_task_cut_off_by_shutdown_is_recorded_as_aborted(tmp_path: Path) -> None:
    # Parsl terminates the HTEX worker (SIGTERM) while an app sleeps: the worker records ABORTED before it dies,
    # and the DFK does not wait for an end that cannot come.
    results = run_script(tmp_path / "work", HERE / "workflows" / "abort.py", [])
    assert outcome(results) == {"quick": "quick", "sleeper_done": False}
    runs = {}
    for event in stored_events():
        facet = event["run"]["facets"]["metatrail_execution"]
        runs.setdefault(facet.get("stage"), []).append(event)
    assert [e["eventType"] for e in runs["quick"]] == ["START", "COMPLETE"]
    sleeper = runs["sleeper"]
    assert [e["eventType"] for e in sleeper] == ["START", "ABORT"]
    assert "SIGTERM" in sleeper[1]["run"]["facets"]["errorMessage"]["message"]
