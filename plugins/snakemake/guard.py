"""Hold Snakemake's deletion of ``temp()`` files until the Recorder has hashed them.

Snakemake deletes a temporary file on its main thread right after logging ``Removing temporary output <path>.``,
while logger plugins see records later, on the queue-listener thread, and the Recorder hashes on its writer thread
later still. Without help the file can be gone before anyone hashed it (the first jobs of a run, while the store is
being opened, lose that race).

:class:`TempFileGuard` is a ``logging.Filter`` on Snakemake's own logger, so it runs synchronously in whichever
thread logs. A :class:`RecordClock` (the filter before it) numbers every record; the handler reports each record
it has processed. On a "Removing temporary
output" record the guard waits until the handler has processed every earlier record (so every event naming the file
was handed to the Recorder), then until the Recorder has written the last of those events (so the file was hashed;
later events are not waited for), then lets Snakemake go on. A file no event named is not waited for.

The wait is capped (``timeout`` seconds per file); after the cap has been hit ``MAX_TIMEOUTS`` times the guard stops
waiting for the rest of the run (at most ``MAX_TIMEOUTS * timeout`` seconds added to a run), and files deleted
before they were hashed are recorded without a hash (``hashError`` says why) rather than slowing Snakemake down.
The guard never drops or changes a record.

:class:`WorkdirStamp`, another filter on that logger, notes on the ``WORKFLOW_STARTED`` record the directory the
workflow really runs in (see there).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from metatrail.logsafe import log_once

TEMP_REMOVED = "Removing temporary output "
SEQ_ATTRIBUTE = "metatrail_seq"
WORKDIR_ATTRIBUTE = "metatrail_workdir"
MAX_TIMEOUTS = 3


class RecordClock(logging.Filter):
    """Numbers every record Snakemake logs (a ``logging.Filter`` on its logger, so in the logging thread) and
    learns from the handler which of them it has processed (on the listener thread): :meth:`position` then says
    whether every record logged before some moment has reached the tracker. Installed when the handler is built,
    before Snakemake logs its first job; it only counts."""

    def __init__(self) -> None:
        super().__init__()
        self.cv = threading.Condition()
        self.logged = 0
        self.processed_seq = 0
        self.listener_thread: int | None = None
        # Threads waiting on ``cv`` for ``processed_seq`` (the temp-file guard); counted under ``cv`` before they
        # look at ``processed_seq``, so that ``processed`` takes the lock and notifies only when someone waits.
        self.waiters = 0
        # Set to end the handler's rest on the listener thread (see handler.LISTENER_REST_S) when a thread waits
        self.wake = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        """Number the record. Always True."""
        with self.cv:
            self.logged += 1
            seq = self.logged
        setattr(record, SEQ_ATTRIBUTE, seq)
        return True

    def processed(self, record: logging.LogRecord) -> None:
        """Called by the handler (on the listener thread) after it handled ``record``.

        Lock-free unless a thread waits: only the listener thread writes ``processed_seq`` (an int, assigned whole),
        and it reads ``waiters`` after that write, while a waiter counts itself before it reads ``processed_seq``;
        so a waiter either sees the new number or is seen and notified."""
        seq = getattr(record, SEQ_ATTRIBUTE, None)
        self.listener_thread = threading.get_ident()
        if isinstance(seq, int) and seq > self.processed_seq:
            self.processed_seq = seq
            if self.waiters:
                with self.cv:
                    self.cv.notify_all()

    def position(self) -> tuple[int, int]:
        """``(logged, processed)``: the number of the last record logged and of the last one the handler is done
        with (records are processed in order)."""
        with self.cv:
            return self.logged, self.processed_seq


class WorkdirStamp(logging.Filter):
    """Stamps the ``WORKFLOW_STARTED`` record with the process's working directory as Snakemake logs it.

    The record's own ``cwd`` is the directory Snakemake started in (``workflow.workdir_init``), taken before the
    Snakefile's ``workdir:`` directive changed into another; every relative path of the run is relative to the
    directory in force once the workflow has started, and only Snakemake's logging thread can read it at that
    moment (the handler sees the record later, on another thread). Installed with the :class:`RecordClock`; it only
    adds an attribute."""

    def __init__(self) -> None:
        super().__init__()
        # event -> whether it is WORKFLOW_STARTED: this runs on Snakemake's own thread for every record it logs, and
        # an enum's ``value`` is a property
        self._is_start: dict[Any, bool] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp a ``WORKFLOW_STARTED`` record. Always True."""
        try:
            event = getattr(record, "event", None)
            if event is not None and self._starts_workflow(event):
                setattr(record, WORKDIR_ATTRIBUTE, os.getcwd())
        except Exception as exc:  # never between Snakemake and its logger; the tracker reads the directory itself
            log_once(f"snakemake-workdir:{type(exc).__name__}", "metatrail: cannot note the workflow's directory "
                     "(%s: %s)", type(exc).__name__, exc)
        return True

    def _starts_workflow(self, event: Any) -> bool:
        try:
            return self._is_start[event]
        except KeyError:
            starts = str(getattr(event, "value", event)).lower() == "workflow_started"
            if len(self._is_start) < 256:  # Snakemake has ~20 events; ever new event objects do not grow this
                self._is_start[event] = starts
            return starts
        except TypeError:  # an unhashable event: never remembered
            return str(getattr(event, "value", event)).lower() == "workflow_started"


class TempFileGuard(logging.Filter):
    """See the module docstring. ``wait_hashed(message, deadline)`` waits (until the ``time.monotonic`` deadline)
    for the Recorder to have hashed the file a "Removing temporary output" message names; False on timeout.
    Records are numbered by ``clock``, a filter installed before this one."""

    def __init__(self, clock: RecordClock, wait_hashed: Callable[[str, float], bool], timeout: float) -> None:
        super().__init__()
        self._clock = clock
        self._wait_hashed = wait_hashed
        self._timeout = timeout
        self.gave_up = False
        self.waits = 0
        self.timeouts = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Before a temp file is removed, wait (capped) until it was hashed. Always True."""
        try:
            seq = getattr(record, SEQ_ATTRIBUTE, None)
            msg = record.msg
            if (isinstance(seq, int) and isinstance(msg, str) and msg.startswith(TEMP_REMOVED) and not self.gave_up
                    and threading.get_ident() != self._clock.listener_thread):
                self._hold(seq, msg)
        except Exception as exc:  # the guard must never stand between Snakemake and its logger
            log_once(f"snakemake-guard:{type(exc).__name__}", "metatrail: temp-file guard failed (%s: %s)",
                     type(exc).__name__, exc)
        return True

    def release(self) -> None:
        """Stop waiting, now and for good (the handler is closing)."""
        with self._clock.cv:
            self.gave_up = True
            self._clock.cv.notify_all()

    def _hold(self, seq: int, message: str) -> None:
        deadline = time.monotonic() + self._timeout
        self.waits += 1
        clock = self._clock
        with clock.cv:
            clock.waiters += 1  # before reading processed_seq: see RecordClock.processed
            clock.wake.set()
            try:
                while clock.processed_seq < seq - 1 and not self.gave_up:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._timed_out()
                        return
                    clock.cv.wait(remaining)
            finally:
                clock.waiters -= 1
        if not self.gave_up and not self._wait_hashed(message, deadline):
            self._timed_out()

    def _timed_out(self) -> None:
        self.timeouts += 1
        if self.timeouts >= MAX_TIMEOUTS:
            self.gave_up = True
        log_once("snakemake-guard-timeout",
                 "metatrail: the store is not keeping up (%.1fs cap); temporary files of this run may be recorded "
                 "without a hash", self._timeout)
