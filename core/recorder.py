"""The Recorder: the one API every plugin calls.

Guarantees (tests hold us to each):

* **Never raises into the caller.** Every public method is a boundary: typed errors inside are caught, logged once per
  kind of problem, and the call returns normally (a handle that is still usable).
* **Bounded time per call.** The calling thread only captures what happened (ids, times, parameters, a clock and
  CPU-time reading for energy) and hands it to a writer thread; hashing, energy reports, event building and store
  writes run there. Waiting calls (``flush``) take a timeout, capped by the ``timeout`` setting unless given.
* **Kill switch.** With ``METATRAIL_DISABLED=1`` (checked on every call) methods return at once and do no I/O.
* **Durable, then async.** The writer thread stores events in the local store as soon as it gets them (batched in one
  transaction when several are waiting); at process exit pending events are flushed (``flush_timeout``). A host that
  ends its processes with ``os._exit`` must call :meth:`Recorder.flush` itself.
* **Out of the host's way.** The ``writer`` setting moves building and storing into a writer process
  (:mod:`metatrail.writerproc`; by default once a process has recorded many events), so that a busy host's GIL is
  not shared with this work; the thread then only hands batches over.
* **Thread- and process-safe.** Any number of threads may call one Recorder; after ``fork`` the child starts a fresh
  writer; many processes write one store (the store serialises them). A fork waits, a bounded time, while the
  writer thread imports its modules or is inside a store transaction: a child must not inherit either half done.

Large outputs never stretch a task's critical path: outputs are hashed on the writer thread, and the COMPLETE event
(carrying the task's real end time) is written once their hashes are known.
"""

from __future__ import annotations

import atexit

# Imported now, not when the writer thread first starts: importing it registers an exit hook with threading, which
# raises once the interpreter has begun shutting down, and a thread that Python waits for at exit may record its
# first event then. The writer's lazy imports (the store's) would import it too.
import concurrent.futures.thread  # noqa: F401
import contextlib
import json
import logging
import math
import os
import reprlib
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from metatrail import __version__, forkwaits
from metatrail.config import Settings, is_disabled, load_settings
from metatrail.errors import EventError
from metatrail.exithook import at_exit
from metatrail.logsafe import log, log_once
from metatrail.model import ArtifactRef, ErrorText, Execution, PipelineRun, Status, current_user, uuid7
from metatrail.ship import Shipper
from metatrail.sigterm import flush_on_sigterm

T = TypeVar("T")
S = TypeVar("S", Execution, PipelineRun)
PathLike: TypeAlias = str | os.PathLike[str] | ArtifactRef
StatKey: TypeAlias = tuple[int, int, int, int]  # (inode, size, mtime ns, ctime ns)
MAX_PENDING = 100_000
WRITE_BATCH = 64  # events per store transaction: small enough to hold the GIL only briefly
MAX_PARAM_TEXT = 2000
MAX_PARAM_JSON = 16_384  # larger values (whole datasets passed as arguments) are kept as a truncated repr
WRITE_LINGER_S = 0.005  # the writer waits this long for more events, to store them in one transaction
PROCESS_AFTER_EVENTS = 32  # writer "auto": a writer process once this process has recorded this many (16 tasks)


def safe_params(params: Mapping[str, Any] | None, warnings: list[str] | None = None) -> dict[str, Any]:
    """Parameters as JSON values, copied as they are now; a value that is not JSON (or too large) becomes a short
    description of it (its bounded ``repr``).

    This runs on the caller's thread, and the event is built later: the values are copied (through their JSON), so
    an argument the task changes in place is recorded as it was passed. Each value stored otherwise is named in
    ``warnings``; nothing raises, and the cost of a huge value is bounded (its size is looked at before anything is
    serialised).
    """
    if not params:
        return {}
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = _key_text(key)
        if value is None or isinstance(value, bool) or (isinstance(value, int) and -_BIG_INT < value < _BIG_INT) or \
                (isinstance(value, str) and len(value) <= MAX_PARAM_TEXT and _utf8_clean(value)):
            out[name] = value  # the common case, without serialising anything
            continue
        if isinstance(value, float) and math.isfinite(value):
            out[name] = value
            continue
        copied = _small_plain_copy(value)
        if copied is not None:
            out[name] = copied  # a few plain values (positional arguments, say): copied without serialising
            continue
        problem = "is not JSON-serialisable"
        if _surely_too_big(value):
            problem = f"is too large to store whole (JSON limit {MAX_PARAM_JSON:,} characters)"
        else:
            try:
                text = json.dumps(value, allow_nan=False, sort_keys=True, ensure_ascii=False)
                text.encode("utf-8")  # lone surrogates (undecodable file names) cannot be stored
                if len(text) <= MAX_PARAM_JSON:
                    out[name] = json.loads(text)
                    continue
                problem = f"is {len(text):,} characters of JSON (limit {MAX_PARAM_JSON:,})"
            except (TypeError, ValueError, RecursionError, OverflowError):
                pass
        out[name] = _bounded_repr(value)
        if warnings is not None:
            warnings.append(f"parameter {name!r} ({type(value).__name__}) {problem}; stored as its repr")
        log_once(f"param:{type(value).__name__}", "metatrail: parameter %r of type %s stored as its repr",
                 name, type(value).__name__)
    return out


_BIG_INT = 1 << 63  # beyond this an integer goes through the JSON check (thousands of digits cannot be stored)
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_PARAM_TEXT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 50
_REPR.maxdict = 50
_REPR.maxlevel = 4


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind is int:
        return bool(-_BIG_INT < value < _BIG_INT)
    if kind is str:
        return len(value) <= 200 and _utf8_clean(value)
    if kind is float:
        return math.isfinite(value)
    return bool(value is None or kind is bool)


def _small_plain_copy(value: Any) -> list[Any] | dict[str, Any] | None:
    """A copy of a short list or tuple of plain values (None, bool, int, finite float, short text), or of a short
    dict of them under text keys; None for anything else (which goes through the JSON check)."""
    kind = type(value)
    if kind in (list, tuple) and len(value) <= 16 and all(_plain(v) for v in value):
        return list(value)
    if kind is dict and len(value) <= 16 and all(type(k) is str and _plain(v) for k, v in value.items()):
        return dict(value)
    return None


