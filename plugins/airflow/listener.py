"""The Airflow listener: task-instance and DAG-run hooks, translated into Recorder calls.

Where each hook runs (Airflow 3, see ``shared/reference/workflow-managers.md`` §2.2):

* ``on_task_instance_running/success/failed/skipped`` run in the **task's own process** (the task runner), around
  the task's code: that is where energy is attributed (``pid=os.getpid()``) and where the rendered task, its
  arguments, its return value and the hook-lineage collector can be seen. The runner may end the process with
  ``os._exit``, so the end hooks flush the Recorder (bounded).
* ``on_dag_run_running/success/failed`` run in the **scheduler** (``airflow dags test`` calls only the end hooks,
  in its one process); ``on_task_instance_failed/success`` also run there and in the API server, with an ORM
  ``TaskInstance``, when a task died without reporting or a user marked it.

Ids are derived from Airflow's identity (:mod:`.adapter`), so all these processes agree without talking.

Containment, in every hook: ``METATRAIL_DISABLED`` and ``[metatrail] disabled`` are checked first; the body runs
under a hard time cap (:class:`.guard.BoundedCaller`, no fork; while an earlier body overruns, start hooks are
skipped and end hooks queued behind it, so a try's terminal state is still recorded); any failure is logged once and
the hook returns normally; nothing the task sees is changed (the one addition, a post-execute hook that keeps a
TaskFlow task's return value, calls the task's own hook and is removed when the try ends).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from metatrail.boundedcall import BoundedCaller, WhenBusy
from metatrail.config import is_disabled
from metatrail.logsafe import log_once
from metatrail.model import ArtifactRef, Execution, PipelineRun, Status
from metatrail.plugins.airflow import adapter, compat
from metatrail.plugins.airflow.config import PluginConfig, plugin_config

hookimpl = compat.hookimpl()
TryKey = tuple[str, str, str, int, int]
SHORT_FLUSH = 0.1  # seconds a flush may wait once one has run out in this process
# DagRun columns read from the ORM instance's __dict__: never a lazy load, so never a query on the scheduler's
# session from our thread.
DAG_RUN_FIELDS = ("dag_id", "run_id", "logical_date", "run_after", "start_date", "end_date", "conf", "clear_number",
                  "run_type")
TI_FIELDS = ("dag_id", "run_id", "task_id", "map_index", "try_number", "start_date", "end_date", "id", "state")


@dataclasses.dataclass
class _Try:
    """What the running hook left for the end hook of the same task-instance try."""

    execution: Execution
    inputs: list[str | ArtifactRef]
    marks: adapter.LineageMarks | None = None
    task: Any = None
    returned: list[Any] = dataclasses.field(default_factory=list)
    capture: Any = None
    original_hook: Any = None


def _loaded(obj: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The already-loaded values of an ORM instance (no query); plain attributes for other objects."""
    state = getattr(obj, "__dict__", {})
    if "_sa_instance_state" in state:
        return {name: state.get(name) for name in fields}
    return {name: getattr(obj, name, None) for name in fields}


