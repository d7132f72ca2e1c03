"""Faults on metatrail's side never reach the flow: with an unwritable store, a stalled store, or the plugin's own
code raising, the same flows end in the same states with the same return values (retries included)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prefect_flows import etl, failing, fanout_processes, hostile

from metatrail import get_recorder, logsafe
from metatrail import recorder as recorder_module
from metatrail.plugins.prefect import observer
from metatrail.recorder import Recorder
from metatrail.store import IngestResult, open_store
from metatrail.store.sql import SqlStore

Events = Callable[[], list[dict[str, Any]]]


def _outcomes(work: Path) -> list[tuple[str, str, Any]]:
    """Final state type, state name and return value (or raised exception) of the test flows."""
    work.mkdir(exist_ok=True)
    out = []
    for state in (etl(str(work), return_state=True), failing(7, return_state=True)):
        value = state.result(raise_on_failure=False)
        out.append((state.type.value, state.name, repr(value) if isinstance(value, BaseException) else value))
    return out


def _expected(work: Path) -> list[tuple[str, str, Any]]:
    return [("COMPLETED", "Completed", {"report": str(work / "report.json"), "rows": 3}),
            ("FAILED", "Failed", "RuntimeError('bad input 7')")]


@pytest.fixture(autouse=True)
def _fresh_log_once() -> Iterator[None]:
    logsafe.reset()  # so that each test sees its own "logged once" warnings
    yield
    logsafe.reset()


def test_reference_run_is_recorded(tmp_path: Path, events: Events) -> None:
    assert _outcomes(tmp_path / "work") == _expected(tmp_path / "work")
    assert len(events()) == 14


def test_unwritable_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{blocker / 'metatrail.db'}")
    assert _outcomes(tmp_path / "work") == _expected(tmp_path / "work")
    recorder = get_recorder()
    recorder.flush(60)
    assert recorder.written == 0 and recorder.failed_writes == 14


class StalledStore(SqlStore):
    """A real SQLite store whose writes wait until released: a slow disk or server, seen from the writer."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.release = threading.Event()

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None) -> IngestResult:
        self.release.wait(120)
        return super().ingest(events, site=site)


def test_stalled_store(tmp_path: Path, events: Events) -> None:
    store = StalledStore(f"sqlite:///{tmp_path / 'stalled.db'}")
    recorder_module._recorder = recorder = Recorder(store=store)
    try:
        assert _outcomes(tmp_path / "work") == _expected(tmp_path / "work")
        assert recorder.written == 0 and recorder.pending > 0  # the flows finished without waiting for the store
    finally:
        store.release.set()
    assert recorder.flush(60)
    assert recorder.written == 14


def test_a_locked_store_does_not_hold_up_a_process_pool_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              events: Events) -> None:
    # Another process holds the store's write lock. The pool's children, which record the task runs, cannot store
    # their events; the flow ends when the pool has shut down, that is when every child has exited, and a child's
    # exit waits for its events at most METATRAIL_TIMEOUT, then hands them to a writer process of its own, rather
    # than the whole flush timeout.
    path = tmp_path / "locked.db"
    store = f"sqlite:///{path}"
    open_store(store).close()
    monkeypatch.setenv("METATRAIL_STORE", store)
    monkeypatch.setenv("METATRAIL_TIMEOUT", "1")
    monkeypatch.setenv("METATRAIL_FLUSH_TIMEOUT", "60")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        state = fanout_processes(3, return_state=True)
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert state.result() == 5
    assert took < 30, took  # a child waiting out the flush timeout makes it 60 s or more
    # Once the lock is gone every task run's events are stored: by the children's hand-off writer processes and
    # by this process's Recorder.
    get_recorder().flush(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = [e for e in events() if e["job"]["name"].startswith("fanout-processes.")]
        if len(tasks) == 8:  # START and an end for 3 squares and the total
            break
        time.sleep(0.5)
    assert sorted(e["eventType"] for e in tasks) == ["COMPLETE"] * 4 + ["START"] * 4


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected plugin failure")


@pytest.mark.parametrize("target", ["new_observer", "TaskObserver.on_state", "FlowObserver.on_state",
                                    "TaskObserver.on_end", "get_recorder"])
def test_plugin_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                        target: str) -> None:
    owner: Any = observer
    *path, name = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, name, _raise)
    with caplog.at_level(logging.WARNING, logger="metatrail"):
        assert _outcomes(tmp_path / "work") == _expected(tmp_path / "work")
    assert any("the run is not affected" in r.getMessage() and "injected plugin failure" in r.getMessage()
               for r in caplog.records)


def test_values_that_resist_recording(events: Events) -> None:
    state = hostile(200_000, return_state=True)
    assert state.is_completed() and state.result() == 200_000
    (swallowed,) = [e for e in events() if e["job"]["name"] == "hostile.swallow" and e["eventType"] == "COMPLETE"]
    facet = swallowed["run"]["facets"]["metatrail_execution"]
    assert facet["params"] == {"n": 200_000, "thing": "<prefect_flows.Hostile object>"}
    assert facet["extra"]["return_value"].startswith("[0, 1, 2,") and len(facet["extra"]["return_value"]) < 100
    assert facet["warnings"] == [
        "parameter 'thing' (Hostile) is not JSON-serialisable; stringified",
        "return value (list) is too large to record whole; shortened"]
