"""Lifecycle edges of the Recorder: close with a timeout that runs out, events recorded as (or after) the writer
ends at close, the exit flush after close, fork while another thread creates the process-wide Recorder, and values
that must not make a public method raise into the host. Each test holds one of the guarantees in the module
docstring of ``metatrail.recorder``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from metatrail import logsafe
from metatrail.recorder import Recorder
from metatrail.store import open_store


@pytest.fixture(autouse=True)
def _fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_ENERGY", "0")
    logsafe.reset()


def _bodies(url: str) -> list[dict[str, Any]]:
    with open_store(url) as store:
        return [e.body for e in store.iter_events()]


def _lock_store(url: str) -> sqlite3.Connection:
    """Hold the store's write lock, as another process writing to it would."""
    open_store(url).close()
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_close_keeps_its_timeout_while_the_writer_thread_waits_on_a_locked_store(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the store's write lock and the writer thread waits in a write (SQLite's busy timeout:
    a minute, retried). close(timeout) ran out of time, then closed the store, which waited for that write: the host
    hung for as long as the lock was held. It now returns in about its timeout, and the events are stored once the
    store is free."""
    monkeypatch.setenv("METATRAIL_WRITER", "thread")
    url = os.environ["METATRAIL_STORE"]
    locker = _lock_store(url)
    recorder = Recorder()
    released = False
    try:
        recorder.execution_finished(recorder.execution_started("stuck", "s"))
        deadline = time.monotonic() + 30
        while not (recorder._inflight and recorder._store is not None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder._inflight, "the writer thread never took the batch"
        time.sleep(0.2)  # in the store's write now, waiting for the lock
        closer = threading.Thread(target=recorder.close, kwargs={"timeout": 0.5}, daemon=True)
        started = time.monotonic()
        closer.start()
        closer.join(5)
        took = time.monotonic() - started
        hung = closer.is_alive()
        locker.execute("ROLLBACK")
        locker.close()
        released = True
        closer.join(120)
        assert not hung and took < 4, f"close(timeout=0.5) waited {took:.1f}s for the locked store"
    finally:
        if not released:
            locker.execute("ROLLBACK")
            locker.close()
    assert recorder.flush(60)
    assert sorted(e["eventType"] for e in _bodies(url)) == ["COMPLETE", "START"]


def test_an_event_recorded_while_the_writer_thread_ends_after_close_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """After close the writer thread ends once nothing is left. An event recorded between its last look at the queue
    and its end found the thread still alive, so no new writer was started: the event stayed queued for good (flush
    said False at once, and the exit flush skips a closed Recorder). The thread is held at that point here."""
    monkeypatch.setenv("METATRAIL_WRITER", "thread")
    ending, go_on = threading.Event(), threading.Event()
    writer_code = Recorder._writer.__code__

    def trace(frame: Any, event: str, _arg: Any) -> Any:
        if event == "call" and frame.f_code is writer_code:
            def local(frame: Any, event: str, _arg: Any) -> Any:
                if event == "return" and not go_on.is_set():
                    ending.set()  # it has let go of the lock, on its way out
                    go_on.wait(10)
                return local
            return local
        return None

    previous = threading.gettrace()
    threading.settrace(trace)
    try:
        recorder = Recorder()
        recorder.execution_finished(recorder.execution_started("late", "before"))
    finally:
        threading.settrace(previous)  # only the writer thread started above is traced
    recorder.close(30)
    assert ending.wait(10), "the writer thread did not end after close"
    late = recorder.execution_started("late", "after")
    recorder.execution_finished(late)
    go_on.set()
    assert recorder.flush(10)
    names = sorted((e["job"]["name"], e["eventType"]) for e in _bodies(recorder.settings.store))
    assert names == [("late.after", "COMPLETE"), ("late.after", "START"),
                     ("late.before", "COMPLETE"), ("late.before", "START")]
    recorder.close(30)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "2024-01-01T00:00:00"], ids=["nan", "inf", "text"])
def test_a_start_time_that_is_not_a_number_does_not_raise_into_the_host(bad: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The handle's id was made from ``started_at`` before the boundary: a NaN (a time computed from missing data) or
    a datetime's text raised ValueError/OverflowError into the task. The calls now return usable handles; what cannot
    be built is counted as lost, and flush says so."""
    import datetime

    monkeypatch.setenv("METATRAIL_WRITER", "thread")
    recorder = Recorder()
    for value in (bad, datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)):
        run = recorder.pipeline_run_started("odd", started_at=value)
        ex = recorder.execution_started("odd", "s", pipeline_run=run, started_at=value)
        assert run.id and ex.id and ex.pipeline_run_id == run.id
        recorder.execution_finished(ex)
        recorder.pipeline_run_finished(run)
    assert recorder.flush(30) is False  # events that could not be built are lost, and said to be
    good = recorder.execution_started("odd", "good")
    recorder.execution_finished(good)
    assert recorder.flush(30)
    assert ("odd.good", "COMPLETE") in {(e["job"]["name"], e["eventType"]) for e in _bodies(recorder.settings.store)}
    recorder.close(30)


