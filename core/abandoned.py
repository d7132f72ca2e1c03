"""Runs that nothing will finish: stored as running, but the process that recorded them has ended.

A Snakemake controller killed with SIGKILL, an Airflow task runner killed at its time limit, a node that rebooted:
the run's START is stored, its end never comes, and the run would show as running for ever. Nothing in the store
can say so (every event is a fact someone recorded, and merging sites must not depend on when one looks), so this is
told when the store is read, from facts about this machine:

* a run's execution facet names the host and the pid of the process that recorded it. Only on that host is the run
  looked at: when no process has that pid, or the process that has it now started after the run's latest event that
  names it (the pid was reused; a reboot does the same), the process that recorded the run has ended. (Not after the
  run's start: a deferred Airflow task resumes in a new process, whose START names the new pid);
* that alone does not make a run abandoned: an execution whose job process has ended is finished by the
  controller that recorded its start (Snakemake ends a job's run when its record arrives, which ``--quiet`` can defer
  to the end of the workflow). So a run with a parent (pipeline) run is abandoned only when its parent has ended too,
  or is itself abandoned; a parent that is not in the store, or recorded on another host, leaves the question open;
* a run with no facet (another OpenLineage producer's), recorded on another host, or from another site (pulled from a
  peer, whose host names may be the same as ours) is never called abandoned: it is not known here. Nor is a run
  whose recording process does not own it (:data:`UNOWNED_PIPELINE_RUNS`: an Airflow DAG run outlives scheduler
  restarts); ``metatrail pipeline start`` records the pid of the script that called it, whose run it is.

Looking writes nothing: ``metatrail runs`` and ``metatrail show`` say *abandoned* and why. ``metatrail abort``
records the end (:func:`abort_event`): an ABORT event at the run's last known moment, with the reason, and with the
duration left null (the run ended at some unknown time after that moment), so the run's state is right in this store
and wherever the event is shipped."""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from metatrail.openlineage.events import iso_time
from metatrail.openlineage.names import PRODUCER, spec_facet_url
from metatrail.store.projection import ABANDONED_PREFIX, parse_event_time

# A pid's present process must have started this much later than the run for the pid to count as reused: clocks of
# the process table and of the recorded event differ by rounding, and a process records its START after it started.
REUSE_SLACK_S = 2.0

OPEN_STATES = frozenset({"running"})

# Hosts whose pipeline runs are not owned by the process that recorded their start: an Airflow DAG run is started by
# a scheduler, which may restart (or hand over to another) while the run goes on, and ended by whichever is running
# then. Such runs are never judged here, and their executions only once the run has ended.
UNOWNED_PIPELINE_RUNS = frozenset({"AIRFLOW"})


def recorder_gone(host: Any, pid: Any, alive_at: float | None, *, this_host: str | None = None) -> str | None:
    """Why the process that recorded a run (``host``, ``pid``; known alive at ``alive_at``, the time of an event it
    recorded) has ended, or None when it is alive or this machine cannot tell (another host, no pid, no permission
    to look)."""
    return _fate(host, pid, alive_at, this_host)[1]


def _fate(host: Any, pid: Any, alive_at: float | None, this_host: str | None) -> tuple[str, str | None]:
    """("alive" | "gone" | "reused" | "unknown", why gone); "reused": the pid's process started after ``alive_at``."""
    import psutil

    here = this_host if this_host is not None else socket.gethostname()
    if not isinstance(host, str) or host != here or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "unknown", None
    ended = f"the process that recorded it (pid {pid} on {host}) has ended"
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "gone", ended
        created = process.create_time()
    except psutil.NoSuchProcess:
        return "gone", ended
    except Exception:  # no permission to look, or no process table here: cannot tell
        return "unknown", None
    if alive_at is not None and created > alive_at + REUSE_SLACK_S:
        return "reused", f"{ended}: the pid now belongs to a process started later"
    return "alive", None


def _named_at(run: Mapping[str, Any], pid: Any, events_of: Callable[[str], Iterable[Any]] | None) -> float | None:
    """The last moment the run's recording process ``pid`` is known alive: its latest event that names that pid (a
    deferred Airflow task resumes in a new process, so the run's first START may be older than its process). Without
    ``events_of``, the run's start."""
    started = run.get("started_at")
    if events_of is None:
        return started if isinstance(started, (int, float)) else None
    latest: float | None = None
    for stored in events_of(run["run_id"]):
        body = stored.body
        facet = ((body.get("run") or {}).get("facets") or {}).get("metatrail_execution") or {}
        if (body.get("run") or {}).get("runId") != run["run_id"] or facet.get("pid") != pid:
            continue
        try:
            moment = parse_event_time(body.get("eventTime"))
        except Exception:
            continue
        latest = moment if latest is None else max(latest, moment)
    return latest if latest is not None else (started if isinstance(started, (int, float)) else None)


def _identity(run: Mapping[str, Any]) -> tuple[Any, Any]:
    """The recording process's host and pid of a run row (``list_runs``) or a run (``get_run``)."""
    if "host" in run or "pid" in run:
        return run.get("host"), run.get("pid")
    ours = (run.get("facets") or {}).get("metatrail_execution") or {}
    return ours.get("host"), ours.get("pid")


