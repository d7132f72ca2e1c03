"""The sampler's short cuts give the answers of the long ways: task overlap found by sorting instead of comparing
every pair, the host's own CPU time from ``time.process_time()``, children of the host found (or ruled out) with one
``waitid`` call, node busy time read from ``/proc/stat`` directly."""

from __future__ import annotations

import itertools
import os
import pathlib
import subprocess
import sys
import time

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metatrail.energy.cputime import ProcessTree, node_busy_seconds
from metatrail.energy.estimate import CpuEstimateMeter
from metatrail.energy.ledger import TaskToken, TrackedTask
from metatrail.energy.monitor import EnergyMonitor, _overlapping


def _task(i: int, pid: int, start: float, length: float | None) -> TrackedTask:
    t = TrackedTask(TaskToken(i, f"e{i}"), pid, True, 0.0, start, 1)
    t.stop = None if length is None else start + length
    return t


def _pairwise(tasks: list[TrackedTask]) -> set[int]:
    """The definition: another task with the same root whose [start, stop) meets this one's."""
    out = set()
    for t in tasks:
        stop = t.stop if t.stop is not None else t.start_mono
        if any(o is not t and o.pid == t.pid and o.start_mono < stop and (o.stop is None or o.stop > t.start_mono)
               for o in tasks):
            out.add(t.token.id)
    return out


intervals = st.lists(
    st.tuples(st.integers(1, 3), st.integers(0, 40), st.one_of(st.none(), st.integers(1, 15))), max_size=25
)


@settings(max_examples=300, deadline=None)
@given(intervals, st.lists(st.integers(0, 24), max_size=5))
def test_overlap_by_sorting_matches_every_pair(spec: list[tuple[int, int, int | None]], twice: list[int]) -> None:
    tasks = [_task(i, pid, float(start), None if n is None else float(n)) for i, (pid, start, n) in enumerate(spec)]
    # The sampler may pass a task twice (stopping and unsampled at once): it must not overlap itself.
    repeated = tasks + [tasks[i] for i in twice if i < len(tasks)]
    # running tasks (stop None) take part as others only: a closing task always has a stop
    assert _overlapping(repeated) & {t.token.id for t in tasks if t.stop is not None} == {
        i for i in _pairwise(tasks) if tasks[i].stop is not None
    }


def test_a_burst_of_sequential_tasks_keeps_each_tasks_own_cpu_time() -> None:
    """Thousands of short tasks in the host's process stopped before one sample: none overlaps another, so each
    keeps the CPU time read at its start and stop (the burst used to cost the sampler seconds)."""
    mon = EnergyMonitor(meters=[], interval_s=60.0)
    try:
        mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
        with mon._lock:  # hold the sampler off so that the whole burst reaches one sample
            stopped = [mon.task_stopped(mon.task_started(f"t{i}", pid=os.getpid())) for i in range(2000)]
            overlapping = mon.task_started("overlaps-the-last", pid=os.getpid())
            last = mon.task_started("last", pid=os.getpid())
            stopped.append(mon.task_stopped(last))
            mon._sample()
        payloads = [mon.task_report(s) for s in stopped]
        mon.task_finished(overlapping)
    finally:
        mon.close()
    assert all(p is not None and p["end_task_cpu"] == "read-at-stop" for p in payloads[:-1])
    assert payloads[-1] is not None and payloads[-1]["end_task_cpu"] != "read-at-stop"
    assert any("cannot be told apart" in e for e in payloads[-1]["errors"])


def _burn_child(seconds: float, interpreter: str = sys.executable) -> subprocess.Popen[bytes]:
    """A child that burns ``seconds`` of CPU after its start-up, says so on its stdout, then sleeps (to be killed);
    :func:`_burnt` waits for its word."""
    code = (f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"
            "print('burnt', flush=True)\ntime.sleep(30)")
    return subprocess.Popen([interpreter, "-c", code], stdout=subprocess.PIPE)