_RECORDS_AFTER_CLOSE = """
import sys
from metatrail.recorder import Recorder
big = sys.argv[1]
with open(big, "wb") as f:
    f.truncate(1536 * 1024 * 1024)  # sparse: seconds of hashing
recorder = Recorder()
recorder.execution_finished(recorder.execution_started("p", "before"))
recorder.close()
# A hook that runs after the host closed the Recorder (a callback on another thread, a second workflow in the
# process): accepted, and the process then exits normally.
recorder.execution_finished(recorder.execution_started("p", "after"), outputs=[big])
"""


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_events_recorded_after_close_are_stored_at_exit(tmp_path: Path, writer: str) -> None:
    """Events recorded after close() are accepted (a new writer starts), but the exit flush skipped a closed
    Recorder: the writer, a daemon thread, died at exit with them. close() waited for what was recorded before it;
    the exit flush now waits for what came after."""
    script = tmp_path / "after_close.py"
    script.write_text(_RECORDS_AFTER_CLOSE)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "METATRAIL_STORE": store, "METATRAIL_ENERGY": "0", "METATRAIL_FLUSH_TIMEOUT": "60",
           "METATRAIL_WRITER": writer}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "big.bin")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stored = sorted((e["job"]["name"], e["eventType"]) for e in _bodies(store))
    assert stored == [("p.after", "COMPLETE"), ("p.after", "START"), ("p.before", "COMPLETE"),
                      ("p.before", "START")], done.stderr


def test_a_child_forked_while_another_thread_creates_the_recorder_can_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """``get_recorder`` creates the process-wide Recorder under a lock. A fork while another thread held it (the
    host's first task starting on a thread as another forks a worker) left the child a lock nobody would release:
    its first ``get_recorder`` hung for ever. The child now starts with the lock free."""
    import signal

    from metatrail import recorder as recorder_module

    monkeypatch.setenv("METATRAIL_WRITER", "thread")
    monkeypatch.setattr(recorder_module, "_recorder", None)
    holding, release = threading.Event(), threading.Event()

    def creating() -> None:  # a thread in the middle of get_recorder()'s creation of the Recorder
        with recorder_module._recorder_lock:
            holding.set()
            release.wait(30)

    creator = threading.Thread(target=creating, daemon=True)
    creator.start()
    try:
        assert holding.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: record with the process-wide Recorder, leave without the parent's clean-up
            code = 1
            try:
                rec = recorder_module.get_recorder()
                rec.execution_finished(rec.execution_started("forked", "child"))
                code = 0 if rec.flush(30) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in get_recorder()")
    finally:
        release.set()
        creator.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [(e["job"]["name"], e["eventType"]) for e in _bodies(os.environ["METATRAIL_STORE"])] == [
        ("forked.child", "START"), ("forked.child", "COMPLETE")]


_FORK_DURING_A_WRITE = """
import os, sys, time
import metatrail.store.ingest as ingest
from metatrail.recorder import get_recorder
recorder = get_recorder()
recorder.execution_finished(recorder.execution_started("p", "warm-up"))
assert recorder.flush(60)
own = ingest.ingest_prepared
def slow(*args, **kwargs):
    time.sleep(0.5)  # called inside the store's transaction: SQLite's write lock is held
    return own(*args, **kwargs)
ingest.ingest_prepared = slow
recorder.execution_finished(recorder.execution_started("p", "parent"))
time.sleep(0.15)  # the writer thread is now inside its transaction
pid = os.fork()
if pid == 0:
    ingest.ingest_prepared = own
    recorder.execution_finished(recorder.execution_started("p", "child"))
    os._exit(0 if recorder.flush(10) else 3)
_, status = os.waitpid(pid, 0)
assert recorder.flush(60)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_during_the_writers_transaction_stores_its_events(tmp_path: Path) -> None:
    """A fork while the writer thread was inside a store transaction left the child with SQLite's in-process state
    of it (locks held by a connection the child cannot finish): the child's own connection waited on them and the
    child's events were lost. Fork now waits for the transaction (a bounded time)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "METATRAIL_STORE": url, "METATRAIL_WRITER": "thread", "METATRAIL_ENERGY": "0"}
    done = subprocess.run([sys.executable, "-c", _FORK_DURING_A_WRITE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    stages = sorted(b["job"]["name"] for b in _bodies(url))
    assert stages == sorted(["p.warm-up", "p.parent", "p.child"] * 2)
