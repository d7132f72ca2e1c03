"""The Recorder's guarantees: never raises, never blocks the caller on storage, kill switch without I/O,
thread/process/fork safety, honest values."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
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


_FORK_DURING_IMPORTS = """
import multiprocessing, os, sys
import metatrail
def task(i):
    with metatrail.execution(pipeline="p", stage=f"child{i}"):
        pass
if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    with metatrail.execution(pipeline="p", stage="parent"):
        pass
    # Forked at once: the parent's writer thread is still importing the store's modules (a second or more).
    children = [multiprocessing.Process(target=task, args=(i,)) for i in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    sys.exit(max(child.exitcode for child in children))
"""


def test_children_forked_while_the_writer_imports_record_their_events(tmp_path: Path) -> None:
    """A fork while the writer thread was halfway through its first imports left the children with half-made
    modules (``ImportError: … partially initialized module``): every event they recorded was lost. Fork now
    waits for those imports."""
    script = tmp_path / "forks.py"
    script.write_text(_FORK_DURING_IMPORTS)
    env = {**os.environ, "METATRAIL_STORE": f"sqlite:///{tmp_path / 'm.db'}", "METATRAIL_ENERGY": "0"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "ImportError" not in done.stderr and "partially initialized" not in done.stderr, done.stderr
    with open_store(env["METATRAIL_STORE"]) as store:
        names = sorted(e.body["job"]["name"] for e in store.iter_events())
    assert names == sorted([f"p.{s}" for s in ("parent", "child0", "child1", "child2", "child3")] * 2), done.stderr


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
    # A long-lived process records the commit checked out when it builds each event, not the first one it saw.
    (repo / "f").write_text("y")
    subprocess.run([*git, "commit", "-qam", "d"], check=True)
    new_head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    time.sleep(1.1)  # the commit is read again at most once a second
    recorder.execution_finished(recorder.execution_started("p", "later"))
    assert recorder.flush(30)
    later = [e for e in _events(recorder) if e["job"]["name"] == "p.later"]
    assert {e["run"]["facets"]["metatrail_execution"]["codeVersion"]["gitCommit"] for e in later} == {new_head}


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


@contextlib.contextmanager
def _store_locked_by_another_writer() -> Iterator[sqlite3.Connection]:
    """The test's SQLite store, with a write transaction held open on another connection for the block: no one else
    can store meanwhile. Yields that connection (it can still read)."""
    store = os.environ["METATRAIL_STORE"]
    open_store(store).close()
    lock = sqlite3.connect(store[len("sqlite:///"):], isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        yield lock
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def test_a_stuck_store_costs_one_exit_wait(tmp_path: Path) -> None:
    """The exit flush that runs after Python's joined threads is skipped when the first one ran out of time: a
    store held locked by another process must not make the exit wait twice (one warning, one timeout)."""
    script = ("import threading, time, metatrail\n"
              "r = metatrail.get_recorder()\n"
              "r.execution_finished(r.execution_started('exit', 'main'))\n"
              "def late():\n"
              "    threading.main_thread().join()\n"
              "    r.execution_finished(r.execution_started('exit', 'late'))\n"
              "threading.Thread(target=late).start()\n")
    with _store_locked_by_another_writer():
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "METATRAIL_FLUSH_TIMEOUT": "1"},
                              capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0
    assert done.stderr.count("events were not stored before exit (flush timeout 1s)") == 1, done.stderr


def test_an_exit_bounded_by_hand_off_at_exit_waits_that_long_then_the_events_are_stored_after_it(
        tmp_path: Path) -> None:
    """A process whose exit a host waits on (a pool's worker) sets hand_off_at_exit: with the store locked by another
    process its exit waits that long, not the flush timeout; what it held is stored once the lock is gone, by the
    writer process it was handed to."""
    store = os.environ["METATRAIL_STORE"]
    script = ("import time, metatrail\n"
              "r = metatrail.get_recorder()\n"
              "r.hand_off_at_exit(0.5)\n"
              "for i in range(5):\n"
              "    r.execution_finished(r.execution_started('exit', f'step{i}'))\n"
              "time.sleep(0.2)\n")
    with _store_locked_by_another_writer() as lock:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "METATRAIL_FLUSH_TIMEOUT": "60"},
                              capture_output=True, text=True, timeout=120, check=False)
        took = time.monotonic() - started
        assert lock.execute("SELECT count(*) FROM events").fetchone() == (0,)  # nothing stored while locked
    assert done.returncode == 0, done.stderr
    assert "10 events not stored 0.5s into this process's exit; handed to a writer process" in done.stderr
    assert "not stored before exit" not in done.stderr
    assert took < 30, took  # waiting out the flush timeout takes 60 s
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open_store(store) as reader:
            events = [e.body for e in reader.iter_events()]
        if len(events) >= 10:
            break
        time.sleep(0.2)
    assert sorted((e["job"]["name"], e["eventType"]) for e in events) == sorted(
        (f"exit.step{i}", kind) for i in range(5) for kind in ("START", "COMPLETE"))


def _artifact(events: list[dict[str, Any]], job: str, event_type: str, side: str) -> dict[str, Any]:
    event = next(e for e in events if e["job"]["name"] == job and e["eventType"] == event_type)
    return dict(event[side][0]["facets"]["metatrail_artifact"])


def test_an_output_rewritten_before_it_was_hashed_gets_no_hash(tmp_path: Path) -> None:
    """Outputs are hashed on the writer, later: a file the next task rewrites by then (a checkpoint per step) must
    not be recorded with the later content. Its stat at the end is compared when it is hashed."""
    import hashlib

    store = BlockingStore(f"sqlite:///{tmp_path / 's.db'}")
    recorder = Recorder(store=store)
    ckpt = tmp_path / "ckpt.bin"
    first = recorder.execution_started("p", "step1")
    ckpt.write_bytes(b"step 1")
    recorder.execution_finished(first, outputs=[ckpt])  # the writer is stalled in the store: not hashed yet
    second = recorder.execution_started("p", "step2")
    ckpt.write_bytes(b"step 2, longer")
    recorder.execution_finished(second, outputs=[ckpt])
    store.release.set()
    assert recorder.flush(30)
    events = [e.body for e in store.iter_events()]
    one, two = (_artifact(events, f"p.{s}", "COMPLETE", "outputs") for s in ("step1", "step2"))
    assert one["hash"] is None and "modified after the task ended" in one["hashError"]
    assert two["hash"] == hashlib.md5(b"step 2, longer").hexdigest()
    recorder.close()


def test_relative_paths_name_the_files_of_the_directory_they_were_given_in(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The host may change directory before the writer hashes: a relative path is found where it was given."""
    import hashlib

    store = BlockingStore(f"sqlite:///{tmp_path / 's.db'}")
    recorder = Recorder(store=store)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.csv").write_text(f"data of {name}\n")
    monkeypatch.chdir(tmp_path / "a")
    ex = recorder.execution_started("p", "s", inputs=["data.csv"])
    recorder.execution_finished(ex, outputs=["data.csv"])
    monkeypatch.chdir(tmp_path / "b")
    store.release.set()
    assert recorder.flush(30)
    events = [e.body for e in store.iter_events()]
    start = next(e for e in events if e["eventType"] == "START")
    assert start["inputs"][0]["name"] == str(tmp_path / "a" / "data.csv")
    assert _artifact(events, "p.s", "START", "inputs")["hash"] == hashlib.md5(b"data of a\n").hexdigest()
    assert _artifact(events, "p.s", "START", "inputs")["uri"] == "data.csv"  # named as given
    assert _artifact(events, "p.s", "COMPLETE", "outputs")["hash"] == hashlib.md5(b"data of a\n").hexdigest()
    recorder.close()


def test_an_input_from_a_file_server_whose_clock_runs_ahead_keeps_its_hash(tmp_path: Path) -> None:
    """On NFS or Lustre a file's time comes from the server's clock: one a second ahead of ours is not a change."""

    data = tmp_path / "in.csv"
    data.write_text("from the file server")
    ahead = time.time() + 1.0
    os.utime(data, (ahead, ahead))
    recorder = Recorder()
    ex = recorder.execution_started("p", "s", inputs=[data])
    recorder.execution_finished(ex)
    assert recorder.flush(60)
    artifact = _artifact(_events(recorder), "p.s", "START", "inputs")
    assert artifact["hash"] is not None, artifact


def test_one_event_the_store_cannot_take_costs_only_that_event(tmp_path: Path) -> None:
    """A file name that is not UTF-8 (legal on Linux) once made the whole batch unstorable: every event of other
    executions in it was dropped. Now the batch is stored event by event and such values are escaped."""
    recorder = Recorder()
    run = recorder.pipeline_run_started("odd")
    odd = os.fsdecode(b"caf\xe9.txt")
    (tmp_path / odd).write_bytes(b"x")
    handles = [recorder.execution_started("odd", f"s{i}", pipeline_run=run) for i in range(3)]
    weird = recorder.execution_started("odd", "weird", pipeline_run=run, inputs=[tmp_path / odd])
    for ex in [*handles, weird]:
        recorder.execution_finished(ex)
    recorder.pipeline_run_finished(run)
    assert recorder.flush(60)
    events = _events(recorder)
    assert len(events) == 10 and recorder.failed_writes == 0
    name = _artifact(events, "odd.weird", "START", "inputs")["uri"]
    assert name.endswith("caf\\udce9.txt") or name.endswith("caf\\xe9.txt"), name


def test_parameters_are_recorded_as_passed_and_bounded() -> None:
    """Values are copied when recorded (a task that empties the list it was given does not empty the record);
    huge, unsortable or unencodable values become short descriptions, and the execution is still recorded."""
    queue = [1, 2, 3]
    params = {"queue": queue, "mixed": {"default": 1.0, 0: 5.0}, "blob": b"\0" * 50_000_000, "big": 10 ** 5000,
              "name": os.fsdecode(b"caf\xe9"), 7: "a key that is not text"}
    recorder = Recorder()
    ex = recorder.execution_started("p", "s", params=params)
    queue.clear()
    recorder.execution_finished(ex)
    assert recorder.flush(60)
    facet = _events(recorder)[0]["run"]["facets"]["metatrail_execution"]
    stored = facet["params"]
    assert stored["queue"] == [1, 2, 3] and stored["7"] == "a key that is not text"
    assert stored["blob"].startswith("<bytes of 50,000,000 bytes") and len(stored["blob"]) < 400
    assert stored["big"].startswith("<int of") and isinstance(stored["mixed"], str)
    assert "caf" in stored["name"] and recorder.failed_writes == 0
    assert {w.split("'")[1] for w in facet["warnings"]} >= {"mixed", "blob", "big", "name"}


class CountingFailingStore(FailingStore):
    """A store that fails like a full disk, counting the attempts."""

    attempts = 0

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None) -> IngestResult:
        type(self).attempts += 1
        return super().ingest(events, site=site)


def test_a_store_that_keeps_failing_is_tried_once_per_batch_and_flush_says_events_were_lost(tmp_path: Path) -> None:
    """Retries with backoff are for a store that may come back soon; once a batch has failed after them, later
    batches get one attempt each (a host exits in seconds, not minutes). ``flush`` reports the loss."""

    CountingFailingStore.attempts = 0
    recorder = Recorder(store=CountingFailingStore(f"sqlite:///{tmp_path / 'full.db'}"))
    ex = recorder.execution_started("p", "s")
    assert recorder.flush(60) is False  # done, but dropped: not "stored"
    first = CountingFailingStore.attempts
    for i in range(3):
        recorder.execution_finished(recorder.execution_started("p", f"t{i}"))
        assert recorder.flush(60) is False
        time.sleep(0.01)
    assert first == 5 and CountingFailingStore.attempts == first + 3
    recorder.execution_finished(ex)
    recorder.close()


_ENDS_WITH_OS_EXIT = """
import os, sys
from metatrail.recorder import Recorder
big = sys.argv[1]
with open(big, "wb") as f:
    f.truncate(1536 * 1024 * 1024)  # sparse: seconds of hashing
recorder = Recorder()
ex = recorder.execution_started("p", "big")
recorder.execution_finished(ex, outputs=[big])
stored = recorder.flush(0.2)
handed = recorder.hand_off()
print(stored, handed, flush=True)
os._exit(0)  # as Airflow's task runner ends: no exit hooks, the writer thread dies with it
"""


def test_what_a_process_ending_with_os_exit_hands_off_is_stored_after_it(tmp_path: Path) -> None:
    """Airflow's task runner flushes for a bounded time, then ends with ``os._exit``: events still being hashed
    there died with it. ``hand_off`` gives them to a writer process of their own, which outlives the host."""

    script = tmp_path / "ends.py"
    script.write_text(_ENDS_WITH_OS_EXIT)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "METATRAIL_STORE": store, "METATRAIL_ENERGY": "0"}  # either writer (the fixture's)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "big.bin")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["False", "True"], (done.stdout, done.stderr)
    deadline = time.monotonic() + 120
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with open_store(store) as held:
            events = [e.body for e in held.iter_events()]
        if len(events) == 2:
            break
        time.sleep(0.5)
    assert sorted(e["eventType"] for e in events) == ["COMPLETE", "START"]
    complete = next(e for e in events if e["eventType"] == "COMPLETE")
    assert complete["outputs"][0]["facets"]["metatrail_artifact"]["size"] == 1536 * 1024 * 1024


