"""The /proc files the sampler reads at every sample, kept open and re-read (metatrail.energy.procfs): each read gives
fresh content, a kept file never reads another process than the one it was opened for, the kept files are bounded
and dropped after a fork, and a look at the host's own children opens nothing once its threads' files are open."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from forkkit import held_by_another_thread, in_forked_child

from metatrail.energy import cputime, procfs
from metatrail.energy.cputime import ProcessTree, node_busy_seconds
from metatrail.energy.procfs import ChildrenReader, ProcGone, StatFiles, read_node_stat


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _sleeper(started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "30"])
    started.append(proc)
    return proc


def _count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths procfs opens from now on (a list that fills as it does)."""
    opened: list[str] = []
    real_open = procfs._open
    monkeypatch.setattr(procfs, "_open", lambda path: (opened.append(path), real_open(path))[1])
    return opened


def _cpu_ticks(stat: bytes) -> int:
    """utime + stime of a ``/proc/<pid>/stat`` line, in clock ticks."""
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def test_node_stat_is_read_afresh_from_the_kept_file(monkeypatch: pytest.MonkeyPatch) -> None:
    with open("/proc/stat", "rb") as fh:
        assert read_node_stat() is not None
        first_line = fh.readline().rstrip(b"\n")
    fd = procfs._node_stat[0]
    opened = _count_opens(monkeypatch)
    kept = read_node_stat()
    assert opened == [] and procfs._node_stat == [fd]  # the same file, read again
    assert kept is not None and kept.split()[0] == b"cpu" and len(kept.split()) == len(first_line.split())
    before = node_busy_seconds()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    # The node was busy for at least the 0.3 s burnt here (ticks of 10 ms: allow one).
    assert node_busy_seconds() - before >= 0.3 - 0.02
    assert abs(node_busy_seconds() - sum(getattr(psutil.cpu_times(), f, 0.0) for f in
                                         ("user", "nice", "system", "irq", "softirq"))) < 0.5 * (os.cpu_count() or 1)


def test_stat_files_read_a_live_process_afresh(sleepers: list[subprocess.Popen[bytes]]) -> None:
    files = StatFiles()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                               "while time.process_time() < end: pass\nprint('burnt', flush=True)\ntime.sleep(30)"],
                              stdout=subprocess.PIPE)
    sleepers.append(burner)
    first = _cpu_ticks(files.read(burner.pid))
    assert burner.stdout is not None and burner.stdout.readline().strip() == b"burnt"
    again = files.read(burner.pid)
    assert len(files) == 1  # the same kept file, read again
    assert _cpu_ticks(again) - first >= 30  # 0.5 s burnt since the first read, in 10 ms ticks (some at start)
    files.close()
    assert len(files) == 0


def test_a_kept_file_never_reads_a_process_that_has_gone(sleepers: list[subprocess.Popen[bytes]]) -> None:
    files = StatFiles()
    proc = _sleeper(sleepers)
    assert files.read(proc.pid).startswith(f"{proc.pid} (sleep)".encode())
    proc.kill()
    proc.wait()
    # Its kept file answers ESRCH now, whatever process may get the number next; the file is dropped and the pid,
    # opened again, names no process.
    with pytest.raises(ProcGone):
        files.read(proc.pid)
    assert len(files) == 0


def test_a_reused_pid_is_read_as_the_new_process(sleepers: list[subprocess.Popen[bytes]]) -> None:
    """A file kept for a process that has gone is not read as the process that now holds its number: the number is
    opened again. (Pids are not reused on demand: a file kept for another, reaped child stands in for the file of
    the number's previous owner.)"""
    files = StatFiles()
    new = _sleeper(sleepers)
    files._fds[new.pid] = _gone_process_file(sleepers)  # as if kept for the number's previous owner
    stat = files.read(new.pid)
    assert stat.startswith(f"{new.pid} (sleep)".encode())
    assert len(files) == 1  # the new process's file replaced the old one
    files.close()


def _gone_process_file(sleepers: list[subprocess.Popen[bytes]]) -> int:
    proc = _sleeper(sleepers)
    fd = os.open(f"/proc/{proc.pid}/stat", os.O_RDONLY)
    proc.kill()
    proc.wait()
    with pytest.raises(ProcessLookupError):
        os.pread(fd, 4096, 0)
    return fd


