"""Test helper for fork safety: hold locks on another thread while this one forks, and run a check in a forked
child that an alarm ends if it hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def held_by_another_thread(*locks: Any) -> Iterator[None]:
    """Hold ``locks`` (anything ``with`` takes) on another thread for as long as the block runs."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10), "the holder thread could not take the locks"
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def in_forked_child(check: Callable[[], bool]) -> bool:
    """Run ``check`` in a forked child (ended by an alarm after 10 s if it hangs); whether it returned True."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+ warns of forking with threads running
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            signal.alarm(10)
            os.write(write_end, b"ok" if check() else b"bad")
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    answer = os.read(read_end, 16)
    os.close(read_end)
    return os.waitstatus_to_exitcode(status) == 0 and answer == b"ok"
