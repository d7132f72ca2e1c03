"""The writer process: events built and stored outside the host's interpreter, with nothing lost when it dies."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from metatrail import recorder as recorder_module
from metatrail.config import load_settings
from metatrail.errors import ConfigError
from metatrail.model import Status
from metatrail.recorder import Recorder
from metatrail.store import open_store
from metatrail.store.sql import SqlStore


def _bodies(url: str) -> list[dict[str, Any]]:
    with open_store(url) as store:
        return [e.body for e in store.iter_events()]


def _lock_store(url: str) -> sqlite3.Connection:
    """Hold the store's write lock, as another process writing to it (or a stuck lock on NFS) would."""
    open_store(url).close()  # create it first
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # not ours to reap: a zombie left to an init that does not reap has ended all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _record(recorder: Recorder, n: int, *, fail_every: int = 0, inputs: list[Any] | None = None) -> None:
    run = recorder.pipeline_run_started("wp", run_id="0190a000-0000-7000-8000-0000000000ff", started_at=1.8e9)
    for i in range(n):
        ex = recorder.execution_started("wp", f"s{i % 3}", pipeline_run=run, params={"i": i},
                                        execution_id=f"0190a000-0000-7000-8000-{i:012d}", started_at=1.8e9 + i,
                                        inputs=inputs or [])
        if fail_every and i % fail_every == 0:
            try:
                raise ValueError(f"task {i} failed")
            except ValueError as exc:
                recorder.execution_failed(ex, error=exc, ended_at=1.8e9 + i + 0.5)
        else:
            recorder.execution_finished(ex, ended_at=1.8e9 + i + 0.5)
    recorder.pipeline_run_finished(run, ended_at=1.8e9 + n + 1)


def test_process_writer_stores_what_the_thread_writer_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same recorded calls give byte-identical events either way: the writer process is only a place."""
    stored: dict[str, list[dict[str, Any]]] = {}
    monkeypatch.setenv("METATRAIL_ENERGY", "0")  # measured values differ from run to run (reports: next test)
    for mode in ("thread", "process"):
        url = f"sqlite:///{tmp_path / mode / 'm.db'}"
        monkeypatch.setenv("METATRAIL_STORE", url)
        monkeypatch.setenv("METATRAIL_WRITER", mode)
        recorder = Recorder()
        _record(recorder, 150, fail_every=10)
        assert recorder.flush(60)
        assert recorder.written == 302 and recorder.failed_writes == 0
        assert (recorder._process is not None) == (mode == "process")
        recorder.close()
        stored[mode] = sorted(_bodies(url), key=lambda e: (e["run"]["runId"], e["eventType"]))
    assert stored["thread"] == stored["process"]
    fails = [e for e in stored["process"] if e["eventType"] == "FAIL"]
    assert len(fails) == 15
    error = fails[0]["run"]["facets"]["errorMessage"]
    assert error["message"].startswith("ValueError: task") and "Traceback" in error["stackTrace"]
    assert {e["run"]["facets"]["metatrail_execution"]["pid"] for e in stored["process"]} == {os.getpid()}


def test_auto_starts_the_process_only_for_a_busy_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_WRITER", "auto")
    quiet = Recorder()
    _record(quiet, 10)
    assert quiet.flush(60) and quiet._process is None
    busy = Recorder()
    _record(busy, recorder_module.PROCESS_AFTER_EVENTS)
    assert busy.flush(60) and busy._process is not None
    assert busy.written == 2 * recorder_module.PROCESS_AFTER_EVENTS + 2


def test_an_injected_store_keeps_the_thread_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_WRITER", "process")
    store = SqlStore(f"sqlite:///{tmp_path / 'own.db'}")
    recorder = Recorder(store=store)
    _record(recorder, 5)
    assert recorder.flush(30) and recorder._process is None
    assert len(list(store.iter_events())) == 12


def test_a_killed_writer_process_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_WRITER", "process")
    recorder = Recorder()
    _record(recorder, 20)
    assert recorder.flush(60)
    first = recorder._process
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while first.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not first.alive
    run = recorder.pipeline_run_started("after", run_id="0190a000-0000-7000-8000-0000000000fe")
    for i in range(300):
        recorder.execution_finished(recorder.execution_started("after", "s", pipeline_run=run, params={"i": i}))
    recorder.pipeline_run_finished(run)
    assert recorder.flush(60)
    with open_store(recorder.settings.store) as store:
        assert store.stats()["events"] == 42 + 602


def test_batches_unacknowledged_when_the_process_dies_are_written_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the writer process while it is busy: whatever it had not acknowledged is written on the thread, and an
    event that it had stored but not acknowledged is still stored once. The store ends up exactly as the thread
    writer leaves it after the same calls."""
    monkeypatch.setenv("METATRAIL_ENERGY", "0")
    stored: dict[str, list[str]] = {}
    for mode in ("thread", "process"):
        url = f"sqlite:///{tmp_path / mode / 'm.db'}"
        monkeypatch.setenv("METATRAIL_STORE", url)
        monkeypatch.setenv("METATRAIL_WRITER", mode)
        recorder = Recorder()
        _record(recorder, 1)
        assert recorder.flush(60)
        process = recorder._process
        _record(recorder, 2000)  # the first execution again: the same events, stored once by design
        if mode == "process":
            assert process is not None
            os.kill(process.pid, signal.SIGKILL)
        assert recorder.flush(120)
        recorder.close()
        with open_store(url) as store:
            stored[mode] = sorted(e.id for e in store.iter_events())
    assert len(stored["process"]) > 4000
    assert stored["process"] == stored["thread"]


