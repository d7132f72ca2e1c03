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
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from metatrail.model import Execution, PipelineRun, Status
from metatrail.recorder import PathLike, Recorder, get_recorder

_current_pipeline_run: contextvars.ContextVar[PipelineRun | None] = contextvars.ContextVar(
    "metatrail_pipeline_run", default=None
)
# Every open pipeline_run block of the process. A thread of a pool does not inherit the context of the thread that
# opened the block, so its executions find their run here when there is no doubt which it is (one open block).
_open_runs: list[PipelineRun] = []
_open_runs_lock = threading.Lock()


def _enclosing_run(pipeline: str | None) -> PipelineRun | None:
    current = _current_pipeline_run.get()
    if current is not None:
        return current
    with _open_runs_lock:
        candidates = [r for r in _open_runs if pipeline is None or r.pipeline == pipeline]
    return candidates[0] if len(candidates) == 1 else None


@contextmanager
def pipeline_run(pipeline: str, *, params: Mapping[str, Any] | None = None, namespace: str | None = None,
                 recorder: Recorder | None = None) -> Iterator[PipelineRun]:
    """Record a pipeline run around the block; executions inside become its children."""
    rec = recorder or get_recorder()
    run = rec.pipeline_run_started(pipeline, namespace=namespace, params=params)
    token = _current_pipeline_run.set(run)
    with _open_runs_lock:
        _open_runs.append(run)
    try:
        yield run
    except BaseException as exc:
        rec.pipeline_run_finished(run, status=Status.FAILED, error=exc)
        raise
    else:
        rec.pipeline_run_finished(run, status=Status.COMPLETED)
    finally:
        _current_pipeline_run.reset(token)
        with _open_runs_lock:
            _open_runs.remove(run)


@contextmanager
def execution(pipeline: str | None = None, stage: str | None = None, *, inputs: Iterable[PathLike] = (),
              outputs: Iterable[PathLike] = (), params: Mapping[str, Any] | None = None,
              run: PipelineRun | None = None, namespace: str | None = None,
              recorder: Recorder | None = None) -> Iterator[Execution]:
    """Record one execution of ``stage`` around the block.

    ``outputs`` are hashed when the block ends (off the caller's thread). Inside a :func:`pipeline_run` block the
    pipeline name and parent run are taken from it; so they are on another thread (a pool's) while the process has
    one such block open (of ``pipeline``, when given). Otherwise pass ``run``.
    """
    rec = recorder or get_recorder()
    parent = run or _enclosing_run(pipeline)
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