def test_a_handed_off_end_is_one_event_with_its_energy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the host lives on after ``hand_off`` (its own writer finishes too), the hand-off's writer process and
    the host's writer build the same end event: one event, stored once, with the task's energy. The energy report
    was made for the first of them only, and the second stored a second COMPLETE without energy."""
    import psutil

    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("METATRAIL_WRITER", "thread")  # the host's own writer: its thread
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1536 * 1024 * 1024)  # sparse: seconds of hashing, on both writers
    recorder = Recorder()
    ex = recorder.execution_started("p", "big")
    time.sleep(0.05)
    recorder.execution_finished(ex, outputs=[str(big)])
    assert recorder.flush(0.2) is False  # still hashing

    def writer_processes() -> set[int]:
        # Other tests' Recorders in this process may have writer processes of their own, alive until they close:
        # only the one the hand-off starts is waited for.
        return {p.pid for p in psutil.Process().children() if "metatrail.writerproc" in " ".join(p.cmdline())}

    before = writer_processes()
    assert recorder.hand_off() is True
    handed = writer_processes() - before
    assert len(handed) == 1
    assert recorder.flush(120) is True  # this process's writer stored its copy too
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and handed & writer_processes():
        time.sleep(0.2)  # the hand-off's writer process stores its copy and exits
    assert not handed & writer_processes()
    recorder.close()
    with open_store(recorder.settings.store) as held:
        events = [e.body for e in held.iter_events() if e.body["run"]["runId"] == ex.id]
    assert sorted(e["eventType"] for e in events) == ["COMPLETE", "START"]
    complete = next(e for e in events if e["eventType"] == "COMPLETE")
    assert "metatrail_energy" in complete["run"]["facets"]


_CLOSES_SHORT = """
import sys
import time
from metatrail.recorder import Recorder
big = sys.argv[1]
with open(big, "wb") as f:
    f.truncate(1536 * 1024 * 1024)  # sparse: seconds of hashing