def test_kept_files_are_bounded_least_recently_read_first(sleepers: list[subprocess.Popen[bytes]]) -> None:
    files = StatFiles(kept=2)
    a, b, c = (_sleeper(sleepers) for _ in range(3))
    files.read(a.pid)
    files.read(b.pid)
    files.read(a.pid)  # now b is the least recently read
    files.read(c.pid)
    assert len(files) == 2 and set(files._fds) == {a.pid, c.pid}
    assert files.read(b.pid).startswith(f"{b.pid} (sleep)".encode())  # opened again
    files.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_forked_child_closes_the_kept_files_at_once(sleepers: list[subprocess.Popen[bytes]]) -> None:
    files = StatFiles()
    proc = _sleeper(sleepers)
    files.read(proc.pid)
    reader = ChildrenReader(os.getpid())
    assert proc.pid in (reader.children() or [])
    assert read_node_stat() is not None
    kept = [*files._fds.values(), *(fd for _, fd in reader._fds.values()), *procfs._node_stat]
    assert kept and all(_is_open(fd) for fd in kept)

    def check() -> bool:
        # Closed before the child's own code ran (it may open files that get those numbers); then read afresh.
        closed = not any(_is_open(fd) for fd in kept) and len(files) == 0 and not reader._fds
        return (closed and files.read(proc.pid).startswith(str(proc.pid).encode())
                and read_node_stat() is not None and reader.children() is not None)

    assert in_forked_child(check)
    assert all(_is_open(fd) for fd in kept)  # the parent's are untouched
    files.close()
    reader.close()


def test_a_forked_child_does_not_inherit_a_held_lock(sleepers: list[subprocess.Popen[bytes]]) -> None:
    """A thread of the host can fork while another reads (under a keeper's lock): in the child nobody would ever
    release that lock. The child's reads must not hang."""
    files = StatFiles()
    reader = ChildrenReader(os.getpid())
    proc = _sleeper(sleepers)
    try:
        with held_by_another_thread(procfs._node_lock, files._lock, reader._lock):
            assert in_forked_child(lambda: read_node_stat() is not None and bool(files.read(proc.pid))
                                   and reader.children() is not None)
    finally:
        files.close()
        reader.close()


def test_children_reader_keeps_each_threads_file_open(sleepers: list[subprocess.Popen[bytes]]) -> None:
    reader = ChildrenReader(os.getpid(), skip_timers=True)
    done = threading.Event()
    started: dict[str, subprocess.Popen[bytes]] = {}
    threads: list[threading.Thread] = []

    def start_in(key: str, thread: threading.Thread) -> None:
        threads.append(thread)
        thread.start()
        _wait_for(lambda: key in started)

    def body(key: str) -> Callable[[], None]:
        def run() -> None:
            started[key] = subprocess.Popen(["sleep", "30"])
            sleepers.append(started[key])
            done.wait(30)
        return run

    try:
        start_in("pool", threading.Thread(target=body("pool"), name="ThreadPoolExecutor-0_0", daemon=True))
        start_in("ours", threading.Thread(target=body("ours"), name="metatrail-writer", daemon=True))
        timer = threading.Timer(0.0, body("timer"))
        timer.daemon = True
        start_in("timer", timer)
        listed = reader.children()
        assert listed is not None
        assert started["pool"].pid in listed
        assert started["ours"].pid not in listed and started["timer"].pid not in listed
        with pytest.MonkeyPatch.context() as patch:
            opened = _count_opens(patch)
            for _ in range(5):
                again = reader.children()
                assert again is not None and started["pool"].pid in again
        assert opened == []  # every look after the first re-reads the files it opened then
        every = ChildrenReader(os.getpid())
        assert started["timer"].pid in (every.children() or [])  # timers only when asked
        every.close()
    finally:
        done.set()
        for thread in threads:
            thread.join()
        reader.close()


