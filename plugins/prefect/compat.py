"""Everything that depends on Prefect's internals, in one module (written and tested against Prefect 3.9).

What we rely on, and what happens when a later Prefect changes it:

* ``prefect.plugins.register_hook`` (public): the hook marker of the ``prefect.plugins`` entry point.
* ``prefect.telemetry.run_telemetry``: ``RunTelemetry`` obtains its tracer through the module-level name
  ``get_tracer`` (``opentelemetry.trace.get_tracer``), once per run, and reports each state change as a span event
  whose attributes carry ``prefect.state.type`` / ``prefect.state.name`` / ``prefect.state.id``. If the module or the
  name disappears, :func:`patch_tracer_factory` returns False and the plugin logs once that it records nothing.
* The run engines (``prefect.task_engine`` / ``prefect.flow_engine``) call the tracer from inside
  ``initialize_run``, where ``self`` is the engine: :func:`find_engine` finds it a few frames up and checks it by
  the attributes we read (``task``/``flow``, ``task_run``/``flow_run``, ``parameters``). Without it we fall back to
  Prefect's run contexts (``TaskRunContext``/``FlowRunContext``), which carry the same objects but not always yet
  (a flow's context is entered after its Running state; a task's context holds its parameters before futures are
  resolved).
* States: ``state.type`` (``StateType``), ``state.name``, ``state.timestamp``, ``state.data`` (a value, an
  exception, or a ``ResultRecord`` whose ``.result`` holds it).
* Task inputs: ``task_run.task_inputs`` maps a parameter name (or ``wait_for`` / ``__parents__``) to ``RunInput``
  objects; those with ``input_type == "task_run"`` name an upstream task run by ``id``.
* Assets: ``task.asset_deps`` (upstream assets), ``MaterializingTask.assets`` (what ``@materialize`` writes), and
  ``AssetContext.upstream_assets`` (assets materialized by upstream tasks), each an ``Asset`` with a URI ``key``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def register_hook(fn: F) -> F:
    """Prefect's ``prefect.plugins`` hook marker (``prefect.plugins.register_hook``)."""
    try:
        from prefect.plugins import register_hook as marker
    except ImportError:  # a Prefect without the public module: the experimental-era marker has the same project name
        import pluggy

        marker = pluggy.HookimplMarker("prefect-experimental")
    marked: F = marker(fn)
    return marked

NOT_FOUND = object()
"""Returned by :func:`state_result` when a state carries no value we can read without I/O."""

_WRAPPED = "_metatrail_wrapped"


@functools.cache
def prefect_version() -> str:
    """The running Prefect's version (read once: every task run records it)."""
    import prefect

    return str(prefect.__version__)


def patch_tracer_factory(wrap: Callable[[Any], Any]) -> bool:
    """Make Prefect's run telemetry obtain its tracer through ``wrap(tracer)``; False if this Prefect has no such
    seam. Idempotent. Only the name inside ``prefect.telemetry.run_telemetry`` changes: OpenTelemetry's global
    provider and every other library's tracers are untouched."""
    from prefect.telemetry import run_telemetry

    original = getattr(run_telemetry, "get_tracer", None)
    if original is None or not hasattr(run_telemetry, "RunTelemetry"):
        return False
    if getattr(original, _WRAPPED, False):
        return True

    def get_tracer(*args: Any, **kwargs: Any) -> Any:
        return wrap(original(*args, **kwargs))

    never_an_engine(run_telemetry.RunTelemetry)  # it starts the run spans that find_engine is called from
    setattr(get_tracer, _WRAPPED, True)
    get_tracer.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(run_telemetry, "get_tracer", get_tracer)  # noqa: B010 (a module attribute we replace on purpose)
    return True