def _key_text(key: Any) -> str:
    """A parameter's name as text; a key whose ``str`` fails or is not storable text is described instead."""
    try:
        name = key if isinstance(key, str) else str(key)
    except Exception:
        return f"<{type(key).__name__} key>"
    return name if _utf8_clean(name) else name.encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8_clean(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (no lone surrogates, as undecodable file names carry)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surely_too_big(value: Any) -> bool:
    """Whether a value's JSON would certainly exceed the limit, judged by its length alone (a JSON array of n items
    takes at least 2n characters): whole datasets passed as arguments are not serialised to find out."""
    try:
        if isinstance(value, str | bytes | bytearray | memoryview):
            return len(value) > MAX_PARAM_JSON
        if isinstance(value, list | tuple | dict | set | frozenset):
            return len(value) * 2 > MAX_PARAM_JSON
    except Exception:
        return True
    return False


def _bounded_repr(value: Any) -> str:
    """A ``repr`` of bounded size and cost for builtin containers, strings and bytes (only their first items are
    looked at); other objects' own ``repr``, truncated. A broken ``repr`` is described, never raised."""
    try:
        if isinstance(value, bytes | bytearray | memoryview):
            head = bytes(value[:64])
            text = f"<{type(value).__name__} of {len(value):,} bytes: {head!r}{'…' if len(value) > 64 else ''}>"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"<int of {value.bit_length():,} bits>"
        else:
            text = _REPR.repr(value)
    except Exception as exc:  # a broken __repr__ must not break the host
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    if not _utf8_clean(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:MAX_PARAM_TEXT] + ("…" if len(text) > MAX_PARAM_TEXT else "")


class _EnergyOnce:
    """A stopped task's energy handle, reported once: the monitor answers a second ``task_report`` with None, and
    an item handed off (:meth:`Recorder.hand_off`) is built twice, by this process's writer and by the hand-off's
    writer process. Both must put the same report in the event, so that the two are one event, stored once (a
    second report of None made a second COMPLETE without energy)."""

    __slots__ = ("_done", "_lock", "_report", "stopped")

    def __init__(self, stopped: object) -> None:
        self.stopped = stopped
        self._lock = threading.Lock()
        self._done = False
        self._report: dict[str, Any] | None = None

    def report(self, make: Callable[[object], dict[str, Any] | None]) -> dict[str, Any] | None:
        """``make(stopped)`` the first time; the same report after (a second caller waits for the first)."""
        with self._lock:
            if not self._done:
                self._report = make(self.stopped)
                self._done = True
            return self._report


@dataclass
class _Item:
    """One unit of work for the writer thread."""

    kind: str  # pipeline_start | pipeline_end | exec_start | exec_end
    subject: Execution | PipelineRun
    at: float
    inputs: list[PathLike] = field(default_factory=list)
    outputs: list[PathLike] = field(default_factory=list)
    status: Status = Status.RUNNING
    error: BaseException | ErrorText | str | None = None
    exit_code: int | None = None
    energy: _EnergyOnce | None = None  # the energy monitor's task_stopped() result; reported on the writer thread
    warnings: list[str] = field(default_factory=list)
    energy_report: dict[str, Any] | None = None  # made before the item goes to a writer process
    pid: int | None = None  # the recording process, when the event is built in another
    input_refs: list[ArtifactRef] | None = None  # exec_end: its START's inputs as hashed, when built elsewhere
    # os.stat of each of ``inputs``/``outputs`` (local paths) when they were recorded, None for others and for paths
    # that did not exist: a path whose stat differs when it is hashed (later, on the writer) has changed since
    input_stats: list[StatKey | None] | None = None
    output_stats: list[StatKey | None] | None = None
    cwd: str | None = None  # the working directory relative paths were given in (None: none was relative)
    recorded_at: float = field(default_factory=time.time)  # when the caller recorded it (``at`` may be earlier)


class Recorder:
    """Records pipeline runs and executions as OpenLineage events into the local store (see module docstring)."""

    def __init__(self, settings: Settings | None = None, *, store: Any = None,
                 energy_monitor: Any = None, shipper: Any = None, linger_s: float | None = None) -> None:
        """``linger_s``: how long the writer waits for more events before it stores a batch (default
        :data:`WRITE_LINGER_S`); a host whose events come in a steady stream from one busy process (a Parsl worker)
        passes more, so that one transaction carries many events. ``flush`` and ``close`` never wait for it."""
        self._settings = settings
        self.linger_s = WRITE_LINGER_S if linger_s is None else linger_s
        self._store = store
        self._store_given = store is not None  # an injected store object cannot be handed to a writer process
        self._energy_monitor = energy_monitor
        self._process: Any = None  # the WriterProcess, once started
        self._process_refused = False
        # Reentrant for the SIGTERM handler (see _drain_before_death), which may interrupt the main thread inside it.
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._queue: deque[_Item] = deque()
        self._inflight: list[_Item] = []  # the batch the writer thread is building and storing
        self._submitted = 0
        self._done = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_seen = 0  # events submitted when close() began: it waited for these; the exit flush, the rest
        self._flushing = 0
        self._exit_seen: int | None = None  # events submitted when the first exit flush began
        self._exit_ok = True  # no exit flush has run out of time
        self._exit_hand_off_after: float | None = None  # see hand_off_at_exit
        self._hash_cache: Any = None
        self._input_refs: dict[str, list[ArtifactRef]] = {}
        self._commits: Any = None  # metatrail.codeversion.CommitCache, made by the writer
        self._host = socket.gethostname()
        self._user: str | bool | None = False
        self.dropped = 0
        self.failed_writes = 0
        self.written = 0
        self._store_failing = False  # the last write failed after its retries: the next gets one attempt
        self._close_waited: float | None = None  # a close() that ran out of time: how long it waited
        self._losses_told = 0  # dropped + failed_writes as of the last flush (flush says whether that grew)
        # The process-wide hooks below hold this Recorder weakly: a host that makes one per workflow (a Parsl DFK per
        # ``parsl.load``) must not keep every one alive, with its store and threads, for the life of the process.
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_weakly(self, Recorder._after_fork))
        # Flush when the main thread ends (metatrail.exithook), while the writer can still import what it needs.
        # Events reach a configured server (METATRAIL_SERVER) after the local store has them; created before the
        # exit hook below, so the shipper's own exit step runs after the Recorder's exit flush.
        self._shipper = shipper if shipper is not None else Shipper.lazy(_weak_settings(self))
        at_exit(_weakly(self, Recorder._at_exit))
        # And once more after the threads Python waits for at exit (non-daemon threads, thread pools) have ended:
        # the first flush runs before they are joined, and what they recorded afterwards would be lost with the
        # writer (a daemon thread) at finalisation.
        atexit.register(_weakly(self, Recorder._at_exit_late))

    # -- configuration (lazy) -----------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def _get_store(self) -> Any:
        if self._store is None:
            # Only ingest and close are used: an embedded store gets the writer that does not import SQLAlchemy.
            from metatrail.store.sqlite_writer import open_writer

            self._store = open_writer(self.settings.store)
        return self._store

    def _energy(self) -> Any:
        if self._energy_monitor is None:
            if not self.settings.energy:
                self._energy_monitor = _NoEnergy()
            else:
                try:
                    from metatrail.energy import get_monitor

                    self._energy_monitor = get_monitor()
                except Exception as exc:
                    log_once("energy-import", "metatrail: energy metering unavailable: %s", exc)
                    self._energy_monitor = _NoEnergy()
        return self._energy_monitor

    # -- the boundary -------------------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], T], fallback: T) -> T:
        try:
            return fn()
        except Exception as exc:
            log_once(f"{what}:{type(exc).__name__}", "metatrail: %s failed (%s: %s); the task is not affected",
                     what, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return fallback

    def _submit(self, item: _Item) -> None:
        with self._cv:
            if len(self._queue) >= MAX_PENDING:
                self.dropped += 1
                log_once("queue-full", "metatrail: %d events pending; dropping (counted in Recorder.dropped)",
                         MAX_PENDING)
                return
            self._queue.append(item)
            self._submitted += 1
            # The writer needs waking only from its idle wait (the queue was empty) or from its linger once a batch
            # is full; waking it for every event costs a GIL hand-over per event on the caller's thread.
            wake = len(self._queue) == 1 or len(self._queue) >= WRITE_BATCH
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._writer, name="metatrail-writer", daemon=True)
                self._thread.start()
                flush_on_sigterm.arm(self)
            if wake:
                self._cv.notify()

    # -- public API ---------------------------------------------------------------------------------------------
    def pipeline_run_started(self, pipeline: str, *, namespace: str | None = None, integration: str = "PYTHON",
                             run_id: str | None = None, params: Mapping[str, Any] | None = None,
                             integration_version: str | None = None, started_at: float | None = None,
                             extra: Mapping[str, Any] | None = None, pid: int | None = None) -> PipelineRun:
        """Record the start of a pipeline run (the parent of its executions); returns its handle. ``pid``: the
        process whose life bounds the run, when not this one (``metatrail pipeline start`` names the script that
        called it; :mod:`metatrail.abandoned` looks at it)."""
        at = started_at if started_at is not None else time.time()
        fallback = PipelineRun(id=run_id or _id_at(at), pipeline=pipeline, namespace=namespace or "default",
                               integration=integration, started_at=at)
        if is_disabled():
            return fallback

        def go() -> PipelineRun:
            warnings: list[str] = []
            run = PipelineRun(id=fallback.id, pipeline=pipeline, namespace=namespace or self.settings.namespace,
                              integration=integration, started_at=at, params=safe_params(params, warnings),
                              host_version=integration_version, extra=dict(extra or {}))
            self._submit(_Item("pipeline_start", _snapshot(run), at, warnings=warnings, pid=pid))
            return run

        return self._guard("pipeline_run_started", go, fallback)

    def pipeline_run_finished(self, run: PipelineRun, *, status: Status | str = Status.COMPLETED,
                              error: BaseException | ErrorText | str | None = None, ended_at: float | None = None,
                              extra: Mapping[str, Any] | None = None) -> None:
        """Record the end of a pipeline run (``status`` completed, failed or aborted); ``extra`` adds context
        only known at the end (a final state name, counts)."""
        if is_disabled():
            return
        at = ended_at if ended_at is not None else time.time()

        def go() -> None:
            if extra:
                run.extra.update(extra)
            self._submit(_Item("pipeline_end", _snapshot(run), at, status=Status(status), error=error))

        self._guard("pipeline_run_finished", go, None)

    def execution_started(self, pipeline: str, stage: str, *, pipeline_run: PipelineRun | None = None,
                          execution_id: str | None = None, inputs: Iterable[PathLike] = (),
                          params: Mapping[str, Any] | None = None, integration: str = "PYTHON",
                          namespace: str | None = None, started_at: float | None = None,
                          try_number: int | None = None, integration_version: str | None = None,
                          extra: Mapping[str, Any] | None = None, pid: int | None = None,
                          measure_energy: bool = True, energy_source: object = None) -> Execution:
        """Record the start of one execution (one try of a stage); returns its handle.

        ``inputs`` are local paths, remote URLs or pre-hashed :class:`ArtifactRef`; they are hashed off this thread.
        ``pid`` is the root of the process tree whose energy is attributed to the execution (default: this process);
        ``energy_source`` replaces it (host-fed processes or accounted energy, see ``metatrail.energy.interface``).
        """
        at = started_at if started_at is not None else time.time()
        ns = namespace or (pipeline_run.namespace if pipeline_run else None)
        handle = Execution(id=execution_id or _id_at(at), pipeline=pipeline, stage=stage, namespace=ns or "default",
                           integration=integration, pipeline_run_id=pipeline_run.id if pipeline_run else None,
                           started_at=at, try_number=try_number, host_version=integration_version)
        if is_disabled():
            return handle

        def go() -> Execution:
            warnings: list[str] = []
            if ns is None:
                handle.namespace = self.settings.namespace
            handle.params = safe_params(params, warnings)
            handle.extra = dict(extra or {})
            if warnings:
                handle.extra["_warnings"] = warnings
            if measure_energy:
                token = self._guard("energy start", lambda: self._energy().task_started(
                    handle.id, pid=pid or os.getpid(), include_children=True, source=energy_source), None)
                if token is not None:
                    handle.extra["_energy_token"] = token
            input_list, input_stats, cwd = _as_recorded(inputs)
            handle.inputs = [i.uri if isinstance(i, ArtifactRef) else os.fspath(i) for i in input_list]
            self._submit(_Item("exec_start", _snapshot(handle), at, inputs=input_list, warnings=warnings,
                               input_stats=input_stats, cwd=cwd))
            return handle

        return self._guard("execution_started", go, handle)

    def execution_finished(self, execution: Execution, *, outputs: Iterable[PathLike] = (),
                           inputs: Iterable[PathLike] = (), status: Status | str = Status.COMPLETED,
                           error: BaseException | ErrorText | str | None = None, ended_at: float | None = None,
                           exit_code: int | None = None, metrics: Mapping[str, Any] | None = None,
                           extra: Mapping[str, Any] | None = None) -> None:
        """Record the end of an execution: its outputs (hashed off this thread), status, error, exit code and
        result metrics (numbers; others are dropped with a warning in the record).

        ``inputs`` adds inputs only known at the end; those declared at start are kept. ``extra`` adds context only
        known at the end (a return value, a final state name).
        """
        if is_disabled():
            return
        at = ended_at if ended_at is not None else time.time()

        def go() -> None:
            if metrics:
                execution.metrics.update(metrics)
            if extra:
                execution.extra.update(extra)
            energy = None
            token = execution.extra.pop("_energy_token", None) if execution.extra else None
            if token is not None:
                stopped = self._guard("energy stop", lambda: self._energy().task_stopped(token), None)
                energy = _EnergyOnce(stopped) if stopped is not None else None
            input_list, input_stats, cwd = _as_recorded(inputs)
            output_list, output_stats, out_cwd = _as_recorded(outputs)
            self._submit(_Item("exec_end", _snapshot(execution), at, inputs=input_list, outputs=output_list,
                               status=Status(status), error=error, exit_code=exit_code, energy=energy,
                               input_stats=input_stats, output_stats=output_stats, cwd=cwd or out_cwd))

        self._guard("execution_finished", go, None)

    def execution_set_aside(self, execution: Execution) -> None:
        """This process records no end for ``execution`` (a deferred task, or a sensor rescheduled, resumes as a new
        pass with the same id, maybe in this very process): stop metering its energy. Records nothing; never
        raises."""
        token = execution.extra.pop("_energy_token", None) if execution.extra else None
        if token is not None:
            self._guard("energy stop", lambda: self._energy().task_stopped(token), None)

    def execution_failed(self, execution: Execution, *, error: BaseException | ErrorText | str | None,
                         outputs: Iterable[PathLike] = (), ended_at: float | None = None,
                         exit_code: int | None = None) -> None:
        """Record that an execution failed (shorthand for ``execution_finished(status=failed)``)."""
        self.execution_finished(execution, outputs=outputs, status=Status.FAILED, error=error, ended_at=ended_at,
                                exit_code=exit_code)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is stored; False if ``timeout`` (default: the ``timeout``
        setting) passed first, or if events recorded since the last flush were lost (the store refused them, or too
        many were pending: counted in ``failed_writes`` and ``dropped``). Never raises."""
        if is_disabled():
            return True
        stored = self._flush_wait(timeout)
        losses = self.dropped + self.failed_writes
        lost, self._losses_told = losses != self._losses_told, losses
        return stored and not lost

    def _flush_wait(self, timeout: float | None) -> bool:
        """Wait until everything submitted so far is done (stored or given up); False at the timeout."""
        try:
            limit = timeout if timeout is not None else self.settings.timeout
            deadline = time.monotonic() + limit
            with self._cv:
                target = self._submitted
                self._flushing += 1
                self._cv.notify_all()
            # Reports of stopped tasks wait for the energy sampler's next sample, which is paced (up to 20 ms away,
            # more in a burst of short tasks): a caller waiting for them wants it now.
            try:
                hurry = getattr(self._energy_monitor, "hurry", None)
                if hurry is not None and target > self._done:
                    self._guard("energy hurry", hurry, None)
                with self._cv:
                    return self._wait_done(target, deadline)
            finally:
                with self._cv:
                    self._flushing -= 1
        except Exception as exc:
            log_once("flush", "metatrail: flush failed: %s", exc)
            return False

    def _wait_done(self, target: int, deadline: float) -> bool:
        """Wait (holding ``_cv``) until ``target`` items are done; False at the deadline or without a writer."""
        while self._done < target:
            if self._thread is None or not self._thread.is_alive():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._cv.wait(remaining)
        return True

    def _drain_before_death(self, deadline: float) -> None:
        """Wait until what was submitted is done, or ``deadline``; for a SIGTERM handler about to end the process
        (:mod:`metatrail.sigterm`: on the main thread, or on its watch thread when the main thread cannot run it).

        The handler runs on the main thread between two of its bytecodes, maybe inside this Recorder's lock: an
        exit flush holds it between its waits, and a pool worker that got the pool's sentinel is in its exit flush
        when ``terminate()`` comes. The lock is reentrant, and waiting on the condition lets go of it however often
        this thread holds it, so the writer can store meanwhile (it used to wait for the interrupted code, and all
        was lost). Should another thread hold it longer than a moment, the wait is a poll of the counters."""
        target = self._submitted
        if self._done >= target or self._thread is None or not self._thread.is_alive():
            return
        if not self._cv.acquire(timeout=0.05):
            while self._done < target and time.monotonic() < deadline:
                time.sleep(0.005)
            return
        try:
            self._flushing += 1  # never taken back: the process ends
            self._cv.notify_all()
            while self._done < target and self._thread is not None and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
        finally:
            self._cv.release()

    @property
    def pending(self) -> int:
        """Items submitted but not yet stored."""
        with self._cv:
            return self._submitted - self._done

    def close(self, timeout: float | None = None) -> None:
        """Flush and stop the writer; the store is closed. Safe to call twice."""
        limit = timeout if timeout is not None else self.settings.flush_timeout if self._settings else 5.0
        deadline = time.monotonic() + limit
        if not self._closed:
            self._close_seen = self._submitted  # what this close waits for; the exit flush waits for the rest
        if not self._closed and not is_disabled() and not self._flush_wait(limit):
            log.warning("metatrail: %d events were not stored before exit (flush timeout %.0fs)", self.pending, limit)
            self._close_waited = limit
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            # A writer still at work (a close that ran out of time) is in, or about to be in, a write to the store:
            # closing it here would wait for that write (a store another process holds locked: minutes). The
            # writer closes it when it ends.
            store = None
            if self._submitted == self._done or self._thread is None or not self._thread.is_alive():
                store, self._store = self._store, None
        if self._process is not None:
            self._process.close()
        if store is not None:
            self._guard("close", store.close, None)
        # The shipper gets what is left of the time (at most its exit drain's bound) to ship what this Recorder
        # stored, then stops its thread: one Recorder after another in a process (a Parsl DFK each) must not leave
        # one idle thread, store connection and HTTP client each. Events recorded after close start it again.
        close_shipper = getattr(self._shipper, "close", None)
        if close_shipper is not None:
            self._guard("stop shipping", lambda: close_shipper(max(deadline - time.monotonic(), 0.0)), None)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _after_fork(self) -> None:
        # The parent's pending items are the parent's to write; the child starts clean with its own thread and
        # its own database connections.
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._queue = deque()
        self._inflight = []
        self._submitted = self._done = self._close_seen = 0
        self._flushing = 0
        self._exit_seen, self._exit_ok = None, True
        self._thread = None
        self._store = None
        self._hash_cache = None
        self._input_refs = {}
        if self._process is not None:
            self._process.abandon()  # the parent's writer process and pipes stay the parent's
        self._process = None
        self._process_refused = False

    def _at_exit(self) -> None:
        # After close() the flush already had its chance (and its timeout): do not wait a second time, unless that
        # timeout was shorter than the exit flush's (a host closing with a short timeout): then what the writer is
        # still storing gets the rest of the exit flush's time. Nor after an exit flush that ran out of time: where
        # both hooks are plain ``atexit`` (registered during shutdown), the late one runs first.
        if self._closed and self._close_waited is not None and not is_disabled() and self.pending:
            budget = self._settings.flush_timeout if self._settings else 30.0
            rest, self._close_waited = budget - self._close_waited, None
            self._exit_seen = self._submitted  # all of it, including what was recorded after the close
            self._exit_ok = rest > 0 and self._flush_wait(rest)
            if rest > 0 and not self._exit_ok:
                log.warning("metatrail: %d events were not stored before exit (flush timeout %.0fs)", self.pending,
                            budget)
            return
        # What was recorded after close() (a late hook) had no flush yet: the exit flush waits for it.
        if (self._closed and self._submitted <= self._close_seen) or is_disabled() or not self._exit_ok:
            return
        self._exit_seen = self._submitted
        if self._submitted > self._done:
            self._exit_flush()

    def _at_exit_late(self) -> None:
        # Only for what was recorded after the first exit flush began (threads Python joins at exit), and not when
        # that flush ran out of time: a second full wait would only double the exit of a process whose store is
        # stuck.
        if (self._closed and self._submitted <= self._close_seen) or is_disabled() or not self._exit_ok or \
                self._submitted <= (self._exit_seen or 0):
            return
        self._exit_flush()

    def hand_off_at_exit(self, after: float) -> None:
        """At this process's exit, wait at most ``after`` seconds for what is pending, then give the rest to a writer
        process of its own (:meth:`hand_off`), which stores it after this process has ended, instead of waiting up
        to ``flush_timeout``.

        For processes whose exit the host waits on: a pool's worker processes, whose flow or workflow ends only once
        the pool has shut down. There, a stalled store (another writer holding the lock, a slow network filesystem)
        would hold up the user's workflow for the whole flush timeout. Never raises."""
        self._exit_hand_off_after = max(0.0, float(after))

    def _exit_flush(self) -> None:
        timeout = self._settings.flush_timeout if self._settings else 30.0
        after = self._exit_hand_off_after
        if after is not None and after < timeout:
            if self._flush_wait(after):
                return
            waiting = self.pending
            if self.hand_off():
                self._exit_ok = False  # handed over: the late exit hook must not wait again
                log.warning("metatrail: %d events not stored %.1fs into this process's exit; handed to a writer "
                            "process that stores them after it has ended", waiting, after)
                return
            timeout -= after
        self._exit_ok = self._flush_wait(timeout)
        if not self._exit_ok:
            log.warning("metatrail: %d events were not stored before exit (flush timeout %.0fs)", self.pending, timeout)

    # -- the writer thread --------------------------------------------------------------------------------------
    def _writer(self) -> None:
        # The writer's first imports (a store on a server or PostgreSQL imports SQLAlchemy: a second or more on a slow
        # machine) run under a lock that fork waits for: a child forked while another thread is halfway through
        # importing a module inherits it half made, and every build and store call in the child then fails on it.
        with forkwaits.IMPORTS.held():
            self._guard("writer start-up", self._import_writer_modules, None)
        while True:
            with self._cv:
                # After close, the thread stays while the writer process still holds batches: were it to die, they
                # come back to the queue for this thread; and a flush (the exit flush after a close that ran out of
                # time) waits only on a live writer.
                while not self._queue and not (self._closed and self._submitted == self._done):
                    self._cv.wait(1.0)
                if not self._queue and self._closed:
                    # Still alive until it has returned: an event recorded from now on must start a new writer.
                    if self._thread is threading.current_thread():
                        self._thread = None
                    store, self._store = self._store, None  # left by a close that ran out of time, or reopened
                    break
                # Linger briefly so that a burst of events shares one transaction (a commit costs far more than an
                # event); a flush or close does not wait for the linger.
                deadline = time.monotonic() + self.linger_s
                while len(self._queue) < WRITE_BATCH and not self._closed and not self._flushing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), WRITE_BATCH))]
                self._inflight = batch
            try:
                if self._to_process(batch):
                    with self._cv:
                        self._inflight = []
                    continue  # done when the writer process acknowledges it
            except Exception as exc:  # the batch is written here instead: nothing accepted is dropped
                log_once(f"handoff:{type(exc).__name__}", "metatrail: could not hand events to the writer process "
                         "(%s: %s); writing them here", type(exc).__name__, exc)
            self.write_items(batch)
            with self._cv:
                self._done += len(batch)
                self._inflight = []
                self._cv.notify_all()
        if store is not None:
            self._guard("close", store.close, None)

    def _import_writer_modules(self) -> None:
        # Imported here, under the lock fork waits for, not halfway when a fork comes. (The shipper's settings, read
        # after the first write, come from metatrail.config; its HTTP client is imported by its own thread, under
        # the same lock, only when a server is configured.)
        if not self._store_given and self.settings.writer == "process":
            import metatrail.writerproc  # the writer process builds and stores
            return
        import metatrail.codeversion
        import metatrail.hashing
        import metatrail.openlineage.events  # noqa: F401

        self._get_store()  # the store's modules, and the dialect the engine loads when it first connects

    def write_items(self, batch: list[_Item]) -> None:
        """Build and store the events of ``batch`` here and now (the writer thread's work, or a writer process's)."""
        events: list[dict[str, Any]] = []
        for item in batch:
            try:
                events.append(self._build(item))
            except Exception as exc:
                self.failed_writes += 1
                log_once(f"build:{type(exc).__name__}", "metatrail: could not build an event (%s: %s)",
                         type(exc).__name__, exc, exc_info=True)
            # Hand the GIL over between events: a host thread waiting for it (after any system call) would
            # otherwise wait a whole switch interval (5 ms) behind this CPU-bound loop.
            time.sleep(0)
        self._write(events)

    # -- the writer process (see metatrail.writerproc) ----------------------------------------------------------
    def _to_process(self, batch: list[_Item]) -> bool:
        """Hand ``batch`` to the writer process, starting it when the ``writer`` setting says so; False when the
        batch is to be written on this thread."""
        if self._process is None:
            if self._process_refused or self._store_given:
                return False
            mode = self.settings.writer
            if mode == "thread" or (mode == "auto" and self._submitted < PROCESS_AFTER_EVENTS):
                return False
            with forkwaits.IMPORTS.held():  # as the writer's first imports: a fork must not catch them half done
                from metatrail.writerproc import WriterProcess

                with contextlib.suppress(Exception):  # starting one imports it (its pid is kept out of task energy)
                    import metatrail.energy.cputime  # noqa: F401
            self._process = WriterProcess.start(self.settings, self._process_done, self._process_lost)
            if self._process is None:
                self._process_refused = True
                return False
        if not self._process.alive:
            return False
        for item in batch:
            self._ready_for_process(item)
        return bool(self._process.send(batch))

    def _ready_for_process(self, item: _Item, *, keep: bool = False) -> None:
        """Make ``item`` what a writer process can build from: made here what needs this process (its energy
        report, its START's hashed inputs); ``keep`` leaves those inputs here too (for this process's writer)."""
        item.pid = os.getpid()
        if item.energy is not None:
            # Report first, then let go of the handle: a hand_off copying the item meanwhile must find one or the
            # other, never neither.
            item.energy_report = item.energy.report(self._energy_report)
            item.energy = None
        if isinstance(item.error, BaseException):
            item.error = ErrorText.of(item.error)
        if item.kind == "exec_end" and item.input_refs is None:
            # Its START was built here: the writer process must use those hashes (what the task read).
            refs = self._input_refs.get(item.subject.id) if keep else self._input_refs.pop(item.subject.id, None)
            item.input_refs = refs

    def hand_off(self) -> bool:
        """Give what this process has not stored yet to a writer process of its own, which stores it even after
        this process has ended; return whether it was handed over (not whether it is stored yet).

        For hosts that end a process with ``os._exit`` right after a bounded :meth:`flush` (Airflow's task runner):
        events still waiting there (a large output being hashed) would die with it. This process's writer goes on
        too; an event both store is stored once. Never raises; does not wait for the writer process."""
        if is_disabled():
            return True

        def go() -> bool:
            import dataclasses

            with self._cv:
                items = [dataclasses.replace(item) for item in (*self._inflight, *self._queue)]
            if not items:
                return True
            if self._store_given:
                return False
            from metatrail.writerproc import WriterProcess

            # Its own writer process, told nothing back: what it stores is already counted by this process's writer,
            # which is still at work on the same items.
            process = WriterProcess.start(self.settings, lambda *_: None, lambda _items: None)
            if process is None:
                return False
            for item in items:
                self._ready_for_process(item, keep=True)
            try:
                return bool(process.send(items))
            finally:
                process.close()

        return self._guard("hand_off", go, False)

    def _energy_report(self, stopped: object) -> dict[str, Any] | None:
        report: dict[str, Any] | None = self._guard("energy report", lambda: self._energy().task_report(stopped), None)
        return report

    def _process_done(self, count: int, written: int, failed: int) -> None:
        if written:
            # Shipping stays with the host (the writer process ships nothing). Told before the batch counts as done,
            # as on the thread: a flush that returns leaves a shipper that knows, for its exit step.
            self._shipper.notify()
        with self._cv:
            self.written += written
            self.failed_writes += failed
            self._done += count
            self._cv.notify_all()

    def _process_lost(self, items: list[_Item]) -> None:
        # The writer process is gone: what it had not acknowledged goes back to the front of the queue, in order, for
        # this process's writer thread (an event it did store is stored once). Never dropped: they were accepted.
        with self._cv:
            self._queue.extendleft(reversed(items))
            self._cv.notify_all()

    def _write(self, events: list[dict[str, Any]]) -> None:
        """Store ``events`` in one transaction, retrying what may pass (a store busy or briefly full). An event the
        store cannot take (:class:`EventError`) is not retried: the batch is stored one event at a time, so only
        that event is lost (counted), after one attempt with its unstorable values escaped."""
        if not events:
            return
        try:
            self._ingest_retrying(events)
        except EventError:
            for event in events:
                self._write_alone(event)
        except Exception as exc:
            self._dropped_by_store(len(events), exc)

    def _ingest_retrying(self, events: list[dict[str, Any]]) -> None:
        # While the store keeps failing (a directory that cannot be created, a full disk), each batch gets one
        # attempt, not a round of backoff: a host must not wait seconds per batch for a store that is not coming
        # back soon. The first success restores the retries.
        attempts = 1 if self._store_failing else 5
        delay = 0.05
        for attempt in range(attempts):
            try:
                # Not forked in the middle: a child would inherit SQLite's in-process state of this transaction
                # (its locks on the file, held by a connection the child cannot finish), and its own connection to
                # the same file would wait on them until its exit flush gave up (events lost).
                with forkwaits.STORE_WRITES.held():
                    self._get_store().ingest(events)
            except EventError:
                raise
            except Exception as exc:
                log_once(f"write:{type(exc).__name__}", "metatrail: cannot write to the store (%s: %s); retrying",
                         type(exc).__name__, exc)
                if attempt == attempts - 1:
                    self._store_failing = True
                    raise
                time.sleep(delay)
                delay *= 4
                continue
            self._store_failing = False
            self.written += len(events)
            self._shipper.notify()
            return

    def _write_alone(self, event: dict[str, Any]) -> None:
        try:
            try:
                self._ingest_retrying([event])
            except EventError as exc:
                escaped = _storable(event)
                if escaped is event:
                    raise
                log_once(f"escaped:{exc}"[:80], "metatrail: an event held values the store cannot take (%s); stored "
                         "with them escaped", exc)
                self._ingest_retrying([escaped])
        except Exception as exc:
            self._dropped_by_store(1, exc)

    def _dropped_by_store(self, count: int, exc: BaseException) -> None:
        self.failed_writes += count
        # The cause was logged (once per kind) where it happened.
        log.error("metatrail: %d events could not be stored and were dropped (store %s; %s)", count,
                  self._settings.store if self._settings else "?", type(exc).__name__)

    def _hash(self, paths: Sequence[PathLike], cwd: str | None = None) -> list[ArtifactRef]:
        if not paths:
            return []
        from metatrail import hashing

        if self._hash_cache is None:
            try:
                self._hash_cache = hashing.HashCache(self.settings.hash_cache)
            except Exception as exc:
                log_once("hash-cache", "metatrail: hash cache unavailable (%s); hashing without it", exc)
                self._hash_cache = hashing.HashCache(None)
        refs = []
        for p in paths:
            if isinstance(p, ArtifactRef):
                refs.append(p)
                continue
            given = os.fspath(p)
            if cwd is None or not isinstance(given, str) or os.path.isabs(given) or "://" in given:
                refs.append(hashing.hash_path(given, self._hash_cache))
                continue
            ref = hashing.hash_path(os.path.join(cwd, given), self._hash_cache)
            ref.uri = given  # named as given; found where it was given (the host may have moved on since)
            refs.append(ref)
        return refs

    def _hash_unchanged(self, paths: Sequence[PathLike], stats: list[StatKey | None] | None, reason: str,
                        item: _Item, since: float | None) -> list[ArtifactRef]:
        """Hash ``paths`` (here, later than they were recorded) and withdraw the hash of each local one that may not
        be what it was then: its stat differs from the one taken when it was recorded (``stats``), or, given
        ``since`` (a task's start, which a host may report late), it was modified between ``since`` and then.
        Items recorded without stats (by an older metatrail) fall back to comparing modification times with
        ``since``."""
        refs = self._hash(paths, item.cwd)
        if stats is None:
            return refs if since is None else _unless_modified_since(refs, since)
        for ref, before in zip(refs, stats, strict=False):
            if before == _NOT_CHECKED or ref.hash is None or ref.namespace != "file" or \
                    ref.kind not in ("file", "directory"):
                continue
            if before is None:
                ref.hash, ref.hash_error = None, "created after it was recorded: " + reason
            elif _stat_key(ref.name) != before:
                ref.hash, ref.hash_error = None, reason
            elif since is not None and since + 0.001 < before[2] / 1e9 <= item.recorded_at:
                # Changed after the task started and before it was recorded. A time after the recording (a file
                # server whose clock runs ahead of ours) is not taken as a change: the stat would have shown one.
                ref.hash, ref.hash_error = None, reason
        return refs

    def _build(self, item: _Item) -> dict[str, Any]:
        build_run_event, execution_facet = _event_builders()
        if self._commits is None:
            from metatrail.codeversion import CommitCache

            self._commits = CommitCache()
        code_version = self._commits.get()
        if self._user is False:
            self._user = current_user()
        subject = item.subject
        is_exec = isinstance(subject, Execution)
        event_type = {"pipeline_start": "START", "exec_start": "START"}.get(item.kind) or {
            Status.COMPLETED: "COMPLETE", Status.FAILED: "FAIL", Status.ABORTED: "ABORT",
            Status.RUNNING: "RUNNING"}[item.status]
        ended = item.kind in ("pipeline_end", "exec_end")
        extra = {k: v for k, v in subject.extra.items() if not k.startswith("_")}
        facet = execution_facet(
            pipeline=subject.pipeline,
            kind="execution" if is_exec else "pipeline_run",
            site=self.settings.site,
            integration=subject.integration,
            stage=subject.stage if isinstance(subject, Execution) else None,
            host=self._host,
            user=self._user if isinstance(self._user, str) else None,
            pid=item.pid or os.getpid(),
            integrationVersion=subject.host_version,
            tryNumber=subject.try_number if isinstance(subject, Execution) else None,
            params=subject.params,
            codeVersion=code_version,
            exitCode=item.exit_code,
            durationSeconds=round(item.at - subject.started_at, 6) if ended else None,
            warnings=_merged_warnings(subject.extra.get("_warnings"), item.warnings),
            extra=json.loads(json.dumps(extra, default=repr)) if extra else {},
            metrics=_numeric(subject.metrics) if isinstance(subject, Execution) and ended else {},
        )
        inputs: list[ArtifactRef] = []
        outputs: list[ArtifactRef] = []
        parent = None
        if isinstance(subject, Execution):
            if item.kind == "exec_start":
                inputs = self._hash_unchanged(item.inputs, item.input_stats, _CHANGED_SINCE_START, item,
                                              subject.started_at)
                self._input_refs[subject.id] = inputs
            else:
                known = item.input_refs if item.input_refs is not None else self._input_refs.pop(subject.id, None)
                if known is None:
                    # Its START was built elsewhere (another process finished it, or the START's writer died):
                    # hashed again (cache hits), and what changed since the start is withdrawn, as at the start.
                    known = _unless_modified_since(self._hash(subject.inputs), subject.started_at)
                # Inputs named only at the end were read during the task: no time of theirs to compare with.
                inputs = known + self._hash_unchanged(item.inputs, item.input_stats, _CHANGED_SINCE_END, item, None)
                outputs = self._hash_unchanged(item.outputs, item.output_stats, _CHANGED_SINCE_END, item, None)
            if subject.pipeline_run_id:
                parent = (subject.pipeline_run_id, subject.namespace, subject.pipeline)
            job_name, job_type = f"{subject.pipeline}.{subject.stage}", "TASK"
        else:
            job_name, job_type = subject.pipeline, "DAG"
        energy = item.energy_report if item.energy is None else item.energy.report(self._energy_report)
        return build_run_event(
            event_type, run_id=subject.id, namespace=subject.namespace, job_name=job_name,
            event_time=item.at if ended else subject.started_at, integration=subject.integration,
            job_type=job_type, execution_facet=facet, integration_version=subject.host_version or __version__,
            parent=parent, inputs=inputs, outputs=outputs, error=item.error, energy=energy,
        )