def test_events_are_stored_when_the_host_exits_without_flushing(tmp_path: Path) -> None:
    script = ("import metatrail\n"
              "r = metatrail.get_recorder()\n"
              "for i in range(400):\n"
              "    r.execution_finished(r.execution_started('exit', f's{i}'))\n")
    env = {**os.environ, "METATRAIL_WRITER": "process"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    with open_store(env["METATRAIL_STORE"]) as store:
        assert store.stats()["events"] == 800


_KILLED_HOST = """
import os, signal, time
from metatrail.recorder import Recorder
r = Recorder()
for i in range(100):
    r.execution_finished(r.execution_started("crash", "s", params={"i": i}))
deadline = time.monotonic() + 30
handed = 0
while handed < 200 and time.monotonic() < deadline:
    time.sleep(0.02)
    if r._process is not None and not r._queue:
        with r._process._lock:
            handed = sum(len(items) for items in r._process._unacked.values())
time.sleep(0.2)  # the last frame is through: the pipe has room for all of them
print(r._process.pid, handed, r._done, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_batches_in_the_pipe_are_stored_when_the_host_is_killed(tmp_path: Path) -> None:
    """The host is killed with every batch in the writer process's pipe and none acknowledged (the store was busy):
    the writer process cannot acknowledge to anyone, and still stores them all."""
    url = os.environ["METATRAIL_STORE"]
    env = {**os.environ, "METATRAIL_WRITER": "process", "METATRAIL_ENERGY": "0"}
    locker = _lock_store(url)
    try:
        with open(tmp_path / "host.err", "w") as err:
            host = subprocess.Popen([sys.executable, "-c", _KILLED_HOST], env=env, stdout=subprocess.PIPE,
                                    stderr=err, text=True)
            assert host.stdout is not None
            line = host.stdout.readline()
            assert host.wait(30) == -signal.SIGKILL
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    pid, handed, done = map(int, line.split())
    assert (handed, done) == (200, 0)
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)
    with open_store(url) as store:
        assert store.stats()["events"] == 200, (tmp_path / "host.err").read_text()[-2000:]


def test_close_keeps_its_timeout_while_the_writer_process_is_stalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the store's write lock: the writer process stalls, the pipe fills, and the writer
    thread waits in a send. close(timeout) returns in about its timeout all the same, and once the store is free
    every event is stored (by the writer process, or on the thread for what was never handed over)."""
    monkeypatch.setenv("METATRAIL_WRITER", "process")
    monkeypatch.setenv("METATRAIL_ENERGY", "0")
    url = os.environ["METATRAIL_STORE"]
    locker = _lock_store(url)
    recorder = Recorder()
    try:
        for i in range(1000):  # about 1 MB of batches: many times what the pipe holds
            recorder.execution_finished(recorder.execution_started("stuck", "s", params={"i": i, "blob": "x" * 300}))
        queued, deadline = -1, time.monotonic() + 15
        while queued != len(recorder._queue) and time.monotonic() < deadline:
            queued = len(recorder._queue)
            time.sleep(0.3)
        process = recorder._process
        assert process is not None and queued > 0  # the writer thread waits for room in the pipe
        closer = threading.Thread(target=recorder.close, kwargs={"timeout": 1}, daemon=True)
        started = time.monotonic()
        closer.start()
        closer.join(5)
        assert not closer.is_alive(), "close(timeout=1) waited for the stalled writer process"
        assert time.monotonic() - started < 4
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert process._proc.wait(30) == 0  # it got to the end of the pipe: closed once the send was through
    deadline = time.monotonic() + 30
    while recorder.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.pending == 0
    recorder.close(5)
    with open_store(url) as store:
        assert store.stats()["events"] == 2000


def test_relative_paths_resolve_where_the_host_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer process follows the host's working directory, so a relative input names the host's file."""
    monkeypatch.setenv("METATRAIL_WRITER", "process")
    recorder = Recorder()
    _record(recorder, 2)
    assert recorder.flush(60) and recorder._process is not None  # started in the first directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "input.txt").write_bytes(b"the host's data\n")
    monkeypatch.chdir(elsewhere)
    ex = recorder.execution_started("rel", "s", inputs=["input.txt"])
    recorder.execution_finished(ex)
    assert recorder.flush(60)
    starts = [e for e in _bodies(recorder.settings.store) if e["job"]["name"] == "rel.s" and e["eventType"] == "START"]
    artifact = starts[0]["inputs"][0]["facets"]["metatrail_artifact"]
    assert artifact["uri"] == "input.txt"
    assert artifact["hash"] == hashlib.md5(b"the host's data\n").hexdigest()


def test_the_writer_process_runs_none_of_the_workflow_directory_s_modules(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A workflow directory often holds modules named like the standard library's (``logging.py``, ``random.py``).
    The host (a console script: ``snakemake``, ``airflow``) does not import from it, and neither may the writer
    process: ``python -m`` would put the directory first on its path, run the user's module as a hidden side effect,
    and the writer would die of it."""
    marker = tmp_path / "ran.txt"
    (tmp_path / "logging.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METATRAIL_WRITER", "process")
    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{tmp_path / 'store' / 'm.db'}")
    recorder = Recorder()
    _record(recorder, 40)
    assert recorder.flush(60)
    process = recorder._process
    assert process is not None and process.alive  # it stored the batches and lives on
    recorder.close()
    assert not marker.exists()
    assert len(_bodies(recorder.settings.store)) == 82


def test_energy_reports_are_made_by_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The energy report needs the host's meter: it is made before the item goes to the writer process."""

    class Monitor:
        def task_started(self, execution_id: str, *, pid: int, include_children: bool = True,
                         source: object = None) -> object:
            return ("token", execution_id)

        def task_stopped(self, token: object) -> object:
            return ("stopped", token)

        def task_report(self, stopped: object) -> dict[str, Any]:
            return {"reportedIn": os.getpid(), "stopped": repr(stopped)}

    monkeypatch.setenv("METATRAIL_WRITER", "process")
    recorder = Recorder(energy_monitor=Monitor())
    ex = recorder.execution_started("energy", "s")
    recorder.execution_finished(ex, status=Status.COMPLETED)
    assert recorder.flush(60) and recorder._process is not None
    complete = next(e for e in _bodies(recorder.settings.store) if e["eventType"] == "COMPLETE")
    assert complete["run"]["facets"]["metatrail_energy"]["reportedIn"] == os.getpid()


def test_writer_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="writer"):
        load_settings(writer="fork")
    assert load_settings(writer=" Process ").writer == "process"
