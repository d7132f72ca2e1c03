"""The metadata model: Pipeline → Stage → Execution → Artifact, as in CMF and MLMD. Pure data, no I/O.

* A **pipeline** is a DAG / flow / Snakefile workflow / Parsl script; one **pipeline run** is its parent run.
* A **stage** is a task / rule / app of a pipeline; an **execution** is one run (one try) of a stage, identified by a
  UUIDv7 that is also its OpenLineage ``runId``.
* An **artifact** is a file, directory or remote object, identified by its content hash where one is known.
  Executions link to artifacts with INPUT and OUTPUT events.

In OpenLineage terms: job namespace = pipeline namespace, job name = ``<pipeline>.<stage>`` (the pipeline run's job
name is ``<pipeline>``), dataset = artifact (namespace + name, content hash in ``DatasetVersionDatasetFacet``).
"""

from __future__ import annotations

import enum
import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    """Execution / pipeline-run state."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"

    @classmethod
    def from_event_type(cls, event_type: str | None) -> Status | None:
        return _EVENT_TO_STATUS.get((event_type or "").upper())


_EVENT_TO_STATUS = {
    "START": Status.RUNNING,
    "RUNNING": Status.RUNNING,
    "COMPLETE": Status.COMPLETED,
    "FAIL": Status.FAILED,
    "ABORT": Status.ABORTED,
}

TERMINAL_EVENT_TYPES = frozenset({"COMPLETE", "FAIL", "ABORT"})


class Direction(enum.StrEnum):
    """Which way an artifact relates to an execution."""

    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


@dataclass(frozen=True)
class ErrorText:
    """An error as the record keeps it: the message and, for an exception, its formatted traceback. Unlike an
    exception with its traceback, it can be pickled (handed to another process)."""

    message: str
    stack: str | None = None

    @classmethod
    def of(cls, error: BaseException) -> ErrorText:
        """The text of ``error``; never raises (an exception whose ``__str__`` fails still has a type and a place)."""
        import traceback

        name = type(error).__name__
        try:
            message = f"{name}: {error}"
        except Exception as exc:
            message = f"{name}: <str() of the exception failed: {type(exc).__name__}>"
        try:
            stack = "".join(traceback.format_exception(error)) or None
        except Exception:
            try:
                stack = "".join(traceback.format_tb(error.__traceback__)) + message + "\n"
            except Exception:
                stack = None
        return cls(message, stack)


@dataclass(frozen=True)
class HashInfo:
    """A content hash that carries its algorithm (``md5`` = DVC 3 md5; directories end in ``.dir``)."""

    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"


@dataclass
class ArtifactRef:
    """An artifact as an execution saw it.

    ``uri`` is what the host handed us (a local path or a remote URL); ``namespace``/``name`` follow OpenLineage
    dataset naming. ``hash`` is ``None`` when it could not be computed, and then ``hash_error`` says why (never a
    made-up value). ``pending`` is true while a large output is still being hashed off the critical path.
    """

    uri: str
    namespace: str
    name: str
    kind: str = "file"  # file | directory | remote | missing
    hash: HashInfo | None = None
    size: int | None = None
    nfiles: int | None = None
    hash_error: str | None = None


@dataclass
class Execution:
    """One run of a stage. Picklable, so a host can hand it to another process to finish it there."""

    id: str
    pipeline: str
    stage: str
    namespace: str
    integration: str
    pipeline_run_id: str | None = None
    started_at: float = field(default_factory=time.time)
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    try_number: int | None = None
    host_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        """Record a result metric (accuracy, loss …) with the execution; stored when it finishes."""
        self.metrics[str(name)] = value


@dataclass
class PipelineRun:
    """One run of a whole pipeline: the parent run of its executions."""

    id: str
    pipeline: str
    namespace: str
    integration: str
    started_at: float = field(default_factory=time.time)
    params: dict[str, Any] = field(default_factory=dict)
    host_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# Run ids need uniqueness, not secrecy: a generator of our own, seeded from the OS once per process (and again in
# a forked child), avoids a system call per id. A system call releases the GIL, and getting it back behind a busy
# thread costs a host task up to a 5 ms switch interval. Never the global `random`: users seed it.
_rng = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


def uuid7(unix_ts: float | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit millisecond timestamp, version 7, 74 random bits; sortable by time."""
    ms = int((time.time() if unix_ts is None else unix_ts) * 1000) & ((1 << 48) - 1)
    rand = _rng.getrandbits(80)
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_from(unix_ts: float, key: str) -> str:
    """A deterministic UUIDv7: the time part from ``unix_ts``, the rest from a hash of ``key``.

    Hosts use it to derive stable run ids from their own identity (dag_id + run_id + task_id + try), so that the same
    task try always maps to the same execution, even when recorded from two processes.
    """
    ms = int(unix_ts * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(hashlib.sha256(key.encode()).digest()[:10], "big")
    value = ms << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def current_user() -> str | None:
    """The login name of this process, or None when it cannot be told (no passwd entry in a container)."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError, OSError):
        return os.environ.get("USER")
