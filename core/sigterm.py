"""SIGTERM in a child process of ``multiprocessing``: store what was recorded, then end as SIGTERM ends it.

``multiprocessing.Pool`` ends its workers with SIGTERM when it is left as a context manager (and on ``terminate()``);
so do ``Process.terminate()`` and process-pool executors that shut down. The default action ends the process at once,
and the events its last tasks recorded, still queued for the Recorder's writer, were lost. When a Recorder first
records in such a child whose SIGTERM action is still the default, on its main thread (only it may set a handler),
:class:`FlushOnSigterm` sets a handler: it waits at most :data:`SIGTERM_FLUSH_S` for the writer, then restores the
default action and sends the signal again, so the process ends killed by SIGTERM, as it would have. A process with a
SIGTERM handler of its own keeps it, and processes other than multiprocessing children are left alone (a program's
own way of ending on SIGTERM is its business; a framework that chains to a previous handler must not find one that
ends the process).

A handler written in Python runs on the main thread, between two of its bytecodes. A main thread that runs none (C
code that lets go of the GIL: a numerical library, a database driver's wait) does not run it until that code
returns; neither does one that the signal reached just before it began to wait for a lock (the wait then never
ends), or one the kernel passed over for another thread. The default action ends the process in each of these
cases; with only the handler, the process went on for as long as the C code ran, or for ever, and a pool's
``terminate()`` waited on it (seen with a pool's worker waiting for its next task). So a watch thread takes the
signal too: the handler's wake-up file descriptor (:func:`signal.set_wakeup_fd`), which Python writes from whichever
thread the signal reached, tells it; when the main thread has not begun the handler within
:data:`MAIN_THREAD_GRACE_S`, the watch thread stores what is pending and ends the process as SIGTERM does, from its
own thread (through the C library's ``signal()``; where that cannot be reached, with SIGKILL). C code that keeps the
GIL holds up every Python thread, this one too: the handler runs when it returns. A program that has a wake-up
descriptor of its own (an asyncio loop) keeps it, and only the handler acts there; one that sets a SIGTERM handler of
its own later keeps that too (the watch thread then leaves SIGTERM alone). A forked child leaves its parent's
descriptor at once, SIGTERM blocked in the forking thread until it has, so that a signal to the child never ends the
parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from metatrail import forkwaits
from metatrail.logsafe import log_once

SIGTERM_FLUSH_S = 2.0  # the longest a multiprocessing child's death by SIGTERM waits for its pending events
MAIN_THREAD_GRACE_S = 0.2  # how long the watch thread leaves SIGTERM to the main thread's handler


class Drainable(Protocol):
    """What the handler waits for: a Recorder (its ``_drain_before_death``, callable from any thread)."""

    def _drain_before_death(self, deadline: float) -> None: ...


class FlushOnSigterm:
    """See the module docstring. One per process (:data:`flush_on_sigterm`); :meth:`arm` is called by each Recorder
    as its writer starts."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._recorders: weakref.WeakSet[Drainable] = weakref.WeakSet()
        self._main_started = threading.Event()
        self._deadline_lock = threading.RLock()  # RLock: a second SIGTERM may interrupt the handler holding it
        self._deadline: float | None = None
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) of the wake-up pipe, set in this process
        self._default_action: Callable[[], None] | None = None
        self._fork_mask: Any = None  # the forking thread's signal mask, while a fork is under way

    def arm(self, recorder: Drainable) -> None:
        """Have ``recorder`` drained before this process dies of SIGTERM, when this process may handle it."""
        try:
            pid = os.getpid()
            if self._pid != pid:
                self._pid = pid
                self._recorders = weakref.WeakSet()
                self._main_started = threading.Event()
                self._deadline = None
                # A child of a child inherits the handler set in its parent: it is this process's now too.
                if signal.getsignal(signal.SIGTERM) != self._on_sigterm:
                    if not self._may_handle():
                        return
                    signal.signal(signal.SIGTERM, self._on_sigterm)
                self._watch()
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                self._recorders.add(recorder)
        except Exception as exc:  # never the host's problem
            log_once("sigterm-arm", "metatrail: could not arrange to store events at SIGTERM (%s)", exc)

    @staticmethod
    def _may_handle() -> bool:
        process = sys.modules.get("multiprocessing.process")
        return (process is not None and process.parent_process() is not None
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)

    # -- the handler, on the main thread -------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, _frame: Any) -> None:
        self._main_started.set()
        self._end()

    # -- the watch thread ----------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Become the handler's wake-up descriptor and start the watch thread; nothing when the program has a
        wake-up descriptor of its own, or this is not the main thread (only it may set one)."""
        if threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(write_fd, False)  # Python requires it: a full pipe must never block the signal
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except Exception:  # no wake-up descriptor here (a platform without it): the handler alone
            os.close(read_fd)
            os.close(write_fd)
            return
        if previous != -1:
            signal.set_wakeup_fd(previous)  # the program's own: it keeps it
            os.close(read_fd)
            os.close(write_fd)
            return
        self._wakeup = (read_fd, write_fd)
        threading.Thread(target=self._watch_wakeups, args=(read_fd, os.getpid()), name="metatrail-sigterm-watch",
                         daemon=True).start()

    def _watch_wakeups(self, read_fd: int, pid: int) -> None:
        try:
            # Ready before the signal comes: at its end a main thread stuck in an import must not hold this one.
            with forkwaits.IMPORTS.held():
                self._default_action = _default_action_setter(signal.SIGTERM)
            while True:
                data = os.read(read_fd, 64)  # a byte per signal, its number
                if not data or os.getpid() != pid:
                    return
                # Python writes the byte whichever handler is set: one the program set since is the program's
                # business, and SIGTERM is left to it.
                if int(signal.SIGTERM) in data and self._ours():
                    break
            if not self._main_started.wait(MAIN_THREAD_GRACE_S) and self._ours():
                self._end()
        except Exception as exc:  # the handler still does its part
            log_once("sigterm-watch", "metatrail: the SIGTERM watch thread stopped (%s: %s)", type(exc).__name__, exc)

    def _ours(self) -> bool:
        return bool(signal.getsignal(signal.SIGTERM) == self._on_sigterm)

    # -- fork: a child must never signal through its parent's descriptor -----------------------------------------
    # The child shares the parent's wake-up descriptor until after_fork_in_child drops it; a SIGTERM that reached it
    # in between would wake the parent's watch thread, which would end the parent. So SIGTERM is blocked in the
    # forking thread across the fork: the child receives it once the descriptor is dropped, the parent right after.
    def before_fork(self) -> None:
        self._fork_mask = None
        if self._wakeup is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._fork_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def after_fork_in_parent(self) -> None:
        self._restore_fork_mask()

    def after_fork_in_child(self) -> None:
        """Leave the parent's wake-up descriptor: the child's signals must not reach the parent's watch thread."""
        wakeup, self._wakeup = self._wakeup, None
        try:
            if wakeup is None:
                return
            with contextlib.suppress(ValueError, OSError):
                previous = signal.set_wakeup_fd(-1)
                if previous not in (-1, wakeup[1]):
                    signal.set_wakeup_fd(previous)  # set by the program since: its own
            for fd in wakeup:
                with contextlib.suppress(OSError):
                    os.close(fd)
        finally:
            self._restore_fork_mask()

    def _restore_fork_mask(self) -> None:
        mask, self._fork_mask = self._fork_mask, None
        if mask is not None:
            with contextlib.suppress(Exception):
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    # -- the end, from either thread -----------------------------------------------------------------------------
    def _end(self) -> None:
        """Wait (bounded) for the armed Recorders, then end the process as SIGTERM's default action does."""
        try:
            with self._deadline_lock:
                if self._deadline is None:
                    self._deadline = time.monotonic() + SIGTERM_FLUSH_S
                deadline = self._deadline
            for recorder in list(self._recorders):
                recorder._drain_before_death(deadline)
        except BaseException:
            pass  # the process ends next, whatever happened here
        finally:
            self._die()

    def _die(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        with contextlib.suppress(Exception):
            if self._default_action is not None:
                self._default_action()
                with contextlib.suppress(Exception):
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)  # the signal ends every thread of the process, this one too
        os.kill(os.getpid(), signal.SIGKILL)  # the action could not be reset: end all the same


def _default_action_setter(signum: int) -> Callable[[], None] | None:
    """A function that restores ``signum``'s default action from any thread, through the C library (Python's
    :func:`signal.signal` works on the main thread only); None where the C library cannot be reached."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        set_action = libc.signal
        set_action.argtypes = [ctypes.c_int, ctypes.c_void_p]
        set_action.restype = ctypes.c_void_p
    except (ImportError, OSError, AttributeError):
        return None

    def restore() -> None:
        set_action(signum, None)  # NULL is SIG_DFL

    return restore


flush_on_sigterm = FlushOnSigterm()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=flush_on_sigterm.before_fork, after_in_parent=flush_on_sigterm.after_fork_in_parent,
                        after_in_child=flush_on_sigterm.after_fork_in_child)
