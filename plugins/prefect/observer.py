"""Prefect runs as Recorder calls: a flow run is a pipeline run, each try of a task run is an execution.

One observer per run span (:mod:`.tracing` creates it when Prefect opens the span) receives the run's state changes
in the thread that runs it:

* **Task runs.** ``Running`` (or ``Retrying``) starts a try: pipeline = the flow's name, stage = the task's name,
  parameters (futures already resolved by the engine), inputs = parameters naming existing local paths (see
  :mod:`.paths`) plus the task's ``asset_deps``. ``Completed`` / ``Failed`` / ``Crashed`` / ``Cancelled`` end it,
  with outputs = the return value when it names existing local paths plus the ``@materialize`` assets, and, as
  inputs known only then, the assets of upstream tasks. A retry ends the try as failed and starts the next
  (``tryNumber`` = Prefect's ``run_count``). The return value (shortened, see :mod:`.values`), the final state's
  name and the upstream task runs per parameter go in the execution facet's ``extra``.
* **Flow runs.** ``Running`` starts the pipeline run (pipeline = the flow's name), the final state ends it.

Identity: a flow run's OpenLineage run id is Prefect's flow run id; a task run's first try uses Prefect's task run
id (a UUIDv7), later tries ``uuid7_from(start, "prefect:<task run id>:<try>")``, so the same try maps to the same
id in any process. Namespace: the configured one (``METATRAIL_NAMESPACE``/config file), else ``prefect``.

A task running in another process than its flow (process-pool children, workers) records its executions with the
flow run as parent; the flow process records the flow run itself.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from metatrail.config import Settings
from metatrail.logsafe import log_once
from metatrail.model import Execution, PipelineRun, Status, uuid7_from
from metatrail.plugins.prefect import compat
from metatrail.plugins.prefect.paths import local_paths
from metatrail.plugins.prefect.values import safe_mapping, shape
from metatrail.recorder import Recorder, get_recorder

INTEGRATION = "PREFECT"
DEFAULT_NAMESPACE = "prefect"
_FINAL = {"COMPLETED": Status.COMPLETED, "FAILED": Status.FAILED, "CRASHED": Status.FAILED,
          "CANCELLED": Status.ABORTED}

# The Recorder turns this extra key into the execution facet's ``warnings`` (what was stringified or shortened).
WARNINGS = "_warnings"

# How long the Recorder's writer gathers events before it hands them on. A flow's task runs reach it as a steady
# stream from one process; with the Recorder's default (5 ms) the writer woke for nearly every event, and each wake
# (the writer thread, its pickling, the writer process's acknowledgement) took the GIL from the flow's own threads:
# measured on 300 no-op tasks (energy off), its two threads took 0.50 ms CPU and 13 thread switches per task run,
# 0.18 ms and 5 with 50 ms.
# ``flush()`` and the exit flush never wait for it.
WRITER_LINGER_S = 0.05

_flows: dict[str, FlowObserver] = {}
_flows_lock = threading.Lock()


def new_observer(attributes: Mapping[str, Any]) -> TaskObserver | FlowObserver:
    """The observer for a run span that Prefect is opening (``prefect.run.type`` task or flow)."""
    run_id = str(attributes.get("prefect.run.id"))
    if attributes.get("prefect.run.type") == "task":
        return TaskObserver(run_id, compat.find_engine("task"))
    return FlowObserver(run_id, compat.find_engine("flow"))


def recorder() -> Recorder:
    """The process-wide Recorder, its writer set to gather at least :data:`WRITER_LINGER_S` of events per batch."""
    rec = get_recorder()
    if rec.linger_s < WRITER_LINGER_S:
        rec.linger_s = WRITER_LINGER_S
    return rec


def namespace() -> str:
    """The configured namespace, or ``prefect`` when none is configured."""
    try:
        configured = get_recorder().settings.namespace
    except Exception:  # a broken config file: the Recorder says so itself on its first write
        return DEFAULT_NAMESPACE
    return configured if configured != Settings.namespace else DEFAULT_NAMESPACE


def pipeline_run_for(flow_ctx: Any) -> PipelineRun | None:
    """The pipeline run of the flow run in ``flow_ctx``: the one this process records, started if need be, or a
    reference to one recorded by another process."""
    flow_run = getattr(flow_ctx, "flow_run", None)
    flow = getattr(flow_ctx, "flow", None)
    if flow_run is None or flow is None:
        return None
    run_id = str(flow_run.id)
    with _flows_lock:
        owner = _flows.get(run_id)
    if owner is not None:
        return owner.ensure_started(flow, flow_run, flow_ctx.parameters)
    _bound_exit()
    return PipelineRun(id=run_id, pipeline=str(flow.name), namespace=namespace(), integration=INTEGRATION)


def _bound_exit() -> None:
    """This process runs task runs of a flow run that another process runs (a process pool's child): that flow ends
    only once this process has exited, so its exit waits for the store at most ``timeout``, then hands what is left
    to a writer process of its own (:meth:`~metatrail.recorder.Recorder.hand_off_at_exit`)."""
    try:
        rec = get_recorder()
        rec.hand_off_at_exit(rec.settings.timeout)
    except Exception as exc:  # a config error: the Recorder reports it itself; the exit then waits as usual
        log_once(f"prefect-exit:{type(exc).__name__}", "metatrail: %s: %s", type(exc).__name__, exc)


def _state_of(run: Any, attributes: Mapping[str, Any]) -> Any:
    # The engine sets ``run.state`` before reporting it; check the id so that a state from elsewhere is never used.
    state = getattr(run, "state", None)
    if state is not None and str(getattr(state, "id", "")) == str(attributes.get("prefect.state.id")):
        return state
    return None


def _put_return_value(extra: dict[str, Any], value: Any, warnings: list[str] | None = None) -> None:
    """The shaped return value into ``extra``; when it was changed, ``warnings`` (the run's own, default those in
    ``extra``) with the reason added."""
    extra["return_value"], why = shape(value)
    if why is not None:
        known = extra.get(WARNINGS, ()) if warnings is None else warnings
        extra[WARNINGS] = [*known, f"return value ({type(value).__name__}) is {why}"]


def _error(exception: BaseException | None, state: Any, attributes: Mapping[str, Any]) -> BaseException | str:
    return (exception or compat.state_exception(state) or str(attributes.get("prefect.state.message") or "")
            or str(attributes.get("prefect.state.name") or "failed"))


class TaskObserver:
    """Turns one task run's state changes into one execution per try."""

    def __init__(self, run_id: str, engine: Any) -> None:
        self.run_id = run_id
        self._engine = weakref.ref(engine) if engine is not None else None
        self._current: Execution | None = None
        self._declared: set[str] = set()
        self._materialized: list[str] = []
        self._exception: BaseException | None = None
        self._tries = 0

    def _view(self) -> tuple[Any, Any, Mapping[str, Any]]:
        engine = self._engine() if self._engine is not None else None
        if engine is not None:
            return engine.task, engine.task_run, engine.parameters or {}
        ctx = compat.task_run_context()
        if ctx is not None and str(ctx.task_run.id) == self.run_id:
            return ctx.task, ctx.task_run, ctx.parameters or {}
        return None, None, {}

    def on_state(self, attributes: Mapping[str, Any]) -> None:
        """A state change of the task run (a span event)."""
        kind = compat.state_type(attributes.get("prefect.state.type"))
        task, task_run, params = self._view()
        state = _state_of(task_run, attributes)
        at = compat.state_time(state) or time.time()
        name = str(attributes.get("prefect.state.name") or kind.title())
        if kind == "RUNNING":
            if self._current is not None:  # Retrying: the previous try failed
                self._finish(Status.FAILED, name, at, error=_error(self._exception, None, attributes))
            self._start(task, task_run, params, at)
        elif kind in _FINAL:
            if self._current is None:
                if kind == "CANCELLED":
                    return  # cancelled before it ran: no execution happened
                self._start(task, task_run, params, at)  # final without Running (e.g. served from cache)
            status = _FINAL[kind]
            error = _error(self._exception, state, attributes) if status is not Status.COMPLETED else None
            self._finish(status, name, at, error=error, task=task, state=state)
        elif kind == "SCHEDULED" and self._current is not None:  # AwaitingRetry: the try failed, the next waits
            self._finish(Status.FAILED, name, at, error=_error(self._exception, None, attributes))

    def on_exception(self, exception: BaseException) -> None:
        """The engine recorded an exception; it belongs to the try in progress."""
        self._exception = exception

    def on_end(self) -> None:
        """The span ended; a try still open ended without a final state."""
        if self._current is not None:
            self._finish(Status.FAILED, "Ended", time.time(),
                         error=self._exception or "the task run ended without a final state")

    def _start(self, task: Any, task_run: Any, params: Mapping[str, Any], at: float) -> None:
        self._tries += 1
        try_number = int(getattr(task_run, "run_count", 0) or 0) or self._tries
        task_run_id = str(getattr(task_run, "id", None) or self.run_id)
        execution_id = task_run_id if try_number == 1 else uuid7_from(at, f"prefect:{task_run_id}:{try_number}")
        stage = str(getattr(task, "name", None) or getattr(task_run, "name", "task"))
        pipeline_run = pipeline_run_for(compat.flow_run_context())
        deps, self._materialized = compat.task_assets(task)
        inputs = local_paths(params.values()) + deps
        self._declared = set(inputs)
        warnings: list[str] = []
        shaped = safe_mapping(params, warnings)
        extra: dict[str, Any] = {
            "prefect_task_run_id": task_run_id,
            "task_run_name": getattr(task_run, "name", None),
            "tags": sorted(str(t) for t in getattr(task_run, "tags", None) or ()),
            "upstream": compat.upstream_task_runs(getattr(task_run, "task_inputs", None)),
        }
        if warnings:
            extra[WARNINGS] = warnings
        self._exception = None
        self._current = recorder().execution_started(
            pipeline_run.pipeline if pipeline_run else stage, stage, pipeline_run=pipeline_run,
            execution_id=execution_id, inputs=inputs, params=shaped, integration=INTEGRATION,
            namespace=pipeline_run.namespace if pipeline_run else namespace(), started_at=at,
            try_number=try_number, integration_version=compat.prefect_version(), extra=extra)

    def _finish(self, status: Status, state_name: str, at: float, *, error: BaseException | str | None = None,
                task: Any = None, state: Any = None) -> None:
        execution, self._current, self._exception = self._current, None, None
        if execution is None:
            return
        # The end-only fields go to the Recorder as ``extra``, added to this try's handle, which is dropped next: the
        # START event keeps its own extra, as the Recorder recorded a snapshot of the handle then.
        extra: dict[str, Any] = {"state": state_name}
        outputs: list[str] = []
        late_inputs: list[str] = []
        if status is Status.COMPLETED:
            result = compat.state_result(state) if state is not None else compat.NOT_FOUND
            if result is not compat.NOT_FOUND:
                _put_return_value(extra, result, execution.extra.get(WARNINGS))
                outputs = local_paths([result])
            outputs += self._materialized
            late_inputs = [k for k in compat.upstream_assets() if k not in self._declared]
        recorder().execution_finished(execution, outputs=outputs, inputs=late_inputs, status=status, error=error,
                                      ended_at=at, extra=extra)


class FlowObserver:
    """Turns one flow run into one pipeline run."""

    def __init__(self, run_id: str, engine: Any) -> None:
        self.run_id = run_id
        self._engine = weakref.ref(engine) if engine is not None else None
        self.run: PipelineRun | None = None
        self._started_at: float | None = None
        self._exception: BaseException | None = None
        self._finished = False
        self._lock = threading.Lock()
        parent = compat.flow_run_context()  # the enclosing flow, for a subflow
        parent_run = getattr(parent, "flow_run", None)
        self._parent_id = str(parent_run.id) if parent_run is not None and str(parent_run.id) != run_id else None
        with _flows_lock:
            _flows[run_id] = self

    def _view(self) -> tuple[Any, Any, Mapping[str, Any], Any]:
        engine = self._engine() if self._engine is not None else None
        if engine is not None:
            return engine.flow, engine.flow_run, engine.parameters or {}, engine
        ctx = compat.flow_run_context()
        if ctx is not None and ctx.flow_run is not None and str(ctx.flow_run.id) == self.run_id:
            return ctx.flow, ctx.flow_run, ctx.parameters or {}, None
        return None, None, {}, None

    def on_state(self, attributes: Mapping[str, Any]) -> None:
        """A state change of the flow run (a span event)."""
        if self._finished:
            return
        kind = compat.state_type(attributes.get("prefect.state.type"))
        flow, flow_run, params, engine = self._view()
        state = _state_of(flow_run, attributes)
        at = compat.state_time(state) or time.time()
        if kind == "RUNNING":
            if self._started_at is None:
                self._started_at = at
            if flow is not None:
                self.ensure_started(flow, flow_run, params)
        elif kind in _FINAL:
            status = _FINAL[kind]
            result = compat.NOT_FOUND
            if status is Status.COMPLETED:
                result = compat.engine_return_value(engine) if engine is not None else compat.NOT_FOUND
                if result is compat.NOT_FOUND and state is not None:
                    result = compat.state_result(state)
            error = _error(self._exception, state, attributes) if status is not Status.COMPLETED else None
            self._finish(status, str(attributes.get("prefect.state.name") or kind.title()), at,
                         flow=flow, flow_run=flow_run, params=params, result=result, error=error)

    def on_exception(self, exception: BaseException) -> None:
        """The engine recorded an exception for this flow run."""
        self._exception = exception

    def on_end(self) -> None:
        """The span ended: the flow run is over (its final state was seen, or it never came)."""
        if not self._finished and self.run is not None:
            flow, flow_run, params, _ = self._view()
            self._finish(Status.FAILED, "Ended", time.time(), flow=flow, flow_run=flow_run, params=params,
                         result=compat.NOT_FOUND,
                         error=self._exception or "the flow run ended without a final state")
        with _flows_lock:
            _flows.pop(self.run_id, None)

    def ensure_started(self, flow: Any, flow_run: Any, params: Mapping[str, Any]) -> PipelineRun:
        """Record the pipeline run's start once (from the flow thread or the first task to run); its handle."""
        with self._lock:
            if self.run is None:
                extra: dict[str, Any] = {
                    "flow_run_name": getattr(flow_run, "name", None),
                    "tags": sorted(str(t) for t in getattr(flow_run, "tags", None) or ()),
                }
                warnings: list[str] = []
                shaped = safe_mapping(params, warnings)
                if warnings:
                    extra[WARNINGS] = warnings
                if self._parent_id is not None:
                    extra["parent_flow_run_id"] = self._parent_id
                    extra["parent_task_run_id"] = str(getattr(flow_run, "parent_task_run_id", None) or "") or None
                self.run = recorder().pipeline_run_started(
                    str(flow.name), namespace=namespace(), integration=INTEGRATION, run_id=self.run_id,
                    params=shaped, integration_version=compat.prefect_version(),
                    started_at=self._started_at or time.time(), extra=extra)
            return self.run

    def _finish(self, status: Status, state_name: str, at: float, *, flow: Any, flow_run: Any,
                params: Mapping[str, Any], result: Any, error: BaseException | str | None) -> None:
        self._finished = True
        with _flows_lock:
            _flows.pop(self.run_id, None)
        if self.run is None:
            if flow is None:  # failed before its body ran (e.g. invalid parameters) and Prefect showed no flow
                flow = getattr(compat.flow_run_context(), "flow", None)
            if flow is None:
                return
            self.ensure_started(flow, flow_run, params)
        assert self.run is not None
        extra = {**self.run.extra, "state": state_name}
        run_count = getattr(flow_run, "run_count", None)
        if isinstance(run_count, int) and run_count > 1:
            extra["run_count"] = run_count
        if result is not compat.NOT_FOUND:
            _put_return_value(extra, result)
        recorder().pipeline_run_finished(dataclasses.replace(self.run, extra=extra), status=status,
                                         error=error, ended_at=at)
