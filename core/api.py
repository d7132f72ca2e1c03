"""The explicit API for scripts: context managers around a pipeline run and its executions.

    import metatrail

    with metatrail.pipeline_run("exatrkx"):
        with metatrail.execution(pipeline="exatrkx", stage="embed", inputs=["hits.csv"],
                                 outputs=["embed.pt"], params={"lr": 1e-3}) as ex:
            train(...)

An exception inside ``execution`` records the execution as failed and propagates unchanged; recording problems never
raise (the Recorder's guarantee).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from metatrail.model import Execution, PipelineRun, Status
from metatrail.recorder import PathLike, Recorder, get_recorder

_current_pipeline_run: contextvars.ContextVar[PipelineRun | None] = contextvars.ContextVar(
    "metatrail_pipeline_run", default=None
)


@contextmanager
def pipeline_run(pipeline: str, *, params: Mapping[str, Any] | None = None, namespace: str | None = None,
                 recorder: Recorder | None = None) -> Iterator[PipelineRun]:
    """Record a pipeline run around the block; executions inside become its children."""
    rec = recorder or get_recorder()
    run = rec.pipeline_run_started(pipeline, namespace=namespace, params=params)
    token = _current_pipeline_run.set(run)
    try:
        yield run
    except BaseException as exc:
        rec.pipeline_run_finished(run, status=Status.FAILED, error=exc)
        raise
    else:
        rec.pipeline_run_finished(run, status=Status.COMPLETED)
    finally:
        _current_pipeline_run.reset(token)


@contextmanager
def execution(pipeline: str | None = None, stage: str | None = None, *, inputs: Iterable[PathLike] = (),
              outputs: Iterable[PathLike] = (), params: Mapping[str, Any] | None = None,
              run: PipelineRun | None = None, namespace: str | None = None,
              recorder: Recorder | None = None) -> Iterator[Execution]:
    """Record one execution of ``stage`` around the block.

    ``outputs`` are hashed when the block ends (off the caller's thread). Inside a :func:`pipeline_run` block the
    pipeline name and parent run are taken from it.
    """
    rec = recorder or get_recorder()
    parent = run or _current_pipeline_run.get()
    pipeline_name = pipeline or (parent.pipeline if parent else None) or "default"
    ex = rec.execution_started(pipeline_name, stage or "main", pipeline_run=parent, inputs=inputs, params=params,
                               namespace=namespace)
    try:
        yield ex
    except BaseException as exc:
        rec.execution_failed(ex, error=exc, outputs=outputs)
        raise
    else:
        rec.execution_finished(ex, outputs=outputs)