recorder = Recorder()
recorder.execution_finished(recorder.execution_started("p", "big"), outputs=[big])
recorder.close(timeout=0.2)  # a host that closes with a short timeout, then exits normally
time.sleep(1)  # after more work of its own: the writer thread has long had nothing left in its queue
"""


def test_a_close_that_ran_out_of_time_leaves_the_rest_to_the_exit_flush(tmp_path: Path) -> None:
    """A host closing the Recorder with a short timeout (Parsl's DFK clean-up did) lost what was still being
    stored: the exit flush skipped a closed Recorder. It now gets the rest of the exit flush's time."""
    script = tmp_path / "closes.py"
    script.write_text(_CLOSES_SHORT)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "METATRAIL_STORE": store, "METATRAIL_ENERGY": "0", "METATRAIL_FLUSH_TIMEOUT": "60"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "big.bin")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open_store(store) as held:
        assert sorted(e.body["eventType"] for e in held.iter_events()) == ["COMPLETE", "START"], done.stderr


def test_a_closed_recorder_is_freed(tmp_path: Path) -> None:
    """A host that makes a Recorder per workflow (a Parsl DFK per ``parsl.load``) closes each; the process-wide exit
    and fork hooks must not keep them alive (with their stores and threads) for the life of the process."""
    import gc
    import weakref

    refs = []
    for i in range(3):
        recorder = Recorder()
        recorder.execution_finished(recorder.execution_started("p", f"s{i}"))
        recorder.close()
        refs.append(weakref.ref(recorder))
        del recorder
    deadline = time.monotonic() + 30
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)  # the writer thread ends once it has nothing left to do
    assert [r() for r in refs] == [None, None, None]


def test_an_artifact_given_already_hashed_keeps_its_hash(tmp_path: Path) -> None:
    """Artifacts given with their hash (``metatrail run -i`` hashes before the command starts) are not looked at
    again: only local paths are checked for changes."""
    from metatrail.model import ArtifactRef, HashInfo

    data = tmp_path / "in.csv"
    data.write_text("x")
    ref = ArtifactRef(str(data), "file", str(data), hash=HashInfo("md5", "9dd4e461268c8034f5c8564e155c67a6"),
                      size=1, kind="file")
    recorder = Recorder()
    ex = recorder.execution_started("p", "s", inputs=[ref])
    recorder.execution_finished(ex, outputs=[ref])
    assert recorder.flush(60)
    events = _events(recorder)
    assert _artifact(events, "p.s", "START", "inputs")["hash"] == "9dd4e461268c8034f5c8564e155c67a6"
    assert _artifact(events, "p.s", "COMPLETE", "outputs")["hash"] == "9dd4e461268c8034f5c8564e155c67a6"
