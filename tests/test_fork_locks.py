"""Locks of metatrail's that a host thread may hold at the moment another thread forks (a multiprocessing pool
started while a task records): the forked child must not inherit them locked, or its first hook waits for ever."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import metatrail.energy as energy
import metatrail.logsafe as logsafe
from metatrail.boundedcall import BoundedCaller


def _in_forked_child_while_held(lock: Any, child_work: Callable[[], object]) -> int:
    """Fork while another thread holds ``lock``; the child runs ``child_work`` (killed by SIGALRM after 10 s if it
    hangs); return the child's wait status."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: only this thread exists here
            signal.alarm(10)
            code = 1
            try:
                child_work()
                code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        thread.join(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("which", ["log_once", "energy monitor", "bounded caller"])
def test_a_child_forked_while_a_thread_holds_a_lock_of_ours_is_not_stuck_on_it(which: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_ENERGY", "0")  # the monitor's creation is what takes the lock; no meter is needed
    work: Callable[[], object]
    if which == "log_once":
        lock = logsafe._lock
        work = lambda: logsafe.log_once(f"fork-lock-test-{time.time()}", "a message only the child logs")  # noqa: E731
    elif which == "energy monitor":
        lock = energy._lock
        energy.reset_monitor()  # the child creates its monitor: the step that takes the lock
        work = energy.get_monitor
    else:
        caller = BoundedCaller("fork-lock-test")
        assert caller.call("warm-up", lambda: None, 5)
        lock = caller._lock
        work = lambda: caller.call("in the child", lambda: None, 5)  # noqa: E731
    sys.stdout.flush()
    sys.stderr.flush()
    status = _in_forked_child_while_held(lock, work)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        f"child {f'killed by signal {os.WTERMSIG(status)}' if os.WIFSIGNALED(status) else 'failed'}")


def test_forks_wait_once_for_a_piece_of_work_that_holds_a_fork_lock_too_long() -> None:
    """``os.fork`` waits a bounded time for metatrail's work in progress (a store transaction, first imports): a
    host starting a pool of workers while the store is locked by another process waited that time once per fork.
    The first fork now waits its time; later ones, while the same work still holds the lock, go ahead; a new piece
    of work is waited for again."""
    from metatrail.forkwaits import ForkWaits

    waits = ForkWaits(wait_s=2.0)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with waits.held():
            held.set()
            release.wait(60)

    def fork_and_reap() -> float:
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        elapsed = time.monotonic() - start
        os.waitpid(pid, 0)
        return elapsed

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(10)
    try:
        first = fork_and_reap()
        later = [fork_and_reap() for _ in range(3)]
    finally:
        release.set()
        thread.join(10)
    assert first >= 2.0  # waited its bound for the work in progress
    assert all(t < 1.0 for t in later), later  # the same work: not waited for again (the previous code: 2 s each)
    held.clear()
    release.clear()
    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(10)
    try:
        assert fork_and_reap() >= 2.0  # a new piece of work is waited for again
    finally:
        release.set()
        thread.join(10)
