"""Everything that depends on Parsl's internals, in one place (checked against parsl 2026.1.26 to 2026.10).

The plugin relies on: the ``Memoizer`` interface (``start/check_memo/update_memo_result/update_memo_exception/
close``) and that the DFK calls ``check_memo`` and then ``executor.submit`` on the same thread for each try; the
``TaskRecord`` keys below; ``DataFlowKernel.run_id/workflow_name/run_dir/task_state_counts``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from types import FrameType
from typing import Any

import parsl
from parsl.dataflow.dflow import DataFlowKernel
from parsl.dataflow.errors import DependencyError, JoinError
from parsl.dataflow.memoization import BasicMemoizer, Memoizer
from parsl.dataflow.states import States
from parsl.executors import ThreadPoolExecutor
from parsl.executors.errors import ExecutorError
from parsl.serialize.errors import DeserializationError, SerializationError

__all__ = [
    "BasicMemoizer",
    "DataFlowKernel",
    "DependencyError",
    "DeserializationError",
    "JoinError",
    "Memoizer",
    "SerializationError",
    "ThreadPoolExecutor",
    "dfk_from_stack",
    "failed_task_count",
    "future_task_ids",
    "is_infrastructure_error",
    "is_supported",
    "parsl_version",
]


def parsl_version() -> str:
    """The installed Parsl's version."""
    return str(getattr(parsl, "__version__", "unknown"))


MINIMUM_VERSION = (2026, 1, 26)  # Memoizer.start(run_dir=, config_run_dir=): what TrackingMemoizer implements


def is_supported(version: str | None = None) -> bool:
    """Whether this Parsl (or ``version``, e.g. ``"2026.01.26"``) has the memoizer interface the plugin wraps: an
    older DFK would call our memoizer with arguments it does not take, and fail to start."""
    parts = (version if version is not None else parsl_version()).split(".")[:3]
    try:
        return tuple(int(p) for p in parts) >= MINIMUM_VERSION
    except ValueError:  # a development build: take it as new
        return True


def dfk_from_stack(max_depth: int = 6) -> DataFlowKernel | None:
    """The DataFlowKernel whose ``__init__`` is calling us (``Memoizer.start`` gets no DFK argument)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DataFlowKernel):
            return candidate
        frame = frame.f_back
    return None


def _infrastructure_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ExecutorError, SerializationError, DeserializationError]
    try:
        from parsl.executors.high_throughput.errors import ManagerLost, VersionMismatch, WorkerLost

        types += [ManagerLost, WorkerLost, VersionMismatch]
    except ImportError:  # an older/newer layout: the base classes still catch most
        pass
    return tuple(types)


_INFRASTRUCTURE = _infrastructure_types()


def is_infrastructure_error(exc: BaseException | None) -> bool:
    """True when a try failed outside the app body (lost worker, serialization): the worker recorded no end."""
    return isinstance(exc, _INFRASTRUCTURE)


def failed_task_count(dfk: Any) -> tuple[int, int]:
    """``(failed, total finished)`` tasks of a DFK, from its state counters."""
    counts = getattr(dfk, "task_state_counts", {})
    failed = int(counts.get(States.failed, 0)) + int(counts.get(States.dep_fail, 0))
    done = failed + int(counts.get(States.exec_done, 0)) + int(counts.get(States.memo_done, 0))
    return failed, done


def future_task_ids(futures: Any) -> list[int]:
    """Task ids of the AppFutures/DataFutures in ``futures`` (one future or a list)."""
    items: Iterable[Any] = futures if isinstance(futures, (list, tuple)) else [futures]
    ids: list[int] = []
    for f in items:
        tid = getattr(f, "tid", None)
        if isinstance(tid, int):
            ids.append(tid)
    return ids