def _burnt(child: subprocess.Popen[bytes]) -> None:
    """Wait until ``child`` has burnt its CPU time.

    Its word, not its CPU time in /proc: that counts user and system time in whole clock ticks, each rounded down,
    up to 20 ms short. A child whose start-up took under 10 ms of CPU (the burn counts from after it) never showed
    its ``seconds`` there, so the wait outlived the child's sleep; the child then exited 0 by itself and
    ``Popen.kill()``'s own poll reaped it: returncode 0, which looked as if someone else had reaped it."""
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline() == b"burnt\n"


def test_own_process_tree_counts_a_live_child_and_reaps_nothing() -> None:
    tree = ProcessTree(os.getpid(), include_children=True)
    alone = tree.seconds()
    assert alone is not None and tree.descendants() == []
    child = _burn_child(0.3)
    try:
        _burnt(child)
        assert tree.descendants() == [child.pid]
        with_child = tree.seconds()
        assert with_child is not None and with_child - alone >= 0.25
    finally:
        child.kill()
    # Wait for the exit without reaping (WNOWAIT), so that the reads below certainly meet an exited child nobody
    # has waited for yet (Popen's own polling would reap it at once, and the reads would only sometimes see it).
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    for _ in range(3):
        tree.seconds()
    still_waitable = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    assert still_waitable is not None and still_waitable.si_pid == child.pid  # the tree reaped nothing
    assert child.wait(timeout=10) == -9  # and its exit status is still its owner's


def test_own_cpu_time_matches_proc_and_is_finer_than_a_clock_tick() -> None:
    own = ProcessTree(os.getpid(), include_children=False)
    for _ in itertools.repeat(None, 3):
        via_proc = sum(psutil.Process().cpu_times()[:2])
        fast = own.seconds()
        assert fast is not None and abs(fast - via_proc) < 0.05
    # /proc and os.times() count whole 10 ms ticks; a task of a millisecond in the host's process must not read 0.
    before = own.seconds()
    end = time.process_time() + 0.001
    while time.process_time() < end:
        pass
    after = own.seconds()
    assert before is not None and after is not None and 0.0005 < after - before < 0.009


def test_node_busy_seconds_matches_psutil() -> None:
    t = psutil.cpu_times()
    expected = t.user + t.nice + t.system + t.irq + t.softirq
    assert abs(node_busy_seconds() - expected) < 0.5 * (os.cpu_count() or 1)


