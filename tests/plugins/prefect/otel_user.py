"""A user's script with its own OpenTelemetry setup, run by the tests as ``python otel_user.py MODE WORKDIR``.

MODE ``before``: the SDK TracerProvider is installed before ``import prefect`` (as ``opentelemetry-instrument`` or a
sitecustomize would); ``after``: installed by the script after its imports (the common case); ``none``: no
provider. The script opens a span of its own around the flow, sets an attribute on the current span from inside a
task, and prints what its span processor saw as JSON on the last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

mode, workdir = sys.argv[1], sys.argv[2]


def install_user_provider() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


exporter = install_user_provider() if mode == "before" else None

from opentelemetry import trace  # noqa: E402
from prefect import flow, task  # noqa: E402

if mode == "after":
    exporter = install_user_provider()


@task(task_run_name="tagged")
def tagged(path: str) -> str:
    trace.get_current_span().set_attribute("user.note", "set inside the task")
    Path(path).write_text("tagged\n")
    return path


@flow(flow_run_name="otel-run")
def otel_flow(workdir: str) -> str:
    return tagged(f"{workdir}/tagged.txt")


with trace.get_tracer("user-app").start_as_current_span("user-root"):
    result = otel_flow(workdir)

spans = []
for span in exporter.get_finished_spans() if exporter is not None else ():
    spans.append({
        "name": span.name,
        "span_id": span.context.span_id,
        "parent_id": span.parent.span_id if span.parent else None,
        "type": span.attributes.get("prefect.run.type"),
        "run_id": span.attributes.get("prefect.run.id"),
        "note": span.attributes.get("user.note"),
        "events": [e.name for e in span.events],
        "status": span.status.status_code.name,
    })
print(json.dumps({"result": result, "spans": spans,
                  "provider": type(trace.get_tracer_provider()).__name__}))
