"""The OpenTelemetry side: a tracer wrapper that lets us watch Prefect's run spans without owning any of them.

Prefect's engines open one span per flow or task run and add one span event per state change. :func:`install`
makes Prefect obtain its tracer through :class:`ObservingTracer`, which asks the real tracer (whatever the user's
global TracerProvider gives, or OpenTelemetry's no-op) for the span and, for run spans only, hands back an
:class:`ObservedSpan`: every call goes to the real span first, unchanged, and is then shown to a run observer.

Why not a span processor on a TracerProvider of our own: OpenTelemetry allows one global provider per process and
refuses later ones, so installing ours at ``import prefect`` would silently discard the provider the user sets in
their script afterwards. Wrapping the tracer leaves the user's setup exactly as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util import types

from metatrail.config import is_disabled
from metatrail.logsafe import log_once
from metatrail.plugins.prefect import compat

_installed = False
_install_lock = threading.Lock()


def install() -> bool:
    """Route Prefect's run spans through the observer; idempotent; False when this Prefect offers no seam."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        if not compat.patch_tracer_factory(_wrap_tracer):
            log_once("prefect-seam", "metatrail: Prefect %s has no run-telemetry tracer to observe; "
                     "flows run unrecorded", compat.prefect_version())
            return False
        if not compat.orchestration_telemetry_enabled():
            log_once("prefect-otel-off", "metatrail: PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY is off, so Prefect "
                     "reports no runs and metatrail records none; unset it to record")
        _installed = True
        return True


def _wrap_tracer(tracer: Any) -> Any:
    return tracer if isinstance(tracer, ObservingTracer) else ObservingTracer(tracer)


def _guard(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        log_once(f"prefect-{what}:{type(exc).__name__}", "metatrail: recording a Prefect run failed in %s "
                 "(%s: %s); the run is not affected", what, type(exc).__name__, exc)
        return None


class ObservingTracer(trace.Tracer):
    """Prefect's tracer, with each flow/task run span wrapped in an :class:`ObservedSpan`."""

    def __init__(self, inner: trace.Tracer) -> None:
        self._inner = inner

    def start_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: types.Attributes = None, links: Any = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True) -> Span:
        """The real tracer's span, wrapped when it is a Prefect run span and recording is on."""
        span = self._inner.start_span(name, context=context, kind=kind, attributes=attributes, links=links,
                                      start_time=start_time, record_exception=record_exception,
                                      set_status_on_exception=set_status_on_exception)
        if is_disabled() or not attributes or attributes.get("prefect.run.type") not in ("task", "flow"):
            return span
        observer = _guard("start", _new_observer, attributes)
        return span if observer is None else ObservedSpan(span, observer)

    def start_as_current_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes: types.Attributes = None, links: Any = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Any:
        """Delegated unchanged (Prefect's run telemetry does not use it)."""
        return self._inner.start_as_current_span(
            name, context=context, kind=kind, attributes=attributes, links=links, start_time=start_time,
            record_exception=record_exception, set_status_on_exception=set_status_on_exception,
            end_on_exit=end_on_exit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


compat.never_an_engine(ObservingTracer)


def _new_observer(attributes: Mapping[str, Any]) -> Any:
    from metatrail.plugins.prefect.observer import new_observer

    return new_observer(attributes)


class ObservedSpan(Span):
    """A run span: calls go to the real span first, unchanged; state events, exceptions and the end are then shown
    to the run's observer, whose failures are logged and swallowed."""

    def __init__(self, inner: Span, observer: Any) -> None:
        self._inner = inner
        self._observer = observer

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        """Forward; a Prefect state event then reaches the observer."""
        self._inner.add_event(name, attributes, timestamp)
        if attributes and "prefect.state.type" in attributes and not is_disabled():
            _guard("state", self._observer.on_state, attributes)

    def record_exception(self, exception: BaseException, attributes: types.Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        """Forward; the observer keeps the exception for the try that raised it."""
        self._inner.record_exception(exception, attributes, timestamp, escaped)
        _guard("exception", self._observer.on_exception, exception)

    def end(self, end_time: int | None = None) -> None:
        """Forward; the observer closes anything still open."""
        self._inner.end(end_time)
        if not is_disabled():
            _guard("end", self._observer.on_end)

    def get_span_context(self) -> SpanContext:
        """Forwarded."""
        return self._inner.get_span_context()

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        """Forwarded."""
        self._inner.set_attributes(attributes)

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        """Forwarded."""
        self._inner.set_attribute(key, value)

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Forwarded."""
        self._inner.add_link(context, attributes)

    def update_name(self, name: str) -> None:
        """Forwarded."""
        self._inner.update_name(name)

    def is_recording(self) -> bool:
        """Forwarded."""
        return self._inner.is_recording()

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Forwarded."""
        self._inner.set_status(status, description)

    def __getattr__(self, name: str) -> Any:
        # SDK spans expose more (name, attributes, events …); user code reading them sees the real span's.
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return repr(self._inner)


__all__: Sequence[str] = ["ObservedSpan", "ObservingTracer", "install"]