_builders: tuple[Callable[..., dict[str, Any]], Callable[..., Any]] | None = None


def _event_builders() -> tuple[Callable[..., dict[str, Any]], Callable[..., Any]]:
    """The event builders, imported on the writer's first event (not with this module: they bring attrs along), then
    kept at hand: an import statement per event cost the writer a microsecond or two each."""
    global _builders
    if _builders is None:
        from metatrail.openlineage.events import build_run_event, execution_facet

        _builders = (build_run_event, execution_facet)
    return _builders


def _id_at(at: Any) -> str:
    """A new id whose time part is ``at``; made before a public method's boundary, so it never raises: a time that
    is not a finite number (NaN, a datetime) gets an id of now (its events fail to build, and are counted)."""
    try:
        return uuid7(at)
    except Exception:
        return uuid7()


def _snapshot(subject: S) -> S:
    """``subject`` as it is now, for an event built later on the writer. The caller's handle goes on changing
    (``execution_finished`` adds ``extra`` and metrics to it, a host may edit it), and an event must carry what was
    known when it was recorded: its bytes are its identity, so a START must not depend on when the writer got to
    it. Its containers are copied one level deep; the energy token stays with the handle."""
    snap = object.__new__(type(subject))  # copy.copy, at half the cost (this runs on the host's thread)
    snap.__dict__.update(subject.__dict__)
    snap.params = dict(subject.params)
    snap.extra = {k: v for k, v in subject.extra.items() if k != "_energy_token"}
    if isinstance(snap, Execution):
        snap.inputs = list(snap.inputs)
        snap.metrics = dict(snap.metrics)
    return snap


