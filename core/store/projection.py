"""Projections: what a run *is*, derived deterministically from the events recorded for it.

Pure functions, no I/O. Given every event of one run (in any order, duplicates removed by event id), they return the
run row and its input/output edges. The result depends only on the set of events (and the site each was received
from), never on arrival order: run state is the event with the greatest ``(rank, eventTime, event id)`` where
terminal events (COMPLETE/FAIL/ABORT) outrank START/RUNNING, which outrank OTHER; facets are merged in
``(eventTime, rank, id)`` order, later keys replacing earlier ones as the OpenLineage spec says.
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
# The error message that starts an ABORT event recorded for a run nothing will finish (metatrail.abandoned): such a
# run ended at an unknown moment after that event's time, so no duration is given for it.
ABANDONED_PREFIX = "abandoned: "


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
    """One stored event: its identity, parsed time, body and the site it was received from (None: recorded here);
    its type and rank are worked out once, here (sorting and projecting ask for them several times per event)."""

    id: str
    time: float
    body: Mapping[str, Any]
    site: str | None = field(default=None, compare=False)
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


# Events from any producer reach the projection, and facets other than the spec's are free-form: a value read from one
# is used only when it has the type its column needs, otherwise it counts as absent. A projection that raised would
# refuse every later event of the run, and one whose value the database cannot hold would fail the transaction.
def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, limit: int | None = None) -> str | None:
    if not isinstance(value, str) or (limit is not None and len(value) > limit):
        return None
    return value


def _int64(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        return None
    return value


_KINDS = frozenset({"execution", "pipeline_run", "run"})


def event_pipeline(event: Mapping[str, Any]) -> str | None:
    """The pipeline one event puts its run in, by the rules of :func:`project_run` (our facet's pipeline, else the
    parent job, else the job); None for an event without a run."""
    run = event.get("run")
    if not isinstance(run, dict):
        return None
    facets = _obj(run.get("facets"))
    ours = _text(_obj(facets.get("metatrail_execution")).get("pipeline"))
    return ours or _text(_obj(_obj(facets.get("parent")).get("job")).get("name")) or \
        str(_obj(event.get("job")).get("name", ""))


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
        run_facets = _obj(_obj(e.body.get("run")).get("facets"))
        previous = facets.get("metatrail_execution")
        facets.update(run_facets)
        current = run_facets.get("metatrail_execution")
        if isinstance(previous, dict) and isinstance(current, dict):
            # A run finished by another process may not know the parameters given at its start: keep them.
            facets["metatrail_execution"] = {**current, "params": {**_obj(previous.get("params")),
                                                                   **_obj(current.get("params"))}}
        job_facets.update(_obj(_obj(e.body.get("job")).get("facets")))
    job = _obj(last.body.get("job"))
    namespace, job_name = str(job.get("namespace", "")), str(job.get("name", ""))
    ours = _obj(facets.get("metatrail_execution"))
    parent = _obj(facets.get("parent"))
    parent_run_id = _text(_obj(parent.get("run")).get("runId"), 64)
    parent_job = _text(_obj(parent.get("job")).get("name"))
    job_type_facet = _obj(job_facets.get("jobType"))
    job_type = str(job_type_facet.get("jobType") or "").upper()
    integration = _text(job_type_facet.get("integration"))
    if _text(ours.get("pipeline")):
        pipeline, stage = ours["pipeline"], _text(ours.get("stage"))
        kind = ours["kind"] if _text(ours.get("kind")) in _KINDS else "execution"
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
    error = _text(_obj(facets.get("errorMessage")).get("message"))
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
        "integration": integration or _text(ours.get("integration")),
        # Where the events came from, as the receiving server authenticated it; a facet's word only for events
        # recorded here (a writer could name any site in a facet).
        "site": next((e.site for e in ordered if e.site), None) or _text(ours.get("site")),
        "error": error,
        "event_count": len(ordered),
        "facets": facets,
        # Whether a reader limited to some pipelines must look at the run's events (metatrail.store.sql).
        "mixed": int(any(event_pipeline(e.body) != str(pipeline) for e in ordered)),
    }
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in ordered:
        for direction, key in (("INPUT", "inputs"), ("OUTPUT", "outputs")):
            datasets = e.body.get(key)
            for ds in datasets if isinstance(datasets, list) else ():
                if not isinstance(ds, dict):
                    continue
                ns, name = str(ds.get("namespace", "")), str(ds.get("name", ""))
                ds_facets = _obj(ds.get("facets"))
                version = _text(_obj(ds_facets.get("version")).get("datasetVersion"))
                facet = _obj(ds_facets.get("metatrail_artifact"))
                art = {"hash": _text(facet.get("hash")), "algorithm": _text(facet.get("algorithm"), 16),
                       "size": _int64(facet.get("size")), "hashError": _text(facet.get("hashError"))
                       } if facet else {}
                edge = edges.setdefault((direction, ns, name), {
                    "run_id": run_id, "direction": direction, "namespace": ns, "name": name,
                    "version": None, "artifact_key": artifact_key(ns, name, None, None),
                    "hash": None, "algorithm": None, "size": None, "hash_error": None,
                })
                if version or art:
                    edge["version"] = version or edge["version"]
                    edge["artifact_key"] = artifact_key(ns, name, edge["version"], art)
                    if art:
                        edge.update(hash=art["hash"], algorithm=art["algorithm"], size=art["size"],
                                    hash_error=art["hashError"])
    ordered_edges = sorted(edges.values(), key=lambda d: (d["direction"], d["namespace"], d["name"]))
    return RunProjection(run=run, edges=ordered_edges)
