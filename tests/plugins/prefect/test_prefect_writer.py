"""How the plugin hands its events on: a flow's events are gathered into batches by the Recorder's writer (a longer
linger than the Recorder's default, never a shorter one), and every event is still stored; the run engine is found
in the caller's frames without reading the locals of plain functions, nor of the methods on the way that are known
never to run on an engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect_flows import etl

from metatrail import get_recorder
from metatrail import recorder as recorder_module
from metatrail.plugins.prefect import compat, observer
from metatrail.recorder import WRITE_LINGER_S, Recorder

Events = Callable[[], list[dict[str, Any]]]


def test_flow_events_are_gathered_and_all_stored(tmp_path: Path, events: Events) -> None:
    assert get_recorder().linger_s == WRITE_LINGER_S < observer.WRITER_LINGER_S
    assert etl(str(tmp_path))["rows"] == 3
    assert get_recorder().linger_s == observer.WRITER_LINGER_S
    assert len(events()) == 10  # the flow run, extract, transform, and load's two tries: START and end of each


def test_a_longer_linger_is_kept(tmp_path: Path, events: Events) -> None:
    recorder_module._recorder = Recorder(linger_s=0.5)
    assert etl(str(tmp_path))["rows"] == 3
    assert get_recorder().linger_s == 0.5
    assert len(events()) == 10


class _Engine:
    """Has what find_engine checks for: ``task``, ``task_run`` and ``parameters``."""

    task = task_run = object()
    parameters: dict[str, Any] = {}

    def initialize_run(self) -> Any:
        return _plain_function()


def _plain_function() -> Any:
    self = "a plain function's local named self is not an engine"  # noqa: F841 (read through the frame, if at all)
    return _tracer_side()


def _tracer_side() -> Any:
    return compat.find_engine("task")


def test_find_engine_reads_methods_only() -> None:
    engine = _Engine()
    assert engine.initialize_run() is engine
    assert _plain_function() is None


def test_find_engine_passes_over_methods_declared_never_an_engine() -> None:
    class Telemetry:
        """Stands between the engine and the tracer, as Prefect's run telemetry does; it looks like an engine."""

        task = task_run = object()
        parameters: dict[str, Any] = {}

        def start_span(self) -> Any:
            return _tracer_side()

    class EngineAbove(_Engine):
        def initialize_run(self) -> Any:
            return Telemetry().start_span()

    engine = EngineAbove()
    assert isinstance(engine.initialize_run(), Telemetry)  # undeclared, its frame is read like any method's
    compat.never_an_engine(Telemetry)
    assert engine.initialize_run() is engine


def test_the_tracer_and_prefects_run_telemetry_are_declared_never_an_engine() -> None:
    from prefect.telemetry.run_telemetry import RunTelemetry

    from metatrail.plugins.prefect.tracing import ObservingTracer

    for method in (ObservingTracer.start_span, RunTelemetry.start_span, RunTelemetry._start_span):
        assert id(method.__code__) in compat._never_engine_code_ids
