"""Locks of metatrail's that a host thread may hold at the moment another thread forks (a multiprocessing pool
started while a task records): the forked child must not inherit them locked, or its first hook waits for ever."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import pytest
from forkkit import held_by_another_thread, in_forked_child

import metatrail.energy as energy
import metatrail.logsafe as logsafe
from metatrail.boundedcall import BoundedCaller


@pytest.mark.parametrize("which", ["log_once", "energy monitor", "bounded caller"])
def test_a_child_forked_while_a_thread_holds_a_lock_of_ours_is_not_stuck_on_it(which: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METATRAIL_ENERGY", "0")  # the monitor's creation is what takes the lock; no meter is needed
    check: Callable[[], bool]
    if which == "log_once":
        lock = logsafe._lock
        check = lambda: logsafe.log_once(f"fork-lock-test-{time.time()}", "a message only the child logs")  # noqa: E731
    elif which == "energy monitor":
        lock = energy._lock
        energy.reset_monitor()  # the child creates its monitor: the step that takes the lock
        check = lambda: energy.get_monitor() is not None  # noqa: E731
    else:
        caller = BoundedCaller("fork-lock-test")
        assert caller.call("warm-up", lambda: None, 5)
        lock = caller._lock
        check = lambda: caller.call("in the child", lambda: None, 5)  # noqa: E731
    sys.stdout.flush()
    sys.stderr.flush()
    with held_by_another_thread(lock):
        assert in_forked_child(check)  # the child's call returns (an alarm ends a child stuck on the lock)


def test_forks_wait_once_for_a_piece_of_work_that_holds_a_fork_lock_too_long() -> None:
    """``os.fork`` waits a bounded time for metatrail's work in progress (a store transaction, first imports): a
    host starting a pool of workers while the store is locked by another process waited that time once per fork.
    The first fork now waits its time; later ones, while the same work still holds the lock, go ahead; a new piece
    of work is waited for again."""
    from metatrail.forkwaits import ForkWaits

    waits = ForkWaits(wait_s=2.0)

    def fork_and_reap() -> float:
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        elapsed = time.monotonic() - start
        os.waitpid(pid, 0)
        return elapsed

    with held_by_another_thread(waits.held()):
        first = fork_and_reap()
        later = [fork_and_reap() for _ in range(3)]
    assert first >= 2.0  # waited its bound for the work in progress
    assert all(t < 1.0 for t in later), later  # the same work: not waited for again (the previous code: 2 s each)
    with held_by_another_thread(waits.held()):
        assert fork_and_reap() >= 2.0  # a new piece of work is waited for again
