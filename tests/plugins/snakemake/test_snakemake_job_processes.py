"""Job process tracking when Snakemake's records reach the plugin late: real child processes of this process
stand in for the controller's, and the record clock is driven by the test (as Snakemake's listener thread would
deliver records). A process no job claims must wait for the records logged before it appeared, not be guessed
to (or dropped for want of) the jobs known so far."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metatrail.energy.processes import TaskProcesses
from metatrail.plugins.snakemake.processes import ChildrenReader, JobProcesses

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


class Clock:
    """(logged, processed) record numbers, set by the test."""

    def __init__(self) -> None:
        self.logged = 0
        self.processed = 0

    def __call__(self) -> tuple[int, int]:
        return self.logged, self.processed


def _burn(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BURN.format(s=seconds)])


def _final_cpu(feed: TaskProcesses, pid: int) -> float | None:
    root = feed.snapshot().roots.get(pid)
    return None if root is None else root.final_s


def _exited_cpu(feed: TaskProcesses) -> float:
    snap = feed.snapshot()
    return snap.extra_s + sum(r.final_s or 0.0 for r in snap.roots.values())


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def busy_job() -> Iterator[tuple[Clock, JobProcesses, TaskProcesses, subprocess.Popen[bytes]]]:
    """Job 1, a shell job, known (record 1 delivered) and running its own process."""
    clock = Clock()
    tracking = JobProcesses(poll_s=0.02, record_clock=clock)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        clock.logged = clock.processed = 1
        busy = tracking.job_started(1, "busy", {}, "sleep 30")
        _wait_for(lambda: sleeper.pid in busy.pids)
        yield clock, tracking, busy, sleeper
    finally:
        sleeper.kill()
        sleeper.wait()
        tracking.close()


def test_a_process_waits_for_the_record_of_its_job(
        busy_job: tuple[Clock, JobProcesses, TaskProcesses, subprocess.Popen[bytes]]) -> None:
    clock, tracking, busy, sleeper = busy_job
    # Job 2's record is logged (2) but not yet delivered when its process (a script's interpreter: its
    # command line names no job) starts and runs.
    clock.logged = 2
    burner = _burn(0.3)
    time.sleep(0.3)  # many looks: the process must not go to job 1, nor be taken for the controller's own
    assert busy.pids == [sleeper.pid]
    clock.processed = 2
    script = tracking.job_started(2, "script", {}, None)
    _wait_for(lambda: burner.pid in script.pids)
    burner.wait()
    _wait_for(lambda: _final_cpu(script, burner.pid) is not None)
    final = _final_cpu(script, burner.pid)
    assert final is not None and final >= 0.27, final
    tracking.job_ended(2)
    notes = script.snapshot().notes
    assert any("by elimination" in n for n in notes), notes
    assert busy.pids == [sleeper.pid]


def test_a_process_that_exits_before_its_job_is_known_keeps_its_cpu_time(
        busy_job: tuple[Clock, JobProcesses, TaskProcesses, subprocess.Popen[bytes]]) -> None:
    clock, tracking, busy, sleeper = busy_job
    clock.logged = 3  # job 2's start record (2) and more are still on their way
    burner = _burn(0.3)
    time.sleep(0.1)
    burner.wait()
    time.sleep(0.2)  # it is reaped: its CPU time now waits for its job
    clock.processed = 2
    script = tracking.job_started(2, "script", {}, None)
    clock.processed = 3
    # Seen alive and then exited, or (on a slow machine) born and reaped between two looks: either way its
    # whole CPU time goes to job 2 and none to job 1.
    _wait_for(lambda: _exited_cpu(script) >= 0.27)
    assert busy.pids == [sleeper.pid] and _exited_cpu(busy) == 0.0


def test_a_process_snakemake_registered_waits_for_its_own_job() -> None:
    """A shell job's ``Popen`` is in ``snakemake.shell.shell._processes`` under its job id before the job's record
    arrives: it goes to that job, never to another job that lacks a process."""
    from snakemake.shell import shell

    clock = Clock()
    tracking = JobProcesses(poll_s=0.02, record_clock=clock)
    proc = subprocess.Popen(["sleep", "30"])
    shell._processes[7] = proc  # as Snakemake does right after starting it
    try:
        clock.logged = clock.processed = 1
        other = tracking.job_started(1, "other", {}, None)  # a run: job whose process has not shown up yet
        clock.logged = clock.processed = 2  # all delivered; job 7's record is not among them: it comes later
        time.sleep(0.2)
        assert other.pids == []
        clock.logged = clock.processed = 3
        mine = tracking.job_started(7, "mine", {}, "echo something else")
        _wait_for(lambda: proc.pid in mine.pids)
        assert other.pids == []
    finally:
        shell._processes.pop(7, None)
        proc.kill()
        proc.wait()
        tracking.close()


def test_cpu_of_a_grandchild_goes_to_its_job_when_two_jobs_end_together(tmp_path: Path) -> None:
    """A ``shell:`` job is ``bash -c 'set -euo pipefail; <command>'``: its interpreter is bash's child, whose CPU
    time is not in bash's counters until bash reaps it. When two jobs' shells exit between the same two looks,
    each must get its own tree's CPU time, not an equal share of both."""
    burned, go = tmp_path / "burned", tmp_path / "go"
    wait = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
    burn = BURN.format(s=0.3) + f"open({str(burned)!r}, 'w').close()\n" + wait
    busy_cmd = f"{sys.executable} -c \"{burn}\"; true burner"
    idle_cmd = f"{sys.executable} -c \"{wait}\"; true idler"
    tracking = JobProcesses(poll_s=0.1)
    busy = tracking.job_started(1, "busy", {}, busy_cmd)
    idle = tracking.job_started(2, "idle", {}, idle_cmd)
    burner = subprocess.Popen(["bash", "-c", f"set -euo pipefail; {busy_cmd}"])
    idler = subprocess.Popen(["bash", "-c", f"set -euo pipefail; {idle_cmd}"])
    try:
        _wait_for(lambda: burner.pid in busy.pids and idler.pid in idle.pids)
        _wait_for(burned.exists)
        time.sleep(0.3)  # looks while the burner's interpreter is done burning but still alive
        go.touch()
        burner.wait()
        idler.wait()
        tracking.job_ended(1)
        tracking.job_ended(2)
        busy_cpu, idle_cpu = _final_cpu(busy, burner.pid), _final_cpu(idle, idler.pid)
        assert busy_cpu is not None and busy_cpu >= 0.27, (busy_cpu, idle_cpu)
        assert idle_cpu is not None and idle_cpu < 0.15, (busy_cpu, idle_cpu)
    finally:
        go.touch()
        for proc in (burner, idler):
            proc.kill()
            proc.wait()
        tracking.close()


