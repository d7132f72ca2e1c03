"""The store interface: one contract, one backend module per URL scheme.

An ``EventStore`` holds an append-only log of OpenLineage events (the source of truth) and projections derived from
it (runs, input/output edges). Contract every backend keeps:

* ``ingest`` is idempotent: an event's identity is the sha256 of its canonical JSON, so the same event twice is stored
  once. It is atomic per call: either every new event of the batch and its projections are stored, or none.
* Projections depend only on the *set* of events (never on arrival order); ``rebuild_projections`` recomputes them
  from the log and must give the same rows.
* Many writers (threads, processes) may ingest at once; none loses an event and none sees "database is locked".
* Queries return plain JSON-ready dicts, so the CLI and the server print them as they are.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IngestResult:
    """What an ``ingest`` call did."""

    received: int
    inserted: int
    inserted_ids: tuple[str, ...] = ()

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted


class CanonicalEvent(dict[str, Any]):
    """A decoded event that carries its canonical bytes (``metatrail.openlineage.events.canonical_bytes``), computed
    once: the server serialises each incoming event once to check it, and ``ingest`` takes the event's identity and
    stored text from these bytes rather than serialising it again. Read-only by agreement: nothing is recomputed
    after a change."""

    __slots__ = ("_id", "canonical")

    def __init__(self, event: Mapping[str, Any], canonical: bytes) -> None:
        super().__init__(event)
        self.canonical = canonical
        self._id: str | None = None

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> CanonicalEvent:
        """``event`` with its canonical bytes (``TypeError``/``ValueError`` when it is not JSON data)."""
        from metatrail.openlineage.events import canonical_bytes

        return cls(event, canonical_bytes(event))

    @property
    def id(self) -> str:
        """The event's identity: sha256 of the canonical bytes."""
        if self._id is None:
            self._id = digest(self.canonical)
        return self._id


def digest(data: bytes) -> str:
    """sha256 of ``data`` as hex, computed without letting go of the GIL.

    ``hashlib`` releases the GIL for inputs of 2,048 bytes or more, so the thread must take it back after each event;
    in the server, whose other thread holds it for milliseconds at a time, hashing a batch event by event then waited
    longer than it computed. Fed in smaller pieces, the hash keeps the GIL: the same digest at the same speed.
    """
    if len(data) < _GIL_FREE_HASH:
        return hashlib.sha256(data).hexdigest()
    hasher = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(data), _GIL_FREE_HASH - 1):
        hasher.update(view[start : start + _GIL_FREE_HASH - 1])
    return hasher.hexdigest()


_GIL_FREE_HASH = 2048  # hashlib's HASHLIB_GIL_MINSIZE


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: log position, identity, body and (for events from another site) origin."""

    seq: int
    id: str
    body: dict[str, Any]
    site: str | None = None


class EventStore(abc.ABC):
    """The store contract (see module docstring)."""

    url: str

    @abc.abstractmethod
    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None,
               allowed_pipelines: frozenset[str] | None = None) -> IngestResult:
        """Validate minimally, then store the events not yet stored and update projections (atomic per call).

        ``site`` is the site the events were received from (None: recorded here); ``sites``, when given, names one
        per event instead. An event already stored keeps the site it first came from.

        ``allowed_pipelines`` (a write limited to some pipelines): raises ``ForeignRunError`` and stores nothing when
        a run of the events is stored under another pipeline, looked at inside the same transaction.

        Raises ``EventError`` naming the offending event when one cannot be projected (no runId, no job, bad
        eventTime); nothing of the batch is stored then.
        """

    @abc.abstractmethod
    def iter_events(
        self,
        *,
        after_seq: int = 0,
        pipeline: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> Iterator[StoredEvent]:
        """Events in log order, after ``after_seq``; filtered by pipeline, run (and its child runs), eventTime."""

    @abc.abstractmethod
    def list_runs(
        self,
        *,
        pipeline: str | None = None,
        state: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Runs, newest first."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run with its inputs, outputs, parameters, facets and child runs; None if unknown."""

    @abc.abstractmethod
    def list_pipelines(self) -> list[dict[str, Any]]:
        """Pipelines with their stages, run counts and last run time."""

    @abc.abstractmethod
    def find_artifacts(self, *, key: str | None = None, hash: str | None = None,
                       namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Artifact occurrences (edges) by key, content hash, or dataset identity."""

    @abc.abstractmethod
    def lineage(self, artifact_keys: Sequence[str], *, direction: str = "upstream",
                depth: int = 10) -> dict[str, Any]:
        """The lineage graph around artifacts: ``{"nodes": [...], "edges": [...]}``.

        ``direction`` is ``upstream`` (what produced it), ``downstream`` (what consumed it) or ``both``; ``depth``
        counts run hops. For a reader limited to some pipelines, :meth:`readable_lineage`. A remote store's graph is
        what the server's token may read.
        """

    # -- reads for a reader limited to some pipelines ---------------------------------------------------------------
    # Such a reader reads a run only when every event of the run names one of its pipelines: a run's pipeline follows
    # its latest event, and a writer that plants a far-future event in a run it can predict keeps the run under its
    # own pipeline, the owner's events included. A store that cannot tell answers nothing (deny by default).
    def readable_runs(self, run_ids: Collection[str], pipelines: frozenset[str]) -> set[str]:
        """Those of ``run_ids`` a reader limited to ``pipelines`` may read."""
        return set()

    def list_readable_runs(self, pipelines: frozenset[str], *, pipeline: str | None = None, state: str | None = None,
                           kind: str | None = None, since: float | None = None, until: float | None = None,
                           limit: int = 100) -> list[dict[str, Any]]:
        """:meth:`list_runs` of the runs a reader limited to ``pipelines`` may read."""
        return []

    def list_readable_pipelines(self, pipelines: frozenset[str]) -> list[dict[str, Any]]:
        """:meth:`list_pipelines` counting only the runs a reader limited to ``pipelines`` may read (its stages, run
        counts and last run time come from those runs alone)."""
        return []

    def find_readable_artifacts(self, pipelines: frozenset[str], *, key: str | None = None, hash: str | None = None,
                                namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """:meth:`find_artifacts` among the runs a reader limited to ``pipelines`` may read."""
        return []

    def readable_lineage(self, artifact_keys: Sequence[str], pipelines: frozenset[str], *, direction: str = "upstream",
                         depth: int = 10) -> dict[str, Any]:
        """:meth:`lineage` for a reader limited to ``pipelines``: every node says whether the reader may see it
        (``"readable"``; the caller cuts out the others): a run it may read, an artifact a run it may read touches.
        The walk does not go on through a run it may not read, and an artifact's names, hash and size come only from
        runs it may read."""
        return {"roots": list(artifact_keys), "nodes": [], "edges": []}

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counts of events, runs, pipelines, artifacts; the last log position."""

    @abc.abstractmethod
    def rebuild_projections(self) -> None:
        """Recompute every projection from the event log."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; safe to call twice."""

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