def _state_name(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


class MetatrailListener:
    """Airflow listener recording DAG runs and task-instance tries (module docstring)."""

    def __init__(self) -> None:
        self._guard = BoundedCaller()
        self._lock = threading.Lock()
        self._tries: dict[TryKey, _Try] = {}
        self._recorder: Any = None
        self._runs_started: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._store_lagging = False
        self._task_runner_pid: int | None = None
        self._exit_drain_pid: int | None = None
        self._handed_off_pid: int | None = None  # a task runner that gave its pending events to a writer process
        #: (hook name, seconds spent in the hook) for the last hooks called in this process; benchmarks read it.
        self.timings: collections.deque[tuple[str, float]] = collections.deque(maxlen=100_000)

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _recorder_for(self, cfg: PluginConfig) -> Any:
        if self._recorder is None:
            with self._lock:
                if self._recorder is None:
                    from metatrail.recorder import Recorder

                    self._recorder = Recorder(settings=cfg.settings)
        return self._recorder

    def _hook(self, what: str, body: Callable[[PluginConfig], None], *, end: bool = False,
              flush: bool = False) -> None:
        """Run ``body`` under the guard unless recording is off; never raises ``Exception`` into Airflow.

        An ``end`` hook is never dropped while an earlier hook overruns its cap: it is queued behind it (its state
        is the one that must be recorded). Where the process ends after this hook (``flush``), it is also waited
        for, up to the cap: the queue dies with the process.
        """
        started = time.perf_counter()
        try:
            if is_disabled():
                return
            cfg = plugin_config()
            if cfg.disabled or not compat.is_supported():
                return
            if not self._guard.call(what, lambda: body(cfg), cfg.hook_timeout, _when_busy(end, flush)) and end:
                self._drain_at_exit(cfg)
            if flush:
                # The task runner may leave with os._exit: make this try's events durable now, bounded.
                self._flush(cfg)
        except Exception as exc:
            log_once(f"{what}:{type(exc).__name__}", "metatrail: %s failed (%s: %s); the task is not affected",
                     what, type(exc).__name__, exc)
        finally:
            self.timings.append((what, time.perf_counter() - started))

    def _drain_at_exit(self, cfg: PluginConfig) -> None:
        """Once per process: at exit, give hooks still queued behind a stuck one one more cap to run (the worker is
        a daemon thread, and ``airflow dags test`` ends right after the DAG run's end hook)."""
        with self._lock:
            if self._exit_drain_pid == os.getpid():
                return
            self._exit_drain_pid = os.getpid()
        from metatrail.exithook import at_exit

        at_exit(lambda: self._guard.drain(cfg.hook_timeout))

    # -- task instances -------------------------------------------------------------------------------------------
    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        """A task-instance try starts (task process, right before the task's code)."""
        if compat.is_runtime_task_instance(task_instance):
            self._hook("on_task_instance_running", lambda cfg: self._started(cfg, task_instance))

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        """A try succeeded (task process; or API server when a user marks it)."""
        self._end("on_task_instance_success", task_instance, Status.COMPLETED, None)

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any = None) -> None:
        """A try failed or will be retried (task process; or scheduler/API server)."""
        self._end("on_task_instance_failed", task_instance, Status.FAILED, error)

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        """A try skipped itself while running (Airflow 3.2+): recorded as completed, state ``skipped``."""
        self._end("on_task_instance_skipped", task_instance, Status.COMPLETED, None, skipped=True)

    def _flush(self, cfg: PluginConfig) -> None:
        """Wait (bounded) until this process's events are stored. Once a wait has run out, later waits are short
        until one succeeds: a stuck store costs one ``timeout``, not one per task (the exit flush still tries)."""
        recorder = self._recorder
        if recorder is None or cfg.settings is None or not recorder.pending:
            return
        timeout = SHORT_FLUSH if self._store_lagging else cfg.settings.timeout
        self._store_lagging = not recorder.flush(timeout)
        if self._store_lagging and self._in_task_runner() and recorder.pending and \
                self._handed_off_pid != os.getpid():
            self._handed_off_pid = os.getpid()
            # The task runner ends with os._exit: what is still being stored here (a large output being hashed)
            # would die with it. A writer process of its own stores it after this process has gone.
            handed = recorder.hand_off()
            log_once("flush-timeout", "metatrail: events not yet stored after %.1fs; %s", timeout,
                     "handed to a writer process that stores them after this task process ends" if handed else
                     "they are lost if this task process ends now")
        elif self._store_lagging:
            log_once("flush-timeout", "metatrail: events not yet stored after %.1fs; they are written on exit if "
                     "the process lives that long (flush_timeout)", timeout)

    @hookimpl
    def on_starting(self, component: Any) -> None:
        """An Airflow component starts; a task runner says so, ``airflow dags test`` does not (§2.2)."""
        if _is_task_runner(component):
            self._task_runner_pid = os.getpid()

    @hookimpl
    def before_stopping(self, component: Any) -> None:
        """An Airflow component stops (a task runner after each try, the scheduler, …): store what is pending,
        bounded. ``airflow dags test`` also calls it after each try, in its one long-lived process: no wait there."""
        if self._recorder is None or is_disabled():
            return
        started = time.perf_counter()
        try:
            if not self._in_task_runner():
                self._set_aside_passes_that_left()
            if not _is_task_runner(component) or self._in_task_runner():
                self._flush(plugin_config())
        except Exception as exc:
            log_once(f"before_stopping:{type(exc).__name__}", "metatrail: flush at stop failed: %s", exc)
        finally:
            self.timings.append(("before_stopping", time.perf_counter() - started))

    def _set_aside_passes_that_left(self) -> None:
        """Under ``airflow dags test``: a try still open when its pass stops left without an end hook (deferred, or a
        sensor rescheduled) and comes back later in this process. Its energy metering ends now, so that tasks run
        meanwhile do not share their CPU time with it; its record stays, for the resumed pass's start. (A task
        runner's process ends instead.)"""
        recorder = self._recorder
        with self._lock:
            left = list(self._tries.values())
        for record in left:
            recorder.execution_set_aside(record.execution)

    def _in_task_runner(self) -> bool:
        """True in a task-runner process (one task try, may end with ``os._exit``); false under ``dags test``,
        whose process lives on after each task and flushes at exit."""
        return self._task_runner_pid == os.getpid()

    def _end(self, what: str, task_instance: Any, status: Status, error: Any, *, skipped: bool = False) -> None:
        if compat.is_runtime_task_instance(task_instance):
            # Behind a stuck hook this one runs late, maybe while the next task of `dags test` adds hook lineage:
            # mark where this try's lineage ends now.
            until = self._lineage_marks_now() if self._guard.busy else None
            self._hook(what, lambda cfg: self._finished(cfg, task_instance, status, error, skipped, until), end=True,
                       flush=self._in_task_runner())
        else:
            # Scheduler / API server: read the ORM values here, in Airflow's thread, without a query.
            snapshot = _loaded(task_instance, TI_FIELDS)
            dag_run = getattr(task_instance, "__dict__", {}).get("dag_run")
            run_values = _loaded(dag_run, DAG_RUN_FIELDS) if dag_run is not None else None
            self._hook(what, lambda cfg: self._finished_elsewhere(cfg, snapshot, run_values, status, error),
                       end=True)

    @staticmethod
    def _lineage_marks_now() -> adapter.LineageMarks | None:
        try:
            return adapter.lineage_marks(compat.hook_lineage_collector())
        except Exception as exc:
            log_once(f"lineage-marks:{type(exc).__name__}", "metatrail: hook lineage unavailable: %s", exc)
            return None

    @staticmethod
    def _hook_lineage(marks: adapter.LineageMarks, until: adapter.LineageMarks | None,
                      ) -> tuple[list[str | ArtifactRef], list[str | ArtifactRef]]:
        """What this try's hooks reported to Airflow's collector; says once when the collector is full."""
        collector = compat.hook_lineage_collector()
        end = until if until is not None else adapter.lineage_marks(collector)
        limit = compat.hook_lineage_limit()
        if adapter.lineage_is_full(end, limit):
            # The collector takes no entry past its limit and counts no further access (airflow.sdk.lineage); under
            # `dags test` one collector serves every task of the process.
            log_once("hook-lineage-full", "metatrail: Airflow's hook-lineage collector holds its limit of %s inputs "
                     "or outputs ([lineage] max_assets_per_collector); Airflow drops datasets that hooks report "
                     "after that, so they are not recorded. Under `airflow dags test` the limit counts every task "
                     "of the run: raise it there", limit)
        return adapter.lineage_since(collector, marks, end)

    @staticmethod
    def _key(ti: Any) -> TryKey:
        map_index = ti.map_index if ti.map_index is not None else -1
        return (ti.dag_id, ti.run_id, ti.task_id, int(ti.try_number), int(map_index))

    @staticmethod
    def _dag_run_of(ti: Any) -> Any:
        context = getattr(ti, "_ti_context_from_server", None)
        return getattr(context, "dag_run", None)

    def _pipeline_run(self, cfg: PluginConfig, dag_id: str, run_id: str, dag_run: Any) -> PipelineRun:
        anchor = adapter.run_anchor(dag_run)
        clear = getattr(dag_run, "clear_number", 0) if dag_run is not None else 0
        return PipelineRun(id=adapter.pipeline_run_id(dag_id, run_id, anchor, clear), pipeline=dag_id,
                           namespace=cfg.namespace, integration=adapter.INTEGRATION,
                           started_at=adapter.timestamp(getattr(dag_run, "start_date", None)) or time.time())

    def _execution_id(self, ti: Any, dag_run: Any) -> str:
        return adapter.execution_id(ti.dag_id, ti.run_id, ti.task_id, int(ti.try_number), ti.map_index,
                                    adapter.run_anchor(dag_run))

    @staticmethod
    def _extra(ti: Any, task: Any, dag_run: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {"airflowRunId": ti.run_id, "operator": adapter.operator_name(task),
                                 "taskInstanceId": str(ti.id)}
        if ti.map_index is not None and ti.map_index >= 0:
            extra["mapIndex"] = ti.map_index
        if (run_type := _state_name(getattr(dag_run, "run_type", None))) is not None:
            extra["runType"] = run_type
        return extra

    def _started(self, cfg: PluginConfig, ti: Any) -> None:
        task = ti.task
        dag_run = self._dag_run_of(ti)
        context = getattr(ti, "_cached_template_context", None)
        params = adapter.task_params(task, params=adapter.resolved_params(context, task),
                                     conf=getattr(dag_run, "conf", None), redact=compat.redactor())
        decorated = self._is_decorated(task)
        inputs = adapter.declared_artifacts(getattr(task, "inlets", None))
        if decorated:
            inputs = adapter.dedupe([*inputs, *adapter.local_paths(adapter.call_arguments(task))])
        started_at = adapter.timestamp(ti.start_date)
        recorder = self._recorder_for(cfg)
        with self._lock:
            earlier = self._tries.pop(self._key(ti), None)
        if earlier is not None:
            # This try already started in this process and left without ending (deferred, or a sensor rescheduled):
            # it resumes here (`airflow dags test` runs every pass in its one process). Still one execution, started
            # when its first pass did; the first pass's energy registration ends here, as its process would.
            started_at = earlier.execution.started_at
            self._release(earlier)
            recorder.execution_set_aside(earlier.execution)
        execution = recorder.execution_started(
            ti.dag_id, ti.task_id, pipeline_run=self._pipeline_run(cfg, ti.dag_id, ti.run_id, dag_run),
            execution_id=self._execution_id(ti, dag_run), inputs=inputs, params=params,
            integration=adapter.INTEGRATION, namespace=cfg.namespace, started_at=started_at,
            try_number=int(ti.try_number), integration_version=compat.airflow_version(),
            extra=self._extra(ti, task, dag_run), pid=os.getpid())
        record = _Try(execution=execution, inputs=inputs, task=task, marks=self._lineage_marks_now())
        if decorated:
            self._capture_return_value(record)
        with self._lock:
            self._tries[self._key(ti)] = record

    @staticmethod
    def _is_decorated(task: Any) -> bool:
        base = compat.decorated_operator_base()
        return base is not None and isinstance(task, base)

    @staticmethod
    def _capture_return_value(record: _Try) -> None:
        """Chain a post-execute hook that keeps the task's return value (a TaskFlow task's outputs are often it)."""
        task = record.task
        if not hasattr(task, "_post_execute_hook"):
            log_once("no-post-execute-hook", "metatrail: this Airflow has no per-task post-execute hook; TaskFlow "
                     "return values are not inspected for output paths")
            return
        original = task._post_execute_hook
        kept = record.returned

        if original is not None and inspect.isgeneratorfunction(original):
            # Airflow drives generator hooks itself (yielded Metadata); ours must stay a generator to keep that.
            def capture(context: Any, result: Any) -> Any:
                kept.append(result)
                return (yield from original(context, result))
        else:
            def capture(context: Any, result: Any) -> Any:
                kept.append(result)
                return original(context, result) if original is not None else None

        record.original_hook, record.capture = original, capture
        task._post_execute_hook = capture

    @staticmethod
    def _release(record: _Try) -> None:
        # Put the task's own hook back, unless something else replaced ours meanwhile.
        if record.capture is not None and getattr(record.task, "_post_execute_hook", None) is record.capture:
            record.task._post_execute_hook = record.original_hook

    def _finished(self, cfg: PluginConfig, ti: Any, status: Status, error: Any, skipped: bool,
                  until: adapter.LineageMarks | None = None) -> None:
        with self._lock:
            record = self._tries.pop(self._key(ti), None)
        task = ti.task
        dag_run = self._dag_run_of(ti)
        if record is None:
            # The running hook was skipped or overran: still record the end, under the same derived id.
            execution = Execution(id=self._execution_id(ti, dag_run), pipeline=ti.dag_id, stage=ti.task_id,
                                  namespace=cfg.namespace, integration=adapter.INTEGRATION,
                                  pipeline_run_id=self._pipeline_run(cfg, ti.dag_id, ti.run_id, dag_run).id,
                                  started_at=adapter.timestamp(ti.start_date) or time.time(),
                                  try_number=int(ti.try_number), host_version=compat.airflow_version(),
                                  extra=self._extra(ti, task, dag_run))
            record = _Try(execution=execution, inputs=[])
        self._release(record)
        new_inputs: list[str | ArtifactRef] = []
        outputs: list[str | ArtifactRef] = []
        lineage_outputs: list[str | ArtifactRef] = []
        if record.marks is not None:
            new_inputs, lineage_outputs = self._hook_lineage(record.marks, until)
        if status is Status.COMPLETED and not skipped:
            context = getattr(ti, "_cached_template_context", None)
            # Returned paths are outputs even when they were also inputs: the task updated them in place.
            returned = adapter.local_paths(record.returned)
            outputs = adapter.dedupe([*adapter.declared_artifacts(getattr(task, "outlets", None)), *lineage_outputs,
                                      *adapter.alias_outputs(context), *returned])
        known = adapter.dedupe(record.inputs)
        new_inputs = adapter.dedupe([*known, *new_inputs])[len(known):]
        state = "skipped" if skipped else _state_name(getattr(ti, "state", None))
        # A copy: the START event may still be waiting to be built from the original handle.
        finish = dataclasses.replace(record.execution, extra={**record.execution.extra, "airflowState": state})
        self._recorder_for(cfg).execution_finished(
            finish, outputs=outputs, inputs=new_inputs, status=status,
            error=adapter.error_text(error, compat.redactor()),
            ended_at=adapter.timestamp(getattr(ti, "end_date", None)) or time.time())

    def _finished_elsewhere(self, cfg: PluginConfig, ti: Mapping[str, Any], run_values: Mapping[str, Any] | None,
                            status: Status, error: Any) -> None:
        """A task instance ended outside its task process (died unreported, or marked by a user)."""
        if run_values is None or not ti.get("dag_id") or ti.get("try_number") is None:
            log_once("ti-elsewhere", "metatrail: a task-instance state change outside the task process could not "
                     "be identified (its DAG run was not loaded); not recorded")
            return
        dag_run = _Values(run_values)
        run = self._pipeline_run(cfg, ti["dag_id"], ti["run_id"], dag_run)
        map_index = ti.get("map_index")
        execution = Execution(
            id=adapter.execution_id(ti["dag_id"], ti["run_id"], ti["task_id"], int(ti["try_number"]), map_index,
                                    adapter.run_anchor(dag_run)),
            pipeline=ti["dag_id"], stage=ti["task_id"], namespace=cfg.namespace, integration=adapter.INTEGRATION,
            pipeline_run_id=run.id, started_at=adapter.timestamp(ti.get("start_date")) or time.time(),
            try_number=int(ti["try_number"]), host_version=compat.airflow_version(),
            extra={"airflowRunId": ti["run_id"], "airflowState": _state_name(ti.get("state")),
                   "reportedOutsideTask": True})
        if map_index is not None and map_index >= 0:
            execution.extra["mapIndex"] = map_index
        self._recorder_for(cfg).execution_finished(
            execution, status=status, error=adapter.error_text(error, compat.redactor()),
            ended_at=adapter.timestamp(ti.get("end_date")) or time.time())

    # -- DAG runs -------------------------------------------------------------------------------------------------
    @hookimpl
    def on_dag_run_running(self, dag_run: Any, msg: str) -> None:
        """A DAG run starts (scheduler)."""
        values = _loaded(dag_run, DAG_RUN_FIELDS)
        self._hook("on_dag_run_running", lambda cfg: self._run_started(cfg, _Values(values)))

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        """A DAG run succeeded (scheduler; the ``airflow dags test`` process)."""
        values = _loaded(dag_run, DAG_RUN_FIELDS)
        self._hook("on_dag_run_success", lambda cfg: self._run_ended(cfg, _Values(values), Status.COMPLETED, None),
                   end=True)

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        """A DAG run failed (scheduler; the ``airflow dags test`` process); ``msg`` is Airflow's reason."""
        values = _loaded(dag_run, DAG_RUN_FIELDS)
        self._hook("on_dag_run_failed",
                   lambda cfg: self._run_ended(cfg, _Values(values), Status.FAILED, msg or "DAG run failed"),
                   end=True)

    def _run_handle(self, cfg: PluginConfig, dag_run: _Values) -> PipelineRun:
        run = self._pipeline_run(cfg, dag_run.dag_id, dag_run.run_id, dag_run)
        run.extra = {"airflowRunId": dag_run.run_id}
        if (run_type := _state_name(dag_run.run_type)) is not None:
            run.extra["runType"] = run_type
        conf = dag_run.conf if isinstance(dag_run.conf, Mapping) else {}
        from metatrail.recorder import safe_params

        run.params = safe_params(adapter.task_params(None, params=None, conf=conf, redact=compat.redactor()))
        run.host_version = compat.airflow_version()
        return run

    def _run_started(self, cfg: PluginConfig, dag_run: _Values) -> None:
        run = self._run_handle(cfg, dag_run)
        self._start_run(cfg, run)
        with self._lock:
            self._runs_started[run.id] = None
            while len(self._runs_started) > 10_000:  # a scheduler lives for months; forget the oldest
                self._runs_started.popitem(last=False)

    def _start_run(self, cfg: PluginConfig, run: PipelineRun) -> None:
        self._recorder_for(cfg).pipeline_run_started(
            run.pipeline, namespace=run.namespace, integration=run.integration, run_id=run.id, params=run.params,
            integration_version=run.host_version, started_at=run.started_at, extra=run.extra)

    def _run_ended(self, cfg: PluginConfig, dag_run: _Values, status: Status, error: str | None) -> None:
        run = self._run_handle(cfg, dag_run)
        with self._lock:
            seen = run.id in self._runs_started
            self._runs_started.pop(run.id, None)
        if not seen:
            # `airflow dags test` never calls on_dag_run_running, and a restarted scheduler missed it: START first.
            self._start_run(cfg, run)
        self._recorder_for(cfg).pipeline_run_finished(
            run, status=status, error=error, ended_at=adapter.timestamp(dag_run.end_date) or time.time())


def _when_busy(end: bool, flush: bool) -> WhenBusy:
    """A start hook run late would record the wrong inputs: skipped. An end hook carries the try's state: queued,
    and waited for where the process ends right after it (``flush``)."""
    if not end:
        return WhenBusy.SKIP
    return WhenBusy.QUEUE_AND_WAIT if flush else WhenBusy.QUEUE


def _is_task_runner(component: Any) -> bool:
    return type(component).__name__ == "TaskRunnerMarker"


class _Values:
    """Attribute access over a dict of values captured from an ORM object (missing names read as None)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        return None