def test_a_task_stopping_while_the_sampler_attaches_it_keeps_its_cpu_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's thread stops a task between the sampler's attach and its stop pass (no lock between them): the
    task is then both stopping and unsampled, and must not count as overlapping itself."""
    mon = EnergyMonitor(meters=[CpuEstimateMeter()], interval_s=60.0)
    try:
        mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
        attach = TrackedTask.attach

        def attach_then_stop(task: TrackedTask) -> None:
            attach(task)
            if task.token.execution_id == "racing":
                stopped.append(mon.task_stopped(token))

        stopped: list[object] = []
        monkeypatch.setattr(TrackedTask, "attach", attach_then_stop)
        with mon._lock:
            token = mon.task_started("racing", pid=os.getpid())
            t = time.thread_time()
            while time.thread_time() - t < 0.1:
                pass
            mon._sample()
        monkeypatch.setattr(TrackedTask, "attach", attach)
        payload = mon.task_report(stopped[0])
    finally:
        mon.close()
    assert payload is not None
    # 0.1 s burnt, read in clock ticks
    assert payload["end_task_cpu"] == "read-at-stop" and payload["task_cpu_s"] >= 0.05
    assert not any("cannot be told apart" in e for e in payload["errors"])


def test_cpu_time_of_another_process_read_from_proc_whatever_its_name(tmp_path: pathlib.Path) -> None:
    """``/proc/<pid>/stat`` puts the command name, which may hold spaces and parentheses, before the counters."""
    odd = tmp_path / "a) (b c"
    odd.symlink_to(sys.executable)
    child = _burn_child(0.2, interpreter=str(odd))
    try:
        _burnt(child)
        proc = psutil.Process(child.pid)
        assert proc.name() == "a) (b c"
        t = proc.cpu_times()
        tree = ProcessTree(child.pid, include_children=True)
        read = tree.seconds()
        assert read is not None and abs(read - (t.user + t.system + t.children_user + t.children_system)) < 0.05
    finally:
        child.kill()
        child.wait()
    assert tree.seconds() == read and tree.lost  # gone: the last value stays, and the loss is told


def test_metatrails_own_processes_are_left_out_of_task_trees(monkeypatch: pytest.MonkeyPatch) -> None:
    from metatrail.energy import cputime

    tree = ProcessTree(os.getpid(), include_children=True)
    ours, theirs = _burn_child(0.3), _burn_child(0.3)
    cputime.exclude_own_process(ours.pid)
    try:
        for child in (ours, theirs):
            _burnt(child)
        assert tree.descendants() == [theirs.pid]
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system  # reaped children included
        counted = tree.seconds()
        assert counted is not None
        their_cpu = sum(psutil.Process(theirs.pid).cpu_times()[:2])
        assert abs(counted - own - their_cpu) < 0.05  # ours (0.3 s and more) is not in it
        # Where the kernel has no children files, psutil's walk leaves it out too.
        monkeypatch.setattr(cputime, "child_pids", lambda pid: None)
        monkeypatch.setattr(cputime, "_own_children", lambda me: None)
        assert tree.descendants() == [theirs.pid]
    finally:
        cputime.forget_own_process(ours.pid)
        for child in (ours, theirs):
            child.kill()
            child.wait()
    assert ours.pid not in cputime.own_processes()


def test_the_recorders_writer_process_is_one_of_ours_until_reaped(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: pathlib.Path) -> None:
    from metatrail.energy import cputime
    from metatrail.recorder import Recorder

    monkeypatch.setenv("METATRAIL_WRITER", "process")
    monkeypatch.setenv("METATRAIL_STORE", f"sqlite:///{tmp_path / 'w.db'}")
    recorder = Recorder()
    run = recorder.pipeline_run_started("own", run_id="0190a000-0000-7000-8000-0000000000aa")
    recorder.pipeline_run_finished(run)
    assert recorder.flush(60)
    writer = recorder._process
    assert writer is not None and writer.pid in cputime.own_processes()
    assert writer.pid not in ProcessTree(os.getpid(), include_children=True).descendants()
    recorder.close()
    deadline = time.monotonic() + 30
    while writer.pid in cputime.own_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.pid not in cputime.own_processes()


def _burn(seconds: float) -> None:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


def test_cpu_time_before_a_tasks_first_sample_is_counted() -> None:
    """A task in the host's process whose first sample comes late in its run keeps the CPU time it used before
    that sample (read at its start), in its CPU seconds and its CPU estimate; measured domains stay partial."""
    mon = EnergyMonitor(meters=[CpuEstimateMeter()], interval_s=60.0)
    try:
        mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
        with mon._lock:  # the sampler thread waits: the samples below are the only ones
            token = mon.task_started("late-first-sample", pid=os.getpid())
            _burn(0.4)  # before the first sample
            mon._sample()
            _burn(0.1)  # after it
            stopped = mon.task_stopped(token)
            mon._sample()
        payload = mon.task_report(stopped)
    finally:
        mon.close()
    assert payload is not None
    assert payload["task_cpu_s"] >= 0.45  # the 0.4 s before the first sample and the 0.1 s after
    watts = CpuEstimateMeter().watts_per_cpu
    assert payload["estimated"]["cpu"]["value_j"] == pytest.approx(watts * payload["task_cpu_s"], rel=0.05)
    assert payload["coverage"] < 0.5  # the meters' sampled window is still only the part after the first sample


def test_cpu_time_before_the_first_sample_is_not_given_to_one_of_two_tasks_sharing_the_process() -> None:
    mon = EnergyMonitor(meters=[CpuEstimateMeter()], interval_s=60.0)
    try:
        mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
        with mon._lock:
            first = mon.task_started("first", pid=os.getpid())
            second = mon.task_started("second", pid=os.getpid())
            _burn(0.4)
            mon._sample()
            _burn(0.1)
            stops = [mon.task_stopped(first), mon.task_stopped(second)]
            mon._sample()
        payloads = [mon.task_report(s) for s in stops]
    finally:
        mon.close()
    # Neither can claim the 0.4 s before the first sample: the process's CPU time cannot be told apart there.
    assert all(p is not None and p["task_cpu_s"] < 0.2 for p in payloads)
