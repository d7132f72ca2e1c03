"""The DFK side of the Parsl plugin: a memoizer that records, wrapping the memoizer the user configured.

Parsl has no callback registry, but it calls the configured ``Memoizer`` at every point that matters, in the DFK
process: ``start`` (the DFK starts: our pipeline run begins), ``check_memo`` (a try is about to launch; the task's
futures are resolved), ``update_memo_result`` / ``update_memo_exception`` (a task is final: done, failed, dependency
failed or joined) and ``close`` (cleanup: the pipeline run ends). Every call goes to the user's memoizer first and its
return value and exceptions pass through unchanged, so memoization and checkpointing behave exactly as configured;
recording is done after, inside ``try``.

Who records what:

* A try sent to an executor that :func:`track` wrapped is recorded **on the worker** (:mod:`.worker`): ``check_memo``
  leaves the try's identity in a thread-local, and the wrapped ``executor.submit`` (same thread, next call) wraps
  the function and passes the identity along as a keyword argument.
* What never reaches a worker is recorded here: memo hits (an execution with ``from_memo``), dependency failures
  (never launched: START and FAIL at once, with the arguments as submitted: see :mod:`.submitted`), join apps (they
  run on Parsl's internal executor and finish when their inner tasks do), tries on executors that were not wrapped,
  and tries lost outside the app body (a lost worker, a serialization error: the worker could not record an end).

Execution ids are derived from Parsl's identity (run id, task id, try), so the DFK and the worker name the same try
alike.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from metatrail.config import Settings, is_disabled, load_settings
from metatrail.logsafe import log_once
from metatrail.model import Execution, PipelineRun, Status, uuid7_from
from metatrail.plugins.parsl import WORKER_SIDE_ENV, compat
from metatrail.plugins.parsl.submitted import SubmittedArgs, call_as_submitted
from metatrail.plugins.parsl.worker import (
    CTX_KEY,
    describe_call_or_explain,
    encode_context,
    output_uris,
    register_local_recorder,
    release_local_recorder,
    tracked,
    with_warnings,
)
from metatrail.store.drop import DropIngester, drop_dir, url_for_workers

INTEGRATION = "PARSL"
STALL_SECONDS = 10.0  # cleanup stops waiting for worker records after this long without a new one
DEFAULT_NAMESPACE = "parsl"

_TERMINAL = frozenset({"completed", "failed", "aborted"})
_pending = threading.local()  # check_memo -> executor.submit hand-over (same Task-Launch thread)


class _Try:
    """The DFK's view of one try of a task (one is made per try on the DFK's launch thread: a plain class with
    slots, not a dataclass with a default factory)."""

    __slots__ = ("execution_id", "extra", "handle", "launched_at", "mode", "task_id", "try_id")

    def __init__(self, task_id: int, try_id: int, execution_id: str, launched_at: float, mode: str,
                 extra: dict[str, Any]) -> None:
        self.task_id = task_id
        self.try_id = try_id
        self.execution_id = execution_id
        self.launched_at = launched_at
        self.mode = mode  # memo | dfk | join | dispatching | worker
        self.handle: Execution | None = None
        self.extra = extra


class TrackingMemoizer(compat.Memoizer):  # type: ignore[misc,unused-ignore]  # Any when mypy cannot see parsl
    """A ``parsl`` Memoizer that records the workflow run and its tasks, delegating memoization to ``inner``.

    ``inner`` is the memoizer the user configured (``None``: a fresh ``BasicMemoizer`` per DFK, as Parsl does).
    Attributes it does not have itself (``checkpoint()``, ``memo_lookup_table`` …) are the inner memoizer's.
    """

    def __init__(self, inner: compat.Memoizer | None = None, *, pipeline: str | None = None,
                 namespace: str | None = None) -> None:
        self._configured = inner
        self._inner: compat.Memoizer = inner if inner is not None else compat.BasicMemoizer()
        self._pipeline_override = pipeline
        self._namespace_override = namespace
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        leftover = getattr(self, "_drops", None)  # a DFK that never reached cleanup: its ingester stops here
        if leftover is not None:
            leftover.stop(0)
        watched = getattr(self, "_submitted", None)
        if watched is not None:
            watched.stop()
        self._recorder: Any = None
        self._settings: Settings | None = None
        self._run: PipelineRun | None = None
        self._dfk: Any = None
        self._tries: dict[int, _Try] = {}
        self._started_at = time.time()
        self._parsl_run_id = ""
        self._ctx_common: dict[str, Any] = {}
        # per executor label: whether its submit is ours and whether it runs tasks in this process, looked up once
        self._executor_facts: dict[str, tuple[bool, bool]] = {}
        self._active = False
        self._run_dir = ""
        # tries the DFK has seen end (their terminal event is recorded here or by the worker); tries still running
        # at cleanup are not waited for: their workers record ABORTED when Parsl terminates them
        self._ended = 0
        self._remote_tries = False  # some try ran in another process: its events come from there
        self._drops: DropIngester | None = None  # takes in the segments that workers drop (see _open_run)
        self._submitted = SubmittedArgs()  # watches this DFK's submit from _begin on

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_configured"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def inner(self) -> compat.Memoizer:
        """The memoizer that does the memoizing."""
        return self._inner

    # -- the Memoizer interface: inner first, unchanged; recording after, guarded -----------------------------
    def start(self, *, run_dir: str, config_run_dir: str) -> None:
        """Start the inner memoizer, then the pipeline run (when recording is on)."""
        if self._configured is None:
            self._inner = compat.BasicMemoizer()  # what the DFK would have made: nothing carries over between runs
        self._inner.start(run_dir=run_dir, config_run_dir=config_run_dir)
        self._reset()
        if is_disabled():
            return
        self._guard("start", lambda: self._begin(compat.dfk_from_stack(), run_dir))

    def check_memo(self, task: Any) -> Future[Any] | None:
        """The inner memoizer's answer; records the launch of this try."""
        memo: Future[Any] | None = self._inner.check_memo(task)
        _pending.item = None
        self._submitted.forget(task.get("kwargs"))  # launched: no dependency failed, the record's arguments are whole
        if self._active and not is_disabled():
            try:
                self._on_launch(task, memo)
            except Exception as exc:
                _log_failure("launch", exc)
        return memo

    def update_memo_result(self, task: Any, r: Any) -> None:
        """Inner first; then the task's final success is recorded where the DFK is the recorder."""
        self._inner.update_memo_result(task, r)
        if self._active:
            try:
                self._on_final(task, None)
            except Exception as exc:
                _log_failure("result", exc)

    def update_memo_exception(self, task: Any, e: BaseException) -> None:
        """Inner first; then the task's final failure is recorded where the DFK is the recorder."""
        self._inner.update_memo_exception(task, e)
        if self._active:
            try:
                self._on_final(task, e)
            except Exception as exc:
                _log_failure("exception", exc)

    def close(self) -> None:
        """Close the inner memoizer (final checkpoint), then end the pipeline run and flush (bounded)."""
        try:
            self._inner.close()
        finally:
            self._submitted.stop()
            if self._active and not is_disabled():
                self._guard("close", self._end)
            self._active = False
            if self._drops is not None:  # _end did not run (metatrail disabled since the start): stop it all the same
                self._drops.stop(0)
                self._drops = None

    # -- recording ------------------------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            _log_failure(what, exc)

    def _begin(self, dfk: Any, run_dir: str) -> None:
        from metatrail.recorder import Recorder

        self._settings = load_settings()
        self._recorder = Recorder(self._settings)
        self._active = True
        self._run_dir = run_dir
        if dfk is not None:
            self._open_run(dfk)
            try:
                self._submitted.watch(dfk)
            except Exception as exc:  # dependency failures are then recorded without positional arguments
                _log_failure("submit-watch", exc)

    def _open_run(self, dfk: Any) -> PipelineRun:
        with self._lock:
            if self._run is not None:
                return self._run
            assert self._settings is not None
            name = self._pipeline_override or str(getattr(dfk, "workflow_name", None) or "parsl")
            if not self._pipeline_override and name.endswith(".py"):
                name = name[:-3]
            namespace = self._namespace_override or (
                self._settings.namespace if self._settings.namespace != "default" else DEFAULT_NAMESPACE)
            self._parsl_run_id = str(getattr(dfk, "run_id", "")) or uuid7_from(self._started_at, "parsl")
            version = compat.parsl_version()
            config = getattr(dfk, "config", None)
            # dfk.executors is still empty while the memoizer starts; the config lists them
            executors = {ex.label: type(ex).__name__ for ex in getattr(config, "executors", ())}
            params = {"executors": executors, "retries": getattr(config, "retries", None),
                      "memoizer": type(self._inner).__name__,
                      "checkpoint_mode": getattr(self._inner, "checkpoint_mode", None)}
            self._run = self._recorder.pipeline_run_started(
                name, namespace=namespace, integration=INTEGRATION,
                run_id=uuid7_from(self._started_at, f"parsl:{self._parsl_run_id}"), params=params,
                integration_version=version, started_at=self._started_at,
                extra={"parsl_run_id": self._parsl_run_id, "run_dir": getattr(dfk, "run_dir", self._run_dir)})
            self._dfk = dfk
            register_local_recorder(self._run.id, self._recorder)
            # Workers may run on other hosts: on a shared filesystem they drop their events beside the store
            # (metatrail.store.drop) rather than share SQLite's locks across hosts; _wait_for_workers takes them in.
            workers_store = url_for_workers(self._settings.store)
            self._ctx_common = {"run": self._run.id, "pipeline": name, "namespace": namespace, "version": version,
                                "store": workers_store, "hash_cache": self._settings.hash_cache,
                                "host": socket.gethostname()}
            if workers_store != self._settings.store:
                self._drops = DropIngester(self._settings.store)
                if self._drops.path is not None:
                    # Made here, before any task is out: a worker makes only the drop directory, never the store's
                    # (see metatrail.store.drop.DropStore), and the DFK's writer makes that one at its first write.
                    # If it cannot be made, the workers' writes fail and are counted there.
                    with contextlib.suppress(OSError):
                        drop_dir(self._drops.path).mkdir(parents=True, exist_ok=True)
                self._drops.start()
            return self._run

    def _on_launch(self, task: Any, memo: Future[Any] | None) -> None:
        run = self._run or self._open_run(task["dfk"])
        tid, try_id = task["id"], task["try_id"]
        previous = self._tries.pop(tid, None)  # one dict operation: atomic, no lock needed
        if previous is not None:
            self._close_retried(previous, task)
        now = time.time()
        label = task["executor"]
        depends = task.get("depends")
        attempt = _Try(tid, try_id, uuid7_from(now, f"parsl:{self._parsl_run_id}:{tid}:{try_id}"), now, "dfk",
                       {"parsl_task_id": tid, "executor": label,
                        "depends_on": compat.future_task_ids(depends) if depends else []})
        facts = self._executor_facts.get(label)
        if facts is None:
            facts = _executor_facts(task["dfk"], label)
            if facts is not None:  # an executor the DFK does not have (yet) is looked up again next time
                self._executor_facts[label] = facts
        tracked_here, in_process = facts or (False, False)
        if memo is not None:
            attempt.mode = "memo"
            attempt.extra["from_memo"] = True
            attempt.handle = self._start_here(task, attempt, run)
        elif task.get("join"):
            attempt.mode = "join"  # recorded when it completes: the joined tasks are known only then
        elif tracked_here:
            attempt.mode = "dispatching"
            if not in_process:
                self._remote_tries = True
            ctx = {**self._ctx_common, "id": attempt.execution_id, "stage": task["func_name"], "try": try_id,
                   "extra": attempt.extra}
            # a ThreadPool hands the dict over as it is; other executors serialise it (see worker.encode_context)
            _pending.item = (attempt, ctx if in_process else encode_context(ctx))
        else:
            attempt.handle = self._start_here(task, attempt, run)
        self._tries[tid] = attempt

    def _start_here(self, task: Any, attempt: _Try, run: PipelineRun, *, at: float | None = None,
                    extra: dict[str, Any] | None = None,
                    call: tuple[Any, Any, list[str]] | None = None) -> Execution:
        """START of a try recorded here; ``call``: ``(args, kwargs, warnings)`` to describe instead of the task
        record's arguments."""
        args, kwargs, call_warnings = call if call is not None else (task["args"], task["kwargs"], [])
        params, inputs, _, warnings = describe_call_or_explain(task["func"], args, kwargs)
        warnings = call_warnings + warnings
        execution: Execution = self._recorder.execution_started(
            run.pipeline, task["func_name"], pipeline_run=run, execution_id=attempt.execution_id, inputs=inputs,
            params=params, integration=INTEGRATION, started_at=at if at is not None else attempt.launched_at,
            try_number=attempt.try_id + 1, integration_version=compat.parsl_version(),
            extra=with_warnings(extra if extra is not None else attempt.extra, warnings), measure_energy=False)
        return execution

    def _end_here(self, task: Any, handle: Execution, error: BaseException | None, *,
                  outputs: bool = True) -> None:
        out = output_uris(task["kwargs"].get("outputs")) if outputs else []
        if error is None:
            self._recorder.execution_finished(handle, outputs=out)
        else:
            self._recorder.execution_failed(handle, error=error, outputs=out)

    def _fail_only(self, task: Any, attempt: _Try, error: BaseException | None) -> None:
        """A FAIL for a try that failed outside the app body (lost worker, unpicklable result): the worker recorded
        no end, or COMPLETE; this FAIL, recorded later, is the try's outcome. It names the call's arguments and
        input Files as the DFK knows them (the worker's START may have died with it)."""
        assert self._run is not None
        from metatrail.recorder import safe_params

        if _worker_lacks_metatrail(error):
            log_once("parsl:worker-import", "metatrail: Parsl task %s failed on its worker, which cannot import "
                     "metatrail to run the task wrapper (%s: %s). Install metatrail where the workers run, or "
                     "record from the DFK only: set %s=0 (or track(config, worker_side=False))", task["id"],
                     type(error).__name__, error, WORKER_SIDE_ENV)
        params, inputs, _, warnings = describe_call_or_explain(task["func"], task["args"], task["kwargs"])
        extra = with_warnings(dict(attempt.extra, recorded_by="dfk"), warnings)
        handle = Execution(id=attempt.execution_id, pipeline=self._run.pipeline, stage=task["func_name"],
                           namespace=self._run.namespace, integration=INTEGRATION, pipeline_run_id=self._run.id,
                           started_at=attempt.launched_at, try_number=attempt.try_id + 1,
                           host_version=compat.parsl_version(), inputs=inputs, extra=extra)
        # The Recorder makes parameters JSON-safe only at a START; this end is built from the handle as it is.
        handle.params = safe_params(params, extra.setdefault("_warnings", []))
        self._recorder.execution_failed(handle, error=error or "the try was lost outside the app")

    def _close_retried(self, previous: _Try, task: Any) -> None:
        """The previous try of ``task`` failed and Parsl retries it; end it where the worker could not."""
        with self._lock:
            self._ended += 1
        error = _try_error(task.get("exec_fu"))
        if previous.mode == "worker":
            if _failed_outside_app(task.get("exec_fu"), error):
                self._fail_only(task, previous, error)
            return
        self._end_dfk_try(task, previous, error if error is not None else "failed; retried by Parsl")

    def _end_dfk_try(self, task: Any, attempt: _Try, error: BaseException | str | None) -> None:
        assert self._run is not None
        err = error if isinstance(error, BaseException) or error is None else RuntimeError(error)
        if attempt.handle is None:  # join (deferred) or never dispatched: START now, with its real launch time
            extra = dict(attempt.extra)
            if attempt.mode == "join":
                extra["join"] = True
                joined = compat.future_task_ids(task.get("joins") or [])
                if joined:
                    extra["joins"] = joined
            attempt.handle = self._start_here(task, attempt, self._run, extra=extra)
        self._end_here(task, attempt.handle, err, outputs=err is None)

    def _on_final(self, task: Any, error: BaseException | None) -> None:
        with self._lock:
            attempt = self._tries.pop(task["id"], None)
            if attempt is not None:
                self._ended += 1
        if attempt is not None and attempt.mode == "worker" and error is None:
            return  # the worker recorded the try's end; nothing to record here (the common case: checked first)
        submitted = self._submitted.take(task["kwargs"]) if attempt is None else None
        if is_disabled():
            return
        run = self._run or self._open_run(task["dfk"])
        if attempt is None:  # never launched: its dependencies failed
            now = time.time()
            attempt = _Try(task["id"], task["try_id"],
                           uuid7_from(now, f"parsl:{self._parsl_run_id}:{task['id']}:{task['try_id']}"), now, "dfk",
                           {"parsl_task_id": task["id"], "executor": task["executor"],
                            "depends_on": compat.future_task_ids(task.get("depends") or [])})
            call = None
            if isinstance(error, compat.DependencyError):
                attempt.extra["dependency_failed"] = True
                # The DFK dropped the failed dependencies from task["args"]: the rest would be misnamed
                call = call_as_submitted(submitted, task["args"], task["kwargs"],
                                         getattr(task["dfk"], "dependency_resolver", None))
            with self._lock:
                self._ended += 1
            attempt.handle = self._start_here(task, attempt, run, call=call)
            self._end_here(task, attempt.handle, error, outputs=False)
            return
        if attempt.mode == "worker":
            if error is not None and _failed_outside_app(task.get("exec_fu"), error):
                self._fail_only(task, attempt, error)
            return
        self._end_dfk_try(task, attempt, error)

    def _end(self) -> None:
        """End the pipeline run, wait (at most ``flush_timeout`` in all) for its events, and release the Recorder.

        The Recorder is closed here, so one DFK after another in a process do not pile up recorders; and closed with
        what is left of ``flush_timeout``, not the short call cap: a closed Recorder skips its exit flush, so events
        still pending now (ThreadPool tasks whose big inputs are being hashed) would otherwise be lost at exit."""
        rec, settings = self._recorder, self._settings
        if rec is None or settings is None:
            return
        deadline = time.monotonic() + settings.flush_timeout
        drops = self._drops.path if self._drops is not None else None  # the store whose segments workers drop
        if self._drops is not None:
            self._drops.stop(min(settings.timeout, settings.flush_timeout))  # the rest is taken in below
            self._drops = None
        try:
            if self._run is not None:
                failed, done = compat.failed_task_count(self._dfk)
                rec.pipeline_run_finished(self._run, status=Status.FAILED if failed else Status.COMPLETED,
                                          error=f"{failed} of {done} tasks failed" if failed else None)
            rec.flush(min(settings.timeout, settings.flush_timeout))
            if self._remote_tries and self._run is not None and not rec.failed_writes:
                self._wait_for_workers(self._run.id, deadline, drops)
            elif drops is not None:
                self._take_in_drops(drops, deadline)  # no waiting for workers, but what they dropped is stored
        finally:
            if self._run is not None:
                release_local_recorder(self._run.id)
            rec.close(max(deadline - time.monotonic(), 0.0))

    def _take_in_drops(self, drops: Path, deadline: float) -> None:
        """Store the segments the workers dropped beside ``drops`` (one bounded pass), when cleanup does not wait
        for the workers."""
        from metatrail.store import open_store
        from metatrail.store.drop import ingest_drops, pending_segments

        assert self._settings is not None
        if not pending_segments(drops):
            return
        with open_store(self._settings.store) as store:
            ingest_drops(store, drops, deadline=deadline)

    def _wait_for_workers(self, run_id: str, deadline: float, drops: Path | None = None) -> None:
        """Wait until the workers' events of this run are in the store: until ``deadline`` (``time.monotonic``), and
        no longer than :data:`STALL_SECONDS` without progress (workers that write to another store URL never show up
        here). ``drops``: the store file beside which the workers drop their segments (see _open_run), taken in on
        each look.

        ``close`` runs before Parsl scales its blocks in, and HTEX then ends workers with SIGTERM, which skips their
        exit flush; a worker's first write also pays its imports (seconds on a busy node). So the DFK checks the
        store here, while the workers are still alive, instead of losing the last tasks' records.
        """
        from metatrail.store import open_store
        from metatrail.store.drop import SCHEME, ingest_drops, mark_ingester, unmark_ingester

        assert self._settings is not None
        if self._settings.store.startswith(f"{SCHEME}:"):
            return  # this process drops its own events too (a drop:/// store): whoever owns the store takes them in
        last_progress, seen = time.monotonic(), -1
        store = open_store(self._settings.store)
        marked = -math.inf
        try:
            while True:
                if drops is not None:
                    if time.monotonic() - marked >= 5.0:
                        mark_ingester(drops)  # still this process's to take in (DropIngester.stop unmarked it)
                        marked = time.monotonic()
                    ingest_drops(store, drops, deadline=deadline)
                run = store.get_run(run_id) or {}
                ended = sum(1 for c in run.get("children", []) if c.get("state") in _TERMINAL)
                now = time.monotonic()
                if ended != seen:
                    seen, last_progress = ended, now
                if ended >= self._ended:
                    return
                if now >= deadline or now - last_progress >= STALL_SECONDS:
                    log_once("parsl:wait-workers", "metatrail: %d of %d Parsl task records were not in the store "
                             "%s at cleanup; the workers may write elsewhere or be stuck", self._ended - ended,
                             self._ended, "after flush_timeout" if now >= deadline else
                             f"and none arrived for {STALL_SECONDS:.0f}s")
                    return
                time.sleep(0.1)
        finally:
            store.close()
            if drops is not None:
                unmark_ingester(drops)