def recording_process(run: Mapping[str, Any], events_of: Callable[[str], Iterable[Any]] | None = None, *,
                      this_host: str | None = None) -> tuple[str, str | None]:
    """Whether the process that recorded ``run`` (a row of ``list_runs`` or a ``get_run``) is "alive", "gone" (with
    why) or "unknown" here. ``events_of(run_id)`` (``Store.iter_events``) lets a pid that now belongs to a process
    started after the run began be told apart from the run's own later process."""
    if run.get("kind") == "pipeline_run" and str(run.get("integration") or "").upper() in UNOWNED_PIPELINE_RUNS:
        return "unknown", None
    host, pid = _identity(run)
    fate = _fate(host, pid, run.get("started_at"), this_host)
    if fate[0] == "reused":
        # Reused, or the run's own process of a later event (a resumed task)? Compare with that event's time.
        fate = _fate(host, pid, _named_at(run, pid, events_of), this_host) if events_of is not None \
            else ("unknown", None)
    return ("gone", fate[1]) if fate[0] == "reused" else fate


def find_abandoned(runs: Iterable[Mapping[str, Any]], get_run: Callable[[str], Mapping[str, Any] | None], *,
                   events_of: Callable[[str], Iterable[Any]] | None = None, site: str | None = None,
                   this_host: str | None = None) -> dict[str, str]:
    """Of ``runs`` (rows as ``Store.list_runs`` gives them), those that are abandoned, by run id, with the reason.
    ``get_run`` looks up a parent run that is not among them (``Store.get_run``); ``events_of`` as for
    :func:`recording_process` (without it, a reused-looking pid leaves the run undecided). With ``site`` (this machine's
    configured site), a run from another site (pulled from a peer) is never judged: its host name may be the same
    as this one's, its pids are not this machine's."""
    known: dict[str, Mapping[str, Any] | None] = {r["run_id"]: r for r in runs}
    verdicts: dict[str, str | None] = {}

    def lookup(run_id: str) -> Mapping[str, Any] | None:
        if run_id not in known:
            known[run_id] = get_run(run_id)
        return known[run_id]

    def verdict(run: Mapping[str, Any], depth: int = 0) -> str | None:
        run_id = run["run_id"]
        if run_id in verdicts:
            return verdicts[run_id]
        verdicts[run_id] = None  # a parent cycle (a malformed store) ends here, undecided
        if run.get("state") not in OPEN_STATES or depth > 16:
            return None
        if site is not None and run.get("site") not in (None, site):
            return None
        gone = recording_process(run, events_of, this_host=this_host)[1]
        if gone is None:
            return None
        parent_id = run.get("parent_run_id")
        if parent_id:
            parent = lookup(parent_id)
            if parent is None:
                return None
            if parent.get("state") in OPEN_STATES:
                if verdict(parent, depth + 1) is None:
                    return None
                gone += "; its pipeline run is abandoned too"
            else:
                gone += f"; its pipeline run has ended ({parent.get('state')})"
        verdicts[run_id] = gone
        return gone

    found: dict[str, str] = {}
    for run in list(known.values()):
        if run is not None and (reason := verdict(run)) is not None:
            found[run["run_id"]] = reason
    return found


def abort_events(store: Any, reasons: Mapping[str, str], *, by: str, now: float | None = None
                 ) -> list[dict[str, Any]]:
    """The ABORT events (:func:`abort_event`) that end the runs of ``reasons`` (run id -> reason) in ``store``: each at
    its run's last known moment, the latest time of its own events and its child runs' events. A run with no event
    in the store is left out."""
    out = []
    for run_id, reason in reasons.items():
        seen: float | None = None
        latest: tuple[float, Mapping[str, Any]] | None = None
        for stored in store.iter_events(run_id=run_id):
            try:
                moment = parse_event_time(stored.body.get("eventTime"))
            except Exception:
                continue
            seen = moment if seen is None else max(seen, moment)
            if (stored.body.get("run") or {}).get("runId") == run_id and (latest is None or moment >= latest[0]):
                latest = (moment, stored.body)
        if latest is not None and seen is not None:
            out.append(abort_event(latest[1], reason, seen=seen, by=by, now=now))
    return out


def abort_event(latest: Mapping[str, Any], reason: str, *, seen: float, by: str, now: float | None = None
                ) -> dict[str, Any]:
    """An ABORT event for the run of ``latest`` (its latest event, whose job and facets it keeps, so the run keeps
    its name, pipeline and parent), at ``seen`` (the run's last known moment), saying ``reason``; its execution
    facet, when it has one, says ``extra.abandoned`` (reason, last seen, when and by what this was recorded) and
    leaves the duration null."""
    event = copy.deepcopy(dict(latest))
    event["eventType"] = "ABORT"
    event["eventTime"] = iso_time(seen)
    event["producer"] = PRODUCER
    event["inputs"], event["outputs"] = [], []
    run = event.setdefault("run", {})
    facets = {k: v for k, v in (run.get("facets") or {}).items() if k not in ("metatrail_energy", "errorMessage")}
    ours = facets.get("metatrail_execution")
    if isinstance(ours, dict):
        extra = dict(ours.get("extra") or {})
        extra["abandoned"] = {"reason": reason, "last_seen": iso_time(seen),
                              "recorded_at": iso_time(now if now is not None else time.time()), "by": by}
        facets["metatrail_execution"] = {**ours, "extra": extra, "durationSeconds": None, "exitCode": None,
                                         "metrics": {}}
    facets["errorMessage"] = {"_producer": PRODUCER, "_schemaURL": spec_facet_url("ErrorMessageRunFacet"),
                              "message": f"{ABANDONED_PREFIX}{reason}", "programmingLanguage": "python"}
    run["facets"] = facets
    return event


def is_abandoned_record(run: Mapping[str, Any]) -> bool:
    """Whether a run's end was recorded by :func:`abort_event` (its duration is then unknown), from a run as the
    store lists it: aborted, with the error message that event gives."""
    return run.get("state") == "aborted" and str(run.get("error") or "").startswith(ABANDONED_PREFIX)


__all__ = ["abort_event", "abort_events", "find_abandoned", "is_abandoned_record", "recorder_gone", "recording_process"]