def test_every_unclaimed_process_of_a_script_job_is_its_own() -> None:
    """Snakemake checks a ``script:`` rule's interpreter version (a short child) before running the script (a
    second child); neither names the job, and both go to it, although the first already made it "have" one."""
    clock = Clock()
    tracking = JobProcesses(poll_s=0.02, record_clock=clock)
    try:
        clock.logged = clock.processed = 1
        script = tracking.job_started(1, "script", {}, None)
        check = subprocess.Popen([sys.executable, "-c", "import sys; print(sys.version_info)"],
                                 stdout=subprocess.DEVNULL)
        check.wait()
        time.sleep(0.1)
        burner = _burn(0.3)
        _wait_for(lambda: burner.pid in script.pids)
        burner.wait()
        _wait_for(lambda: _exited_cpu(script) >= 0.3)
        tracking.job_ended(1)
        snap = script.snapshot()
        assert not snap.shared, snap.notes
    finally:
        tracking.close()


def test_children_are_read_again_as_they_come_and_go() -> None:
    """The reader keeps each thread's ``children`` file open between looks: what it lists must still follow the
    children started and reaped since, including those of a thread started after the first look, and leave out
    what metatrail's own threads start."""
    reader = ChildrenReader(os.getpid())
    started: dict[str, subprocess.Popen[bytes]] = {}
    done = threading.Event()
    threads: list[threading.Thread] = []

    def start_in_thread(key: str, name: str) -> None:
        def body() -> None:
            started[key] = subprocess.Popen(["sleep", "30"])
            done.wait(30)

        thread = threading.Thread(target=body, name=name, daemon=True)
        threads.append(thread)
        thread.start()
        _wait_for(lambda: key in started)

    try:
        start_in_thread("pool", "ThreadPoolExecutor-0_0")
        start_in_thread("ours", "metatrail-writer")
        listed = reader.children()
        assert started["pool"].pid in listed and started["ours"].pid not in listed
        started["main"] = subprocess.Popen(["sleep", "30"])
        assert started["main"].pid in reader.children()  # the main thread's file, read again
        started["main"].kill()
        started["main"].wait()
        assert started["main"].pid not in reader.children()
        start_in_thread("late", "Thread-9")
        assert started["late"].pid in reader.children()
    finally:
        done.set()
        for thread in threads:
            thread.join()
        for proc in started.values():
            proc.kill()
            proc.wait()
        reader.close()
