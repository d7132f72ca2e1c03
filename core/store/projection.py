"""Projections: what a run *is*, derived deterministically from the events recorded for it.

Pure functions, no I/O. Given every event of one run (in any order, duplicates removed by event id), they return the
run row and its input/output edges. The result depends only on the set of events, never on arrival order: run state
is the event with the greatest ``(rank, eventTime, event id)`` where terminal events (COMPLETE/FAIL/ABORT) outrank
START/RUNNING, which outrank OTHER; facets are merged in ``(eventTime, rank, id)`` order, later keys replacing
earlier ones as the OpenLineage spec says.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from metatrail.errors import EventError

_RANK = {"COMPLETE": 2, "FAIL": 2, "ABORT": 2, "START": 1, "RUNNING": 1}
_STATE = {"COMPLETE": "completed", "FAIL": "failed", "ABORT": "aborted", "START": "running", "RUNNING": "running"}
PIPELINE_JOB_TYPES = frozenset({"DAG", "FLOW", "WORKFLOW", "PIPELINE"})


def parse_event_time(value: Any) -> float:
    """``eventTime`` as Unix seconds. Accepts what Marquez accepts: ISO 8601, with or without a zone (UTC then)."""
    if not isinstance(value, str) or "T" not in value:
        raise EventError(f"eventTime must be an ISO 8601 date-time string, got {value!r}")
    try:  # the common case, five times faster than the normalising below (which gives the same result for it)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return _parse_unusual_time(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _parse_unusual_time(value: str) -> float:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python < 3.12 parses at most 6 fractional digits; OpenLineage producers send nanoseconds.
    head, sep, frac = text.partition(".")
    if sep:
        digits = frac[: len(frac) - len(frac.lstrip("0123456789"))]  # the leading digits; the zone follows them
        rest = frac[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest}"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise EventError(f"eventTime {value!r} is not an ISO 8601 date-time: {exc}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class EventRecord:
    """One stored event: its identity, parsed time and body; its type and rank are worked out once, here (sorting
    and projecting ask for them several times per event)."""

    id: str
    time: float
    body: Mapping[str, Any]
    event_type: str = field(init=False, repr=False, compare=False)
    rank: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        event_type = str(self.body.get("eventType") or "OTHER").upper()
        object.__setattr__(self, "event_type", event_type)
        object.__setattr__(self, "rank", _RANK.get(event_type, 0))


def artifact_key(namespace: str, name: str, version: str | None, facet: Mapping[str, Any] | None) -> str:
    """The key lineage joins on: the content hash where we know one, so artifacts join across sites and paths."""
    if facet and facet.get("hash") and facet.get("algorithm"):
        return f"{facet['algorithm']}:{facet['hash']}"
    if version:
        return f"{namespace}:{name}@{version}"
    return f"{namespace}:{name}"


@dataclass
class RunProjection:
    """The projected row of one run and its input/output edges."""

    run: dict[str, Any]
    edges: list[dict[str, Any]] = field(default_factory=list)


def _order(e: EventRecord) -> tuple[float, int, str]:
    return (e.time, e.rank, e.id)


def project_run(run_id: str, events: Iterable[EventRecord]) -> RunProjection:
    """Project one run from all its events (see module docstring for the rules)."""
    ordered = sorted({e.id: e for e in events}.values(), key=_order)
    if not ordered:
        raise EventError(f"run {run_id} has no events")
    state_event = max(ordered, key=lambda e: (e.rank, e.time, e.id))
    last = ordered[-1]
    facets: dict[str, Any] = {}
    job_facets: dict[str, Any] = {}
    for e in ordered:
        run_facets = (e.body.get("run") or {}).get("facets") or {}
        previous = facets.get("metatrail_execution")
        facets.update(run_facets)
        current = run_facets.get("metatrail_execution")
        if isinstance(previous, dict) and isinstance(current, dict):
            # A run finished by another process may not know the parameters given at its start: keep them.
            facets["metatrail_execution"] = {**current, "params": {**(previous.get("params") or {}),
                                                                   **(current.get("params") or {})}}
        job_facets.update((e.body.get("job") or {}).get("facets") or {})
    job = last.body.get("job") or {}
    namespace, job_name = str(job.get("namespace", "")), str(job.get("name", ""))
    ours = facets.get("metatrail_execution") or {}
    parent = (facets.get("parent") or {}) if isinstance(facets.get("parent"), dict) else {}
    parent_run_id = (parent.get("run") or {}).get("runId")
    parent_job = (parent.get("job") or {}).get("name")
    job_type = str((job_facets.get("jobType") or {}).get("jobType") or "").upper()
    integration = (job_facets.get("jobType") or {}).get("integration")
    if ours.get("pipeline"):
        pipeline, stage, kind = ours["pipeline"], ours.get("stage"), ours.get("kind", "execution")
    elif parent_job:
        pipeline = parent_job
        prefix = f"{parent_job}."
        stage = job_name[len(prefix) :] if job_name.startswith(prefix) else job_name
        kind = "execution"
    else:
        pipeline, stage = job_name, None
        kind = "pipeline_run" if job_type in PIPELINE_JOB_TYPES else "run"
    starts = [e.time for e in ordered if e.event_type == "START"]
    terminal = state_event if state_event.rank == 2 else None
    error = (facets.get("errorMessage") or {}).get("message")
    run = {
        "run_id": run_id,
        "namespace": namespace,
        "job_name": job_name,
        "pipeline": str(pipeline),
        "stage": stage,
        "kind": kind,
        "parent_run_id": parent_run_id,
        "state": _STATE.get(state_event.event_type, "unknown"),
        "started_at": min(starts) if starts else ordered[0].time,
        "ended_at": terminal.time if terminal else None,
        "integration": integration or ours.get("integration"),
        "site": ours.get("site"),
        "error": error,
        "event_count": len(ordered),
        "facets": facets,
    }
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in ordered:
        for direction, key in (("INPUT", "inputs"), ("OUTPUT", "outputs")):
            for ds in e.body.get(key) or ():
                if not isinstance(ds, dict):
                    continue
                ns, name = str(ds.get("namespace", "")), str(ds.get("name", ""))
                ds_facets = ds.get("facets") or {}
                version = (ds_facets.get("version") or {}).get("datasetVersion")
                art = ds_facets.get("metatrail_artifact")
                edge = edges.setdefault((direction, ns, name), {
                    "run_id": run_id, "direction": direction, "namespace": ns, "name": name,
                    "version": None, "artifact_key": artifact_key(ns, name, None, None),
                    "hash": None, "algorithm": None, "size": None, "hash_error": None,
                })
                if version or art:
                    edge["version"] = version or edge["version"]
                    edge["artifact_key"] = artifact_key(ns, name, edge["version"], art)
                    if art:
                        edge.update(hash=art.get("hash"), algorithm=art.get("algorithm"), size=art.get("size"),
                                    hash_error=art.get("hashError"))
    ordered_edges = sorted(edges.values(), key=lambda d: (d["direction"], d["namespace"], d["name"]))
    return RunProjection(run=run, edges=ordered_edges)