def test_a_look_at_the_hosts_children_opens_nothing_once_its_files_are_open(
        sleepers: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """What the sampler does at every sample for a task in the host's own process that has a child: list the
    host's children, read each one's stat. After the first look it opens none of those files again (the child's own
    children are still listed by opening its threads' files: a process seen for a while is not worth more kept
    files)."""
    child = _sleeper(sleepers)
    tree = ProcessTree(os.getpid(), include_children=True)
    assert child.pid in tree.descendants()
    assert tree.seconds() is not None
    opened = _count_opens(monkeypatch)
    for _ in range(5):
        assert child.pid in tree.descendants()
        assert tree.seconds() is not None
    assert not [p for p in opened if p.startswith(f"/proc/{os.getpid()}/") or p == f"/proc/{child.pid}/stat"]
    assert [p for p in opened if p.startswith(f"/proc/{child.pid}/task/")]  # the walk went on into the child
    assert cputime._STAT_FILES._fds.get(child.pid) is not None
    child.kill()
    child.wait()
    assert tree.seconds() is not None
    assert child.pid not in cputime._STAT_FILES._fds  # a descendant gone from the tree: its file is closed


def test_files_longer_than_a_page_are_read_whole(sleepers: list[subprocess.Popen[bytes]]) -> None:
    """One read of a seq_file returns at most a page: a children file of a process with hundreds of children (a
    ``multiprocessing`` pool on a big node, GNU parallel) is read to its end."""
    pid = _sleeper(sleepers).pid
    _wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_SLEEPING)  # started: its mappings are made
    smaps = f"/proc/{pid}/smaps"  # a sleeping process's: stable, and several pages long
    with open(smaps, "rb") as fh:
        whole = fh.read()
    assert len(whole) > 2 * 4096
    fd = os.open(smaps, os.O_RDONLY)
    try:
        assert procfs.read_all(fd) == whole
    finally:
        os.close(fd)
    # Enough children for more than a page of text whatever their pids: a user process's pid has at least three
    # digits (after a wrap the kernel starts again at 300), four characters with the separator. On a machine
    # booted minutes ago pids have four digits, and 700 children were only 3,500 characters.
    count = 1100
    parent = subprocess.Popen(["bash", "-c", f"for i in $(seq {count}); do sleep 60 & done; echo started; wait"],
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == b"started"
        kids = procfs.child_pids(parent.pid)
        assert kids is not None and len(kids) == count and len(set(kids)) == count
        assert sum(len(str(k)) + 1 for k in kids) > 4096  # more than a page of text
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_an_os_thread_is_read_once_however_many_thread_objects_name_it(
        sleepers: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Green threads (gevent, eventlet) are ``threading.Thread`` objects that share the main thread's OS thread: its
    children must be listed once, not once per object (their CPU time would be counted as many times)."""
    child = _sleeper(sleepers)
    greens = []
    for i in range(5):
        green = threading.Thread(name=f"green-{i}")
        green._native_id = threading.main_thread().native_id  # type: ignore[attr-defined]
        greens.append(green)
    real = threading.enumerate
    monkeypatch.setattr(procfs.threading, "enumerate", lambda: [*real(), *greens])
    reader = ChildrenReader(os.getpid())
    try:
        for _ in range(2):
            listed = reader.children()
            assert listed is not None and listed.count(child.pid) == 1
        assert len({tid for tid in reader._fds}) == len(reader._fds)  # one file per OS thread
    finally:
        reader.close()
    tree = ProcessTree(os.getpid(), include_children=True)
    assert tree.descendants().count(child.pid) == 1


def test_kept_files_are_bounded_by_the_open_file_limit(sleepers: list[subprocess.Popen[bytes]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with many threads, or a low open-file limit: past the budget a look opens, reads and closes, and every
    child is still listed."""
    monkeypatch.setattr(resource, "getrlimit", lambda which: (128, 4096))
    assert procfs.kept_files_budget(128) == 4 and StatFiles().kept == 4
    reader = ChildrenReader(os.getpid(), kept=2)
    assert reader.kept == 2
    done = threading.Event()
    started: list[subprocess.Popen[bytes]] = []
    threads = []

    def body() -> None:
        started.append(subprocess.Popen(["sleep", "30"]))
        done.wait(30)

    try:
        for i in range(4):
            thread = threading.Thread(target=body, name=f"worker-{i}", daemon=True)
            thread.start()
            threads.append(thread)
        _wait_for(lambda: len(started) == 4)
        sleepers.extend(started)
        for _ in range(2):
            listed = reader.children()
            assert listed is not None and {p.pid for p in started} <= set(listed)
            assert len(reader._fds) == 2
    finally:
        done.set()
        for thread in threads:
            thread.join()
        reader.close()