def _merged_warnings(known: list[str] | None, new: list[str]) -> list[str]:
    """The execution's warnings, then this event's own that are not among them."""
    if not new:
        return list(known or ())
    return list(known or ()) + [w for w in new if w not in (known or ())]


_NOT_CHECKED: StatKey = (-1, -1, -1, -1)  # not a local path (a remote URL, an artifact given already hashed)
_CHANGED_SINCE_START = "modified after the task started: the content it read is unknown"
_CHANGED_SINCE_END = "modified after the task ended: its content then is unknown"


def _as_recorded(paths: Iterable[PathLike]) -> tuple[list[PathLike], list[StatKey | None] | None, str | None]:
    """Paths as recorded now: the list, the stat of each local path (None for a path that does not exist,
    :data:`_NOT_CHECKED` for remote URIs and artifacts given already hashed), and the working directory that
    relative paths are relative to (the writer hashes later, when the host may have changed directory)."""
    out = list(paths)
    if not out:
        return out, None, None
    stats: list[StatKey | None] = []
    relative = False
    for item in out:
        local = None
        if not isinstance(item, ArtifactRef):
            try:
                text: Any = os.fspath(item)
            except TypeError:  # not a path: left for the writer, which records it as unhashable
                text = None
            if isinstance(text, str) and "://" not in text and not text.startswith("file:"):
                local = text
                relative = relative or not os.path.isabs(text)
        stats.append(_stat_key(local) if local is not None else _NOT_CHECKED)
    try:
        cwd = os.getcwd() if relative else None
    except OSError:
        cwd = None
    return out, stats, cwd