def _executor_facts(dfk: Any, label: str) -> tuple[bool, bool] | None:
    """``(tracked, in_process)`` of the DFK's executor ``label``: whether :func:`wrap_submit` wrapped it, and whether
    it runs tasks in this process (a ThreadPool: the context needs no serialising); None when it has no such
    executor."""
    executor = getattr(dfk, "executors", {}).get(label)
    if executor is None:
        return None
    return bool(getattr(executor, "_metatrail_tracked", False)), isinstance(executor, compat.ThreadPoolExecutor)


def _log_failure(what: str, exc: Exception) -> None:
    log_once(f"parsl:{what}:{type(exc).__name__}", "metatrail: recording Parsl %s failed (%s: %s); the workflow is "
             "not affected", what, type(exc).__name__, exc)


def _failed_outside_app(future: Any, error: BaseException | None) -> bool:
    """Whether a worker try failed where the worker's wrapper could not record it as FAIL.

    An exception of the app body comes back as a *result* (Parsl's ``wrap_error`` returns it wrapped, and the
    worker records that FAIL); an executor future that holds an exception failed outside the body: a lost worker, a
    result that could not be serialised back (the worker recorded COMPLETE), a task the executor never ran. Without
    the future, Parsl's infrastructure error types tell."""
    if isinstance(future, Future) and future.done():
        return bool(future.cancelled() or future.exception(timeout=0) is not None)
    return bool(compat.is_infrastructure_error(error))