def orchestration_telemetry_enabled() -> bool:
    """Whether Prefect reports runs to OpenTelemetry at all (``PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY``)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().cloud.enable_orchestration_telemetry)


def find_engine(kind: str, max_depth: int = 12) -> Any:
    """The run engine (``kind`` ``task`` or ``flow``) that is starting a span, found in the caller's frames; None if
    not found within ``max_depth`` frames."""
    run_attr = f"{kind}_run"
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        code = frame.f_code
        # Only a method's frame can hold the engine as ``self``: reading ``f_locals`` builds a dict of all the
        # frame's locals, so frames of plain functions (ours among them) are passed over without it, and so are
        # the methods on the way up that are known never to run on an engine (the tracer's, the run telemetry's):
        # the engine's frame is then the only one read, where it was the third of three.
        if code.co_argcount and code.co_varnames[0] == "self" and id(code) not in _never_engine_code_ids:
            candidate = frame.f_locals.get("self")
            if candidate is not None and hasattr(candidate, kind) and hasattr(candidate, run_attr) \
                    and hasattr(candidate, "parameters"):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


# Ids of the code objects of methods whose ``self`` is never a run engine (see find_engine): by id, as hashing a code
# object hashes its whole contents; the code objects are kept, so that their ids stay theirs.
_never_engine_codes: list[Any] = []
_never_engine_code_ids: set[int] = set()


def never_an_engine(*owners: Any) -> None:
    """Declare the methods of classes (or single functions) whose ``self`` is never a run engine, so that
    :func:`find_engine` passes their frames over without reading their locals."""
    for owner in owners:
        functions = vars(owner).values() if isinstance(owner, type) else (owner,)
        for function in functions:
            code = getattr(getattr(function, "__func__", function), "__code__", None)
            if code is not None and id(code) not in _never_engine_code_ids:
                _never_engine_codes.append(code)
                _never_engine_code_ids.add(id(code))


def task_run_context() -> Any:
    """Prefect's current ``TaskRunContext`` (``task``, ``task_run``, ``parameters``) or None."""
    from prefect.context import TaskRunContext

    return TaskRunContext.get()


def flow_run_context() -> Any:
    """Prefect's current ``FlowRunContext`` (``flow``, ``flow_run``, ``parameters``) or None."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get()


def state_type(value: Any) -> str:
    """``StateType.RUNNING`` (or its text) as ``"RUNNING"``."""
    return str(getattr(value, "value", value) or "").upper()


def state_time(state: Any) -> float | None:
    """A state's timestamp as Unix time, or None."""
    stamp = getattr(state, "timestamp", None)
    return stamp.timestamp() if isinstance(stamp, datetime) else None


def state_result(state: Any) -> Any:
    """The value a final state holds in memory (a ``ResultRecord`` unwrapped), or :data:`NOT_FOUND`.

    Never reads result storage: a result that is only persisted stays unread.
    """
    data = getattr(state, "data", None)
    if data is None:
        return NOT_FOUND
    from prefect._internal.result_records import ResultRecord

    if isinstance(data, ResultRecord):
        return data.result
    return data


def engine_return_value(engine: Any) -> Any:
    """What a run engine's function returned (set by Prefect before the Completed state), or :data:`NOT_FOUND`."""
    from prefect.utilities.annotations import NotSet

    value = getattr(engine, "_return_value", NotSet)
    return NOT_FOUND if value is NotSet else value


def state_exception(state: Any) -> BaseException | None:
    """The exception a failed state holds in memory, if any."""
    value = state_result(state)
    return value if isinstance(value, BaseException) else None


def upstream_task_runs(task_inputs: Any) -> dict[str, list[str]]:
    """Upstream task run ids per parameter (and ``wait_for`` / ``__parents__``), from ``task_run.task_inputs``."""
    out: dict[str, list[str]] = {}
    for name, inputs in dict(task_inputs or {}).items():
        ids = sorted({str(i.id) for i in inputs or () if getattr(i, "input_type", None) == "task_run"})
        if ids:
            out[str(name)] = ids
    return out


def asset_keys(assets: Iterable[Any] | None) -> list[str]:
    """The URI keys of Prefect assets (``Asset`` objects or plain keys), sorted."""
    return sorted({str(getattr(a, "key", a)) for a in assets or ()})


def task_assets(task: Any) -> tuple[list[str], list[str]]:
    """``(asset_deps, materialized)`` keys declared on a task (``asset_deps=``, ``@materialize``)."""
    deps, assets = getattr(task, "asset_deps", None), getattr(task, "assets", None)
    if not deps and not assets:  # most tasks
        return [], []
    return asset_keys(deps), asset_keys(assets)


def upstream_assets() -> list[str]:
    """Keys of the assets the running task depends on through its upstream tasks (Prefect's ``AssetContext``)."""
    from prefect.context import AssetContext

    ctx = AssetContext.get()
    if ctx is None:
        return []
    upstream, direct = ctx.upstream_assets, ctx.direct_asset_dependencies
    if not upstream and not direct:  # most tasks
        return []
    return asset_keys(set(upstream) | set(direct))
