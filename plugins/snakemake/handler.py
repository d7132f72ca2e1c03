"""The Snakemake logger plugin: a ``logging.Handler`` that Snakemake runs in its controller, on the thread of its
log queue listener, and that hands every record to a :class:`~metatrail.plugins.snakemake.tracker.WorkflowTracker`.

Boundary rules (the host is never disturbed):

* nothing happens at construction but installing two filters, a :class:`~metatrail.plugins.snakemake.guard.RecordClock`
  that numbers records and a :class:`~metatrail.plugins.snakemake.guard.WorkdirStamp` that notes the run's directory
  (Snakemake 9.0 builds handlers even in job subprocesses, which never use them); the Recorder is created at the
  first record, and a configuration error disables the plugin with one message;
* ``emit`` never raises: an error is logged once per kind on the ``metatrail`` logger (not Snakemake's, whose records
  would come back here) and the record is dropped;
* ``emit`` only enqueues: hashing and store writes run on the Recorder's writer thread (in batches, see
  :data:`WRITE_LINGER_S`); records the tracker does not use (:func:`~metatrail.plugins.snakemake.tracker.
  record_matters`) only have their time noted; once Snakemake's listener has delivered every queued record,
  ``emit`` rests a moment (:data:`LISTENER_REST_S`) rather than have the listener woken for every record;
* dry runs record nothing, and ``METATRAIL_DISABLED=1`` makes every record return at once, without I/O;
* ``close`` (Snakemake calls it twice) ends the pipeline run once and waits at most ``flush_timeout`` seconds for
  pending records to be stored;
* the one synchronous piece, :class:`~metatrail.plugins.snakemake.guard.TempFileGuard`, delays the deletion of a
  ``temp()`` file until it is hashed, at most ``timeout`` seconds a file (see there).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from snakemake_interface_logger_plugins.base import LogHandlerBase

from metatrail.config import Settings, is_disabled
from metatrail.logsafe import log_once
from metatrail.plugins.snakemake import compat
from metatrail.plugins.snakemake.guard import RecordClock, TempFileGuard, WorkdirStamp
from metatrail.plugins.snakemake.tracker import DEFAULT_NAMESPACE, WorkflowTracker, record_matters

# How long the Recorder's writer waits for more events before it stores a batch. Snakemake ends a few dozen jobs a
# second at most, so with the Recorder's default (5 ms) nearly every batch held one event, and each batch costs a
# hand-off to the writer process, a pickle each way, an acknowledgement and a store transaction: most of the
# recording's CPU time. Nothing waits for the linger: ``close`` flushes, and the temp-file guard flushes when it
# must wait (a run killed with SIGKILL loses at most this much more of its last events).
WRITE_LINGER_S = 0.5

# How long Snakemake's log-listener thread rests in ``emit`` once it has delivered every queued record, before it
# goes back to wait on the queue. While the listener waits there, every record Snakemake puts (~6 a job) wakes it,
# and each wake-up costs the listener a condition wait and a GIL hand-back; resting instead, it finds the records of
# a few jobs queued and delivers them in one go. Measured (600 no-op jobs, --cores 2, 3 runs each, rest 0 against
# 20 ms): the listener's CPU time per job 0.79 -> 0.63 ms; Snakemake's main thread no change beyond the noise.
# Only while this handler is the listener's only handler (other plugins' output is never delayed); a record is at
# most this much later in the store; the temp-file guard and ``close`` end the rest at once.
LISTENER_REST_S = 0.02


class LogHandler(LogHandlerBase):
    """Records a Snakemake run with metatrail (enable with ``--logger metatrail``)."""

    def __init__(self, common_settings: Any, settings: Any = None, *, recorder: Any = None) -> None:
        # ``recorder`` lets an embedding program (or a test) supply its own Recorder; Snakemake never passes one.
        self._given_recorder = recorder
        super().__init__(common_settings, settings)

    def __post_init__(self) -> None:
        if not hasattr(self, "filters"):
            # snakemake-interface-logger-plugins < 2 does not initialise logging.Handler itself.
            logging.Handler.__init__(self)
        self._state_lock = threading.Lock()
        self._tracker: WorkflowTracker | None = None
        self._recorder: Any = None
        self._guard: TempFileGuard | None = None
        self._guard_tried = False
        self._closed = False
        self._inert = bool(getattr(self.common_settings, "dryrun", False))
        self._rest_thread: int | None = None  # the thread _rest_queue was looked up for
        self._rest_queue: Any = None
        # Numbering starts before the first job is logged: the job-process tracking and the temp-file guard need
        # to know which records logged so far the listener thread has not delivered yet.
        self._clock = RecordClock()
        self._clock_installed = False
        self._workdir_stamp = WorkdirStamp()
        logger = compat.snakemake_logger()
        if logger is not None and not self._inert:
            logger.addFilter(self._clock)
            logger.addFilter(self._workdir_stamp)
            self._clock_installed = True

    # -- capabilities Snakemake asks about ----------------------------------------------------------------------
    @property
    def writes_to_stream(self) -> bool:
        """Never: Snakemake keeps its own console output."""
        return False

    @property
    def writes_to_file(self) -> bool:
        """Never: records go to the metatrail store, not to a log file."""
        return False

    @property
    def has_filter(self) -> bool:
        """True, so that Snakemake's default filter (which drops records under ``--quiet``) is not attached."""
        return True

    @property
    def has_formatter(self) -> bool:
        """True: records are read as data and never formatted, so Snakemake need not attach a formatter."""
        return True

    @property
    def needs_rulegraph(self) -> bool:
        """False: the lineage comes from each job's files, not from the rule graph."""
        return False

    # -- logging.Handler ----------------------------------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        """Hand one record to the tracker; never raises, never blocks on I/O (it may rest, see
        :data:`LISTENER_REST_S`)."""
        try:
            matters = record_matters(record)
        except Exception:  # a record too odd to classify: the full path below copes with it (and says so once)
            matters = True
        if matters:
            self._handle(record)
        else:
            # Most records (progress, shell commands, most messages) need only their time noted; this runs on the
            # thread that delivers every record of the run to every plugin, so nothing more is done for them.
            tracker = self._tracker
            if tracker is not None and not self._closed:
                tracker.saw(record)
            self._clock.processed(record)
        self._rest()

    def _rest(self) -> None:
        """Rest on Snakemake's listener thread once it has delivered every record (see :data:`LISTENER_REST_S`)."""
        try:
            ident = threading.get_ident()
            if self._rest_thread != ident:
                self._rest_thread = ident
                self._rest_queue = compat.listener_queue(self)
            queue = self._rest_queue
            if queue is None or self._inert or self._closed or self._clock.waiters or not queue.empty() \
                    or is_disabled():
                return
            wake = self._clock.wake
            wake.wait(LISTENER_REST_S)
            wake.clear()
        except Exception as exc:  # never in the way: the listener simply does not rest
            self._rest_queue = None
            log_once(f"snakemake-rest:{type(exc).__name__}", "metatrail: Snakemake's log listener will not rest "
                     "between records (%s: %s); the workflow is not affected", type(exc).__name__, exc)

    def _handle(self, record: logging.LogRecord) -> None:
        if self._inert or self._closed or is_disabled():
            if self._guard is not None:
                self._guard.release()
            return
        try:
            tracker = self._tracker if self._tracker is not None else self._make_tracker()
            tracker.handle(record)
            if not self._guard_tried and self._recorder is not None:
                self._guard_tried = True
                self._install_guard()
        except Exception as exc:
            log_once(f"snakemake-emit:{type(exc).__name__}",
                     "metatrail: could not record a Snakemake event (%s: %s); the workflow is not affected",
                     type(exc).__name__, exc, exc_info=True)
        finally:
            self._clock.processed(record)

    def flush(self) -> None:
        """Nothing to flush on Snakemake's thread: records are stored by the Recorder's writer thread."""

    def close(self) -> None:
        """End the pipeline run and wait (bounded) for pending records; safe to call any number of times."""
        with self._state_lock:
            first = not self._closed
            self._closed = True
        if first:
            self._clock.wake.set()  # a listener resting in emit delivers what is left at once
            if self._guard is not None:
                self._guard.release()
            logger = compat.snakemake_logger()
            if logger is not None:
                if self._guard is not None:
                    logger.removeFilter(self._guard)
                logger.removeFilter(self._clock)
                logger.removeFilter(self._workdir_stamp)
        if first and self._tracker is not None and not is_disabled():
            try:
                self._tracker.finish()
                if self._recorder is not None:
                    self._recorder.close(self._recorder.settings.flush_timeout)
            except Exception as exc:
                log_once(f"snakemake-close:{type(exc).__name__}",
                         "metatrail: could not finish recording the Snakemake run (%s: %s)",
                         type(exc).__name__, exc, exc_info=True)
        super().close()

    # -- lazy set-up --------------------------------------------------------------------------------------------
    def _make_tracker(self) -> WorkflowTracker:
        options = self.settings
        quiet = getattr(self.common_settings, "quiet", None)
        self._tracker = WorkflowTracker(
            self._make_recorder,
            pipeline=getattr(options, "pipeline", None),
            namespace=getattr(options, "namespace", None),
            default_namespace=_default_namespace,
            progress_may_be_hidden=bool(quiet),
            record_clock=self._clock.position if self._clock_installed else None,
        )
        return self._tracker

    def _install_guard(self) -> None:
        logger = compat.snakemake_logger()
        if logger is None:
            return
        if self._tracker is None:
            return
        self._guard = TempFileGuard(self._clock, self._tracker.wait_hashed, self._recorder.settings.timeout)
        logger.addFilter(self._guard)

    def _make_recorder(self) -> Any:
        if self._given_recorder is not None:
            self._recorder = self._given_recorder
            return self._recorder
        from metatrail.config import load_settings
        from metatrail.errors import MetatrailError
        from metatrail.recorder import Recorder

        options = self.settings
        overrides = {name: getattr(options, name, None) for name in ("store", "flush_timeout")}
        try:
            settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
        except MetatrailError as exc:
            log_once("snakemake-config", "metatrail: recording is off for this Snakemake run: %s", exc)
            self._inert = True
            return None
        self._recorder = Recorder(settings=settings, linger_s=WRITE_LINGER_S)
        return self._recorder


def _default_namespace(recorder: Any) -> str:
    """``METATRAIL_NAMESPACE`` (or the config file's) when set, else ``snakemake``."""
    configured = recorder.settings.namespace
    return configured if configured and configured != Settings.namespace else DEFAULT_NAMESPACE