def _worker_lacks_metatrail(error: BaseException | None) -> bool:
    """Whether a try failed because its worker could not import metatrail: the worker unpickles our task wrapper
    (by reference to :mod:`.worker`) before the app, and Parsl brings that ImportError back as the try's exception
    (or a DeserializationError naming it). Only read, to say how to fix it; the failure itself is Parsl's."""
    for _ in range(8):  # along the causes, not for ever
        if error is None:
            return False
        if isinstance(error, ImportError) and "metatrail" in f"{error.name or ''} {error}":
            return True
        if isinstance(error, compat.DeserializationError) and "metatrail" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _try_error(future: Any) -> BaseException | None:
    """The exception of a finished executor future (Parsl apps return theirs wrapped)."""
    if not isinstance(future, Future) or not future.done():
        return None
    exc = future.exception(timeout=0)
    if exc is not None:
        return exc
    value = getattr(future.result(timeout=0), "e_value", None)
    return value if isinstance(value, BaseException) else None


def wrap_submit(executor: Any) -> bool:
    """Make ``executor.submit`` run the app through :class:`~.worker.TrackedCall` for tries the memoizer marked.

    The wrapper is an instance attribute, so the executor's class and other instances are untouched. Returns
    whether the executor is now tracked.
    """
    if getattr(executor, "_metatrail_tracked", False):
        return True
    original = executor.submit

    def submit(func: Any, resource_specification: Any, *args: Any, **kwargs: Any) -> Any:
        item = getattr(_pending, "item", None)
        if item is None:
            return original(func, resource_specification, *args, **kwargs)
        _pending.item = None
        attempt, ctx = item
        try:
            wrapped, tracked_kwargs = tracked(func), {**kwargs, CTX_KEY: ctx}
        except Exception:
            return original(func, resource_specification, *args, **kwargs)
        try:
            future = original(wrapped, resource_specification, *args, **tracked_kwargs)
        except (TypeError, pickle.PicklingError, compat.SerializationError):
            # Serialization fails before anything is queued: if our wrapper was the cause, run the task untracked;
            # if the app itself cannot be serialized, this raises what Parsl would have raised.
            return original(func, resource_specification, *args, **kwargs)
        attempt.mode = "worker"
        return future

    try:
        executor.submit = submit
        executor._metatrail_tracked = True
    except Exception as exc:
        log_once("parsl:wrap-submit", "metatrail: cannot wrap %s.submit (%s); its tasks are recorded from the DFK",
                 type(executor).__name__, exc)
        return False
    return True
