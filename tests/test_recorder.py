"""The Recorder's guarantees: never raises, never blocks the caller on storage, kill switch without I/O,
thread/process/fork safety, honest values."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from metatrail import logsafe
from metatrail.model import uuid7, uuid7_from
from metatrail.openlineage.events import iso_time
from metatrail.recorder import Recorder
from metatrail.store import IngestResult, open_store
from metatrail.store.sql import SqlStore


@pytest.fixture(autouse=True, params=["thread", "process"])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every guarantee holds whether events are written on the Recorder's thread or by its writer process."""
    monkeypatch.setenv("METATRAIL_WRITER", request.param)
    logsafe.reset()  # "logged once" is per process: each run of a test starts with nothing logged
    return str(request.param)


def _events(recorder: Recorder) -> list[dict[str, Any]]:
    with open_store(recorder.settings.store) as store:
        return [e.body for e in store.iter_events()]


class BlockingStore(SqlStore):
    """A real SQLite store whose writes wait until released: a server-side stall, as seen from the writer."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.release = threading.Event()

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None) -> IngestResult:
        self.release.wait()
        return super().ingest(events, site=site)


class FailingStore(SqlStore):
    """A real store whose writes fail like a full disk."""

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None) -> IngestResult:
        raise OSError(28, "No space left on device")


def test_kill_switch_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_DISABLED", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{tmp_path / 'never' / 'metatrail.db'}")
    recorder = Recorder()
    run = recorder.pipeline_run_started("p")
    ex = recorder.execution_started("p", "s", pipeline_run=run, inputs=[tmp_path / "missing"])
    recorder.execution_finished(ex, outputs=[tmp_path / "out"])
    recorder.pipeline_run_finished(run)
    assert recorder.flush(1)
    assert ex.pipeline_run_id == run.id and uuid.UUID(ex.id).version == 7
    assert recorder._thread is None and recorder._settings is None  # no thread started, no config read
    assert list(tmp_path.iterdir()) == []


def test_kill_switch_flipped_mid_run(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    ex = recorder.execution_started("p", "before")
    recorder.execution_finished(ex)
    assert recorder.flush(30)
    monkeypatch.setenv("METATRAIL_DISABLED", "1")
    ex2 = recorder.execution_started("p", "after")
    recorder.execution_finished(ex2)
    monkeypatch.delenv("METATRAIL_DISABLED")
    assert recorder.flush(30)
    assert {e["job"]["name"] for e in _events(recorder)} == {"p.before"}


def test_storage_never_blocks_or_raises_into_the_caller(tmp_path: Path) -> None:
    store = BlockingStore(f"sqlite:///{tmp_path / 'slow.db'}")
    recorder = Recorder(store=store)
    ex = recorder.execution_started("p", "s")
    recorder.execution_finished(ex, ended_at=ex.started_at + 1)  # returns although the store is stalled
    assert recorder.pending >= 1
    assert recorder.flush(0.2) is False  # bounded wait, reported honestly
    store.release.set()
    assert recorder.flush(30)
    events = [e.body for e in store.iter_events()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    recorder.close()


def test_failing_store_is_contained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(store=FailingStore(f"sqlite:///{tmp_path / 'full.db'}"))
    ex = recorder.execution_started("p", "s")
    recorder.execution_failed(ex, error=ValueError("task error"))
    recorder.flush(60)
    assert recorder.failed_writes == 2 and recorder.written == 0
    messages = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert len(messages) == 1  # logged once, not per retry or per event


def test_unwritable_store_location_is_contained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the store directory should be")
    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{blocker / 'sub' / 'metatrail.db'}")
    recorder = Recorder()
    ex = recorder.execution_started("p", "s", inputs=[blocker])
    recorder.execution_finished(ex)
    recorder.flush(60)
    assert recorder.written == 0 and recorder.failed_writes == 2
    assert blocker.read_text().startswith("a file")


def test_many_threads_lose_nothing() -> None:
    recorder = Recorder()

    def work(t: int) -> None:
        for i in range(40):
            ex = recorder.execution_started("threads", f"t{t}", params={"i": i})
            recorder.execution_finished(ex)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.flush(60)
    assert len(_events(recorder)) == 8 * 40 * 2
    with open_store(recorder.settings.store) as store:
        assert store.stats()["states"] == {"completed": 320}


def test_fork_child_records_its_own_events() -> None:
    recorder = Recorder()
    ex = recorder.execution_started("fork", "parent")
    pid = os.fork()
    if pid == 0:  # the child: record and leave without running the parent's cleanup
        child = recorder.execution_started("fork", "child")
        recorder.execution_finished(child)
        os._exit(0 if recorder.flush(30) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    recorder.execution_finished(ex)
    assert recorder.flush(30)
    events = _events(recorder)
    assert sorted((e["job"]["name"], e["eventType"]) for e in events) == [
        ("fork.child", "COMPLETE"), ("fork.child", "START"), ("fork.parent", "COMPLETE"), ("fork.parent", "START")]


def test_pending_events_are_flushed_at_exit(tmp_path: Path) -> None:
    script = ("import metatrail\n"
              "r = metatrail.get_recorder()\n"
              "for i in range(50):\n"
              "    r.execution_finished(r.execution_started('exit', f's{i}'))\n")
    env = {**os.environ}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    with open_store(env["METATRAIL_STORE"]) as store:
        assert store.stats()["events"] == 100


def test_outputs_are_hashed_after_the_call_returns(tmp_path: Path) -> None:
    store = BlockingStore(f"sqlite:///{tmp_path / 's.db'}")
    recorder = Recorder(store=store)
    out = tmp_path / "big.bin"
    out.write_bytes(os.urandom(1 << 20))
    ex = recorder.execution_started("p", "s")
    ended = ex.started_at + 2.5
    recorder.execution_finished(ex, outputs=[out], ended_at=ended)
    out.write_bytes(b"replaced")  # hashing happens later, but the event keeps the task's own end time
    store.release.set()
    assert recorder.flush(30)
    complete = next(e.body for e in store.iter_events() if e.body["eventType"] == "COMPLETE")
    assert complete["eventTime"] == iso_time(ended)
    assert complete["run"]["facets"]["metatrail_execution"]["durationSeconds"] == pytest.approx(2.5)
    recorder.close()


def test_parameters_that_are_not_json_are_stringified() -> None:
    recorder = Recorder()

    class Model:
        def __repr__(self) -> str:
            return "Model(layers=3)"

    ex = recorder.execution_started("p", "s", params={"lr": 0.1, "model": Model(), "nan": float("nan")})
    recorder.execution_finished(ex)
    assert recorder.flush(30)
    facet = _events(recorder)[-1]["run"]["facets"]["metatrail_execution"]
    assert facet["params"] == {"lr": 0.1, "model": "Model(layers=3)", "nan": "nan"}
    assert any("'model'" in w for w in facet["warnings"]) and any("'nan'" in w for w in facet["warnings"])


def test_missing_and_remote_inputs_are_null_with_reason(tmp_path: Path) -> None:
    recorder = Recorder()
    ex = recorder.execution_started("p", "s", inputs=[tmp_path / "absent.csv", "s3://bucket/data/x.parquet"])
    recorder.execution_finished(ex)
    assert recorder.flush(30)
    start = _events(recorder)[0]
    facets = {i["name"]: i["facets"]["metatrail_artifact"] for i in start["inputs"]}
    assert facets[str(tmp_path / "absent.csv")]["hash"] is None
    assert facets[str(tmp_path / "absent.csv")]["hashError"]
    assert facets["data/x.parquet"]["hash"] is None and facets["data/x.parquet"]["kind"] == "remote"


def test_code_version_is_read_without_touching_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    before = subprocess.run([*git, "status", "--porcelain", "--ignored"], capture_output=True, text=True).stdout
    monkeypatch.chdir(repo)
    recorder = Recorder()
    recorder.execution_finished(recorder.execution_started("p", "s"))
    assert recorder.flush(30)
    assert _events(recorder)[0]["run"]["facets"]["metatrail_execution"]["codeVersion"]["gitCommit"] == head
    after = subprocess.run([*git, "status", "--porcelain", "--ignored"], capture_output=True, text=True).stdout
    assert after == before


def test_uuid7_layout() -> None:
    ids = [uuid7(1.8e9 + i) for i in range(5)]
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)
    assert uuid7_from(1.8e9, "dag.run.task.1") == uuid7_from(1.8e9, "dag.run.task.1")
    assert uuid7_from(1.8e9, "dag.run.task.1") != uuid7_from(1.8e9, "dag.run.task.2")
    assert uuid.UUID(uuid7_from(1.8e9, "k")).version == 7


def test_an_input_rewritten_before_it_was_hashed_gets_no_hash(tmp_path: Path) -> None:
    store = BlockingStore(f"sqlite:///{tmp_path / 's.db'}")
    recorder = Recorder(store=store)
    data = tmp_path / "in.csv"
    data.write_text("original")
    os.utime(data, (1.7e9, 1.7e9))  # written well before the task
    ex = recorder.execution_started("p", "s", inputs=[data])
    store.release.set()
    assert recorder.flush(30)
    recorder.execution_finished(ex)
    ex2 = recorder.execution_started("p", "s2", inputs=[data], started_at=1.6e9)  # "started" before the write
    recorder.execution_finished(ex2)
    assert recorder.flush(30)
    starts = {e.body["job"]["name"]: e.body["inputs"][0]["facets"]["metatrail_artifact"]
              for e in store.iter_events() if e.body["eventType"] == "START"}
    assert starts["p.s"]["hash"] is not None
    assert starts["p.s2"]["hash"] is None and "modified after the task started" in starts["p.s2"]["hashError"]
    recorder.close()


def test_large_and_odd_parameters_are_bounded() -> None:
    recorder = Recorder()
    big = list(range(100_000))
    ex = recorder.execution_started("p", "s", params={"rows": big, "name": "x", "n": 3, "f": 0.5, "none": None})
    recorder.execution_finished(ex, extra={"return_value": "ok"})
    assert recorder.flush(30)
    facet = _events(recorder)[-1]["run"]["facets"]["metatrail_execution"]
    assert facet["params"]["name"] == "x" and facet["params"]["n"] == 3 and facet["params"]["none"] is None
    assert isinstance(facet["params"]["rows"], str) and len(facet["params"]["rows"]) <= 2001
    assert any("'rows'" in w and "limit" in w for w in facet["warnings"])
    assert facet["extra"]["return_value"] == "ok"


@pytest.mark.parametrize("first_event_late", [False, True])
def test_threads_python_waits_for_at_exit_lose_nothing(first_event_late: bool) -> None:
    """The exit flush runs when the main thread ends, before Python joins its non-daemon threads (a thread pool's
    workers, a host's own threads); what they record afterwards, all of it when they record the first event, is
    stored once they have ended."""
    script = ("import threading, time, metatrail\n"
              "r = metatrail.get_recorder()\n"
              f"if not {first_event_late}:\n"
              "    r.execution_finished(r.execution_started('exit', 'main'))\n"
              "def late():\n"
              "    threading.main_thread().join()\n"
              "    time.sleep(1.0)  # the exit flush of the main thread's events has run\n"
              "    for i in range(20):\n"
              "        r.execution_finished(r.execution_started('exit', f'late{i}'))\n"
              "threading.Thread(target=late).start()\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "metatrail" not in done.stderr, done.stderr
    with open_store(os.environ["METATRAIL_STORE"]) as store:
        assert store.stats()["events"] == 40 + (0 if first_event_late else 2)


def test_an_event_carries_what_was_known_when_it_was_recorded() -> None:
    """A START is built later on the writer, but from the execution as it was when it started: what its end adds
    (a return value, metrics) is in the COMPLETE only. An event's bytes are its identity, so a START rebuilt after
    a writer process died is the same event, stored once."""
    recorder = Recorder()
    ex = recorder.execution_started("p", "s", params={"lr": 0.1}, extra={"queue": "q1"})
    recorder.execution_finished(ex, extra={"return_value": 42}, metrics={"loss": 0.5})  # within the writer's linger
    assert recorder.flush(30)
    facets = {e["eventType"]: e["run"]["facets"]["metatrail_execution"] for e in _events(recorder)}
    assert facets["START"]["extra"] == {"queue": "q1"} and facets["START"]["metrics"] == {}
    assert facets["COMPLETE"]["extra"] == {"queue": "q1", "return_value": 42}
    assert facets["COMPLETE"]["metrics"] == {"loss": 0.5}
    assert facets["START"]["params"] == facets["COMPLETE"]["params"] == {"lr": 0.1}
    recorder.close()


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise AttributeError("this exception has no message")


def test_an_error_that_cannot_be_printed_is_still_recorded() -> None:
    """An exception whose ``__str__`` raises costs neither its own FAIL event nor the other events of its batch."""
    recorder = Recorder()
    executions = [recorder.execution_started("p", f"s{i}") for i in range(4)]
    try:
        raise _Unprintable
    except _Unprintable as exc:
        recorder.execution_failed(executions[0], error=exc)
    for ex in executions[1:]:
        recorder.execution_finished(ex)
    assert recorder.flush(30)
    events = _events(recorder)
    assert len(events) == 8
    fail = next(e for e in events if e["eventType"] == "FAIL")
    assert fail["run"]["facets"]["errorMessage"]["message"].startswith("_Unprintable: <str() of the exception failed")
    recorder.close()


def test_an_execution_finished_after_the_switch_to_the_writer_process_keeps_the_hash_it_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its START was built on the thread, its COMPLETE in the writer process: both carry the hash of the input as
    the task read it, not of what the task wrote into it later."""
    import hashlib

    monkeypatch.setenv("METATRAIL_WRITER", "auto")
    data = tmp_path / "state.json"
    data.write_text("version 1\n")
    os.utime(data, (1.7e9, 1.7e9))
    recorder = Recorder()
    ex = recorder.execution_started("p", "update", inputs=[data])
    assert recorder.flush(30)  # its START is written on the thread, with the hash of what it read
    for i in range(20):  # the host records more tasks: the writer process takes over
        recorder.execution_finished(recorder.execution_started("p", f"other{i}"))
    assert recorder.flush(30) and recorder._process is not None
    data.write_text("version 2, written by the task\n")
    recorder.execution_finished(ex)
    assert recorder.flush(30)
    hashes = {e["eventType"]: e["inputs"][0]["facets"]["metatrail_artifact"]["hash"]
              for e in _events(recorder) if e["job"]["name"] == "p.update"}
    assert hashes == {"START": hashlib.md5(b"version 1\n").hexdigest(),
                      "COMPLETE": hashlib.md5(b"version 1\n").hexdigest()}
    assert not recorder._input_refs  # the host keeps no hashes of executions that ended
    recorder.close()


def test_a_stuck_store_costs_one_exit_wait(tmp_path: Path) -> None:
    """The exit flush that runs after Python's joined threads is skipped when the first one ran out of time: a
    store held locked by another process must not make the exit wait twice (one warning, one timeout)."""
    import sqlite3

    store = os.environ["METATRAIL_STORE"]
    open_store(store).close()
    lock = sqlite3.connect(store[len("sqlite:///"):], isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    script = ("import threading, time, metatrail\n"
              "r = metatrail.get_recorder()\n"
              "r.execution_finished(r.execution_started('exit', 'main'))\n"
              "def late():\n"
              "    threading.main_thread().join()\n"
              "    r.execution_finished(r.execution_started('exit', 'late'))\n"
              "threading.Thread(target=late).start()\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "METATRAIL_FLUSH_TIMEOUT": "1"},
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert done.returncode == 0
    assert done.stderr.count("events were not stored before exit (flush timeout 1s)") == 1, done.stderr