def _stat_key(path: str) -> StatKey | None:
    """What changes when a file's content (or a directory's entries) may have changed; None when it is not there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _unless_modified_since(refs: list[ArtifactRef], started_at: float) -> list[ArtifactRef]:
    """Inputs are hashed on the writer thread, shortly after the task started. A file modified since then may
    no longer be what the task read, so its hash is withdrawn, with the reason (checked after hashing, so a
    change during hashing is caught too)."""
    for ref in refs:
        if ref.hash is None or ref.kind != "file" or ref.namespace != "file":
            continue
        try:
            modified = os.stat(ref.name).st_mtime
        except OSError:
            continue
        if modified > started_at + 0.001:
            ref.hash = None
            ref.hash_error = "modified after the task started: the content it read is unknown"
    return refs


def _storable(value: Any) -> Any:
    """``value`` (an event) with what cannot be stored as UTF-8 JSON escaped: lone surrogates (undecodable file
    names) as ``\\xNN``-style escapes, integers of thousands of digits as a description, non-finite floats as
    null. The same object when nothing needed escaping."""
    if isinstance(value, str):
        return value if _utf8_clean(value) else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_BIG_INT < value < _BIG_INT or value.bit_length() < 4000 * 3.3 else _bounded_repr(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        items = {_storable(k) if isinstance(k, str) else _key_text(k): _storable(v) for k, v in value.items()}
        same = len(items) == len(value) and all(k in value and items[k] is value[k] for k in items)
        return value if same else items
    if isinstance(value, list | tuple):
        escaped = [_storable(v) for v in value]
        return value if all(a is b for a, b in zip(escaped, value, strict=True)) and isinstance(value, list) \
            else escaped
    return _bounded_repr(value)


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """Metrics as finite JSON numbers; anything else becomes null (logged once), never a made-up value."""
    out: dict[str, float | None] = {}
    for name, value in metrics.items():
        number: float | None = None
        if not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
        if number is None or not math.isfinite(number):
            log_once(f"metric:{name}", "metatrail: metric %r is not a finite number; stored as null", name)
            out[str(name)] = None
        else:
            out[str(name)] = value if isinstance(value, int) else number
    return out


class _NoEnergy:
    """The Recorder's own no-op monitor, for when ``metatrail.energy`` (home of ``DisabledMonitor``) cannot even be
    imported: recording must go on without energy then."""

    def task_started(self, execution_id: str, *, pid: int, include_children: bool = True,
                     source: object = None) -> object:
        return None

    def task_stopped(self, token: object) -> object:
        return None

    def task_report(self, stopped: object) -> dict[str, Any] | None:
        return None

    def task_finished(self, token: object) -> dict[str, Any] | None:
        return None


def _weak_settings(recorder: Recorder) -> Callable[[], Settings]:
    """The Recorder's settings for its shipper, which outlives it (its exit drain ships what the Recorder stored)."""
    ref = weakref.ref(recorder)
    settings = recorder._settings

    def get() -> Settings:
        target = ref()
        return target.settings if target is not None else settings or load_settings()

    return get


def _weakly(recorder: Recorder, method: Callable[[Recorder], None]) -> Callable[[], None]:
    """``method`` of ``recorder`` as a hook that does nothing once the Recorder is gone."""
    ref = weakref.ref(recorder)

    def hook() -> None:
        target = ref()
        if target is not None:
            method(target)

    return hook


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def _recorder_lock_after_fork() -> None:
    # A thread of the parent may have held it, creating the Recorder: it does not exist here to release it.
    global _recorder_lock
    _recorder_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_recorder_lock_after_fork)


def get_recorder() -> Recorder:
    """The process-wide Recorder, created on first use (configuration is read lazily by it)."""
    global _recorder
    if _recorder is None:
        with _recorder_lock:
            if _recorder is None:
                _recorder = Recorder()
    return _recorder
