"""Translate one Snakemake run's log records into Recorder calls.

Snakemake logs, in its controller, a ``WORKFLOW_STARTED`` record, then for every job it runs a ``JOB_INFO`` record
when it hands the job to the executor and ``JOB_FINISHED`` (after post-processing, with the persistence record
written) or ``JOB_ERROR`` at its end. Jobs that are up to date get no ``JOB_INFO``, so they are never recorded.

Mapping:

* the run is a pipeline run: id ``uuid7_from(start, "snakemake:<workflow_id>")``, pipeline name from the option or
  the Snakefile (:func:`compat.pipeline_name`), ``extra`` = Snakefile, working directory, config hash and files,
  Snakemake's workflow id; its end is written by :meth:`WorkflowTracker.finish` (the handler's ``close``);
* each job is an execution of stage = rule: id ``uuid7_from(start, "snakemake:<workflow_id>:<jobid>")``, params =
  wildcards, threads, resources (and at its end the rule's ``params`` from the persistence record), ``extra`` =
  jobid, shell command, reason, checkpoint flag, group, whether it ran in the controller's host; inputs at start;
  outputs, logs and benchmark files at the end, hashed by the Recorder off this thread; each try of a job
  (``--retries``) is an execution of its own, with ``tryNumber`` counting from 1 as Snakemake's ``attempt`` does;
* a try fails with a ``JOB_ERROR``, or, when its command ended well but Snakemake's check of the job afterwards did
  not (outputs missing after ``--latency-wait``, say), with only an ``ERROR``: that one names the job when it is a
  missing-output error, and otherwise the try is ended by Snakemake's "Trying to restart job" message, by the
  job's next ``JOB_INFO``, or at the run's end by an unclaimed ``ERROR`` naming its rule when it is the only open
  job of that rule; any other try left open at the run's end is aborted (Snakemake cancelled it);
* times come from the records' creation times in the controller, except the end of a successful job, which is the
  newest modification time of its products (clamped between its start and when Snakemake noticed its end): on a
  cluster Snakemake notices the end only at its next status check. A job's start is when Snakemake handed it to
  the executor; on a cluster that includes its time in the queue (``extra.local`` is false there);
* energy per job: a job run by the local executor (``local`` true in its record) is measured by the node monitor
  through the processes :class:`~metatrail.plugins.snakemake.processes.JobProcesses` finds belonging to it; a job
  run elsewhere (a cluster executor) gets its energy from Slurm's accounting when the executor logged a Slurm job
  id and ``sacct`` is on ``PATH`` (:class:`metatrail.energy.accounting.ClusterJobEnergy`), else null with the
  reason "not measured here".

Records arrive on Snakemake's queue-listener thread; ``finish`` may come from another thread, hence the lock.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any

from metatrail.model import Execution, PipelineRun, Status, uuid7, uuid7_from
from metatrail.plugins.snakemake import compat
from metatrail.plugins.snakemake.guard import TEMP_REMOVED

# Under --quiet, when the open jobs are looked up in Snakemake's persistence records: at each job Snakemake starts
# (it starts one as soon as one finished) while at most FINISHED_LOOK_EVERY_START jobs are open, else at most every
# FINISHED_LOOK_S; at most FINISHED_LOOK_MAX of them (the oldest) at one look, a bound on the cost where jobs have
# no record (--drop-metadata, rules without outputs).
FINISHED_LOOK_EVERY_START = 64
FINISHED_LOOK_S = 0.2
FINISHED_LOOK_MAX = 256

INTEGRATION = "SNAKEMAKE"
DEFAULT_NAMESPACE = "snakemake"
_USER_INTERRUPT = "on user request"
# What Snakemake logs when it gives a failed job another try (``--retries``); the job is logged again, same jobid.
_RESTART = re.compile(r"^Trying to restart job (?P<jobid>\S+?)\.?$")
# The one ERROR text of a failed check after a job's command (Snakemake's MissingOutputException) that names the job.
_MISSING_OUTPUT = re.compile(r"\bJob (?P<jobid>\S+)\s+completed successfully, but some output files are missing")
_UNREPORTED_END = "Snakemake tried this job again without reporting how its previous try ended"
# How Snakemake's ERROR text names the rule of a failed job ("WorkflowError in rule x in file ...").
_IN_RULE = re.compile(r"^\w+ in rule (?P<rule>\w+)\b")
# How executors name a submitted job's id in the batch system (cluster-generic; the Slurm executor plugin).
_EXTERNAL_ID = (
    re.compile(r"^Submitted (?P<group>group )?job (?P<jobid>\S+) with external jobid '(?P<ext>[^']*)'"),
    re.compile(r"^Job (?P<jobid>\S+) has been submitted with SLURM jobid (?P<ext>\S+)"),
)
_MESSAGE_PREFIXES = ("Trying to restart", TEMP_REMOVED)


# The events :meth:`WorkflowTracker.handle` acts on; others (progress, shell commands, run and resource summaries)
# only move the run's last-seen time.
HANDLED_EVENTS = frozenset({"job_info", "job_finished", "job_error", "error", "group_info", "job_started",
                            "workflow_started"})


def record_matters(record: Any) -> bool:
    """Whether :meth:`WorkflowTracker.handle` may act on ``record`` beyond noting its time (:meth:`~WorkflowTracker.
    saw`): one of :data:`HANDLED_EVENTS`, or a plain message that :meth:`WorkflowTracker._message` reads. Cheap, as
    it runs first for every record Snakemake logs, and most are neither."""
    event = compat.event_name(record)
    if event is not None:
        return event in HANDLED_EVENTS
    msg = getattr(record, "msg", None)
    # "ubmitted": both of _EXTERNAL_ID's spellings ("Submitted job ...", "... has been submitted ...")
    return isinstance(msg, str) and ("ubmitted" in msg or msg.startswith(_MESSAGE_PREFIXES) or _USER_INTERRUPT in msg)


@dataclass
class _Job:
    """A job handed to the executor and not yet ended."""

    execution: Execution
    rule: str
    started_at: float
    products: list[str]  # absolute paths of outputs, logs and benchmark file, as the end event names them
    logs: list[str]
    metadata_key: str | None  # the first output as the rule names it: the key of Snakemake's persistence record
    jobid: Any = None
    group: str | None = None
    accounted: Any = None  # the ClusterJobEnergy of a job run outside this node


@dataclass
class _Error:
    """The text of an ``ERROR`` record, and the job whose failed try it explains once a ``JOB_ERROR`` claimed it."""

    text: str
    jobid: Any = None
    at: float = 0.0  # when it was logged


@dataclass
class _RunState:
    """The pipeline run in progress and what the records said about it so far."""

    run: PipelineRun
    pipeline: str
    namespace: str
    version: str | None
    workflow_id: str
    workdir: str
    jobs: dict[Any, _Job] = field(default_factory=dict)
    # jobid -> error of its last try, for jobs whose last try failed (a job Snakemake restarts leaves it)
    failed_jobs: dict[Any, str] = field(default_factory=dict)
    tries: dict[str, int] = field(default_factory=dict)  # jobid -> tries logged so far (JOB_INFO records)
    finished: int = 0
    saw_job_finished: bool = False
    interrupted: bool = False
    pending_error: _Error | None = None  # the last ERROR, not yet attached to a JOB_ERROR
    errors: list[_Error] = field(default_factory=list)  # ERRORs in log order, but those of restarted jobs
    temp_removed: dict[str, None] = field(default_factory=dict)  # paths Snakemake deleted as temp(), in order
    producers: dict[str, Any] = field(default_factory=dict)  # output path -> jobid, for jobs still open
    named: dict[str, int] = field(default_factory=dict)  # path -> Recorder submissions made when last named
    last_seen: float = 0.0
    next_finished_look: float = 0.0  # time.monotonic() of the next look for finished jobs (quiet mode)


class WorkflowTracker:
    """Turns the records of a Snakemake run into pipeline-run and execution calls on a Recorder.

    ``recorder`` is called once, at the first record that needs it; returning None makes the tracker inert.
    ``progress_may_be_hidden`` is true when Snakemake runs with ``--quiet`` and so may not log ``JOB_FINISHED``; the
    jobs then still unfinished at :meth:`finish` are completed there from their outputs. ``record_clock`` returns
    ``(logged, processed)`` record numbers (a :class:`~metatrail.plugins.snakemake.guard.RecordClock`): the job
    process tracking waits with guesses until the records logged before a process appeared have arrived.
    """

    def __init__(self, recorder: Callable[[], Any], *, pipeline: str | None = None, namespace: str | None = None,
                 default_namespace: Callable[[Any], str] | None = None, progress_may_be_hidden: bool = False,
                 record_clock: Callable[[], tuple[int, int]] | None = None) -> None:
        self._recorder_factory = recorder
        self._recorder: Any = None
        self._recorder_ready = False
        self._pipeline = pipeline
        self._namespace = namespace
        self._default_namespace = default_namespace
        self._progress_may_be_hidden = progress_may_be_hidden
        self._lock = threading.Lock()
        self._state: _RunState | None = None
        self._group: str | None = None
        self._submits = 0  # items handed to the Recorder (each call hands one), to tell which are stored
        self._processes: Any = None  # JobProcesses, created at the first local job
        self._record_clock = record_clock

    # -- dispatch -----------------------------------------------------------------------------------------------
    def handle(self, record: Any) -> None:
        """Act on one Snakemake log record (records of no interest return at once)."""
        event = compat.event_name(record)
        with self._lock:
            if self._state is not None:
                self._state.last_seen = max(self._state.last_seen, float(getattr(record, "created", 0.0)))
            if event is None:
                self._message(record)
            elif event == "job_info":
                self._job_started(record)
            elif event == "job_finished":
                self._job_finished(record)
            elif event == "job_error":
                self._job_failed(record)
            elif event == "error":
                self._error(record)
            elif event == "group_info":
                self._group = str(compat.record_value(record, "group_id"))
            elif event == "job_started":
                self._group = None
            elif event == "workflow_started":
                if self._state is not None:
                    self._finish_locked(None)
                self._start_run(record, compat.workflow_info(record))
            state = self._state
            if state is not None and state.jobs and self._inferring(state):
                self._complete_finished(state, job_started=event == "job_info")

    def saw(self, record: Any) -> None:
        """Note the time of a record :func:`record_matters` says needs no handling (the run ends no earlier than its
        last record). Only Snakemake's listener thread calls this; no lock: a float assigned whole."""
        state = self._state
        if state is not None:
            created = getattr(record, "created", None)
            if isinstance(created, float | int) and created > state.last_seen:
                state.last_seen = float(created)

    def finish(self, at: float | None = None) -> None:
        """End the pipeline run: jobs still open are completed (quiet mode) or aborted; safe to call twice."""
        with self._lock:
            self._finish_locked(at)

    # -- pipeline run -------------------------------------------------------------------------------------------
    def _recorder_or_none(self) -> Any:
        if not self._recorder_ready:
            self._recorder_ready = True
            self._recorder = self._recorder_factory()
        return self._recorder

    def _start_run(self, record: Any, info: dict[str, Any]) -> _RunState | None:
        recorder = self._recorder_or_none()
        if recorder is None:
            return None
        started = float(getattr(record, "created", time.time()))
        workflow_id = info["workflow_id"] or uuid7(started)
        pipeline = self._pipeline or compat.pipeline_name(info["snakefile"], info["workdir"])
        namespace = self._namespace or (self._default_namespace(recorder) if self._default_namespace
                                        else DEFAULT_NAMESPACE)
        extra = {key: info[key] for key in ("workflow_id", "snakefile", "workdir", "config_md5", "configfiles")}
        run = recorder.pipeline_run_started(
            pipeline, namespace=namespace, integration=INTEGRATION,
            run_id=uuid7_from(started, f"snakemake:{workflow_id}"), integration_version=info["snakemake_version"],
            started_at=started, extra=extra)
        self._submits += 1
        self._state = _RunState(run=run, pipeline=pipeline, namespace=namespace, version=info["snakemake_version"],
                                workflow_id=workflow_id, workdir=str(info["workdir"]), last_seen=started)
        return self._state

    def _ensure_run(self, record: Any) -> _RunState | None:
        # A run whose WORKFLOW_STARTED we did not see (a release that logs it late): start it from this record.
        if self._state is not None:
            return self._state
        fallback = compat.workflow_info(object())
        return self._start_run(record, fallback)

    def _finish_locked(self, at: float | None) -> None:
        state = self._state
        if state is None:
            return
        self._state = None
        recorder = self._recorder
        end = at if at is not None else max(state.last_seen, state.run.started_at)
        infer = self._inferring(state) and not state.interrupted
        if not state.interrupted:
            self._fail_named_by_errors(state)
        aborted = 0
        for job in state.jobs.values():
            if infer and self._complete_from_outputs(state, job, end):
                continue
            aborted += 1
            self._job_ending(job)
            recorder.execution_finished(
                job.execution, status=Status.ABORTED, outputs=_existing(job.logs), ended_at=max(end, job.started_at),
                error="Snakemake stopped before this job ended" + (" (interrupted)" if state.interrupted else ""))
            self._submits += 1
        state.jobs.clear()
        if self._processes is not None:
            self._processes.close()
            self._processes = None
        if state.interrupted:
            status, error = Status.ABORTED, "Snakemake was interrupted"
        elif state.failed_jobs or aborted or state.errors:
            status = Status.FAILED
            error = state.errors[-1].text if state.errors else (
                f"{len(state.failed_jobs)} job(s) failed, {aborted} did not end")
        else:
            status, error = Status.COMPLETED, None
        run = state.run
        if state.temp_removed:
            run = replace(run, extra={**run.extra, "temp_removed": list(state.temp_removed)})
        recorder.pipeline_run_finished(run, status=status, error=error, ended_at=max(end, run.started_at))
        self._submits += 1

    # -- jobs ---------------------------------------------------------------------------------------------------
    def _job_started(self, record: Any) -> None:
        state = self._ensure_run(record)
        if state is None:
            return
        pending, state.pending_error = state.pending_error, None
        jobid = compat.record_value(record, "jobid")
        started = float(getattr(record, "created", time.time()))
        previous = state.jobs.pop(jobid, None)
        if previous is not None:  # its try ended without a record saying how: it failed, or it would not run again
            self._try_failed(state, previous, pending, started)
        self._job_restarted(state, str(jobid))  # a job logged again is tried again, whatever the message said
        try_number = state.tries[str(jobid)] = state.tries.get(str(jobid), 0) + 1
        rule = str(compat.record_value(record, "rule_name") or "unknown")
        outputs = compat.file_list(compat.record_value(record, "output"))
        logs = compat.file_list(compat.record_value(record, "log"))
        benchmark = compat.file_list([compat.record_value(record, "benchmark")])
        threads = compat.record_value(record, "threads")
        params = {
            "wildcards": compat.wildcards(compat.record_value(record, "wildcards")),
            "threads": threads if isinstance(threads, int) else None,
            "resources": compat.resources(compat.record_value(record, "resources")),
        }
        inputs = _absolute(compat.file_list(compat.record_value(record, "input")), state.workdir)
        if self._inferring(state):
            self._complete_producers(state, inputs, started)
        group = self._group if compat.record_value(record, "indent", False) else None
        extra = {
            "jobid": jobid,
            "shellcmd": compat.record_value(record, "shellcmd"),
            "reason": _text(compat.record_value(record, "reason")),
            "rule_msg": _text(compat.record_value(record, "rule_msg")),
            "is_checkpoint": bool(compat.record_value(record, "is_checkpoint", False)),
            "local": compat.record_value(record, "local"),
            "group_id": group,
        }
        source, accounted = self._energy_source(jobid, rule, record, extra)
        execution = self._recorder.execution_started(
            state.pipeline, rule, pipeline_run=state.run, namespace=state.namespace,
            execution_id=uuid7_from(started, f"snakemake:{state.workflow_id}:{jobid}"),
            inputs=inputs, params=params, integration=INTEGRATION, started_at=started, try_number=try_number,
            integration_version=state.version, extra=extra, measure_energy=source is not None,
            energy_source=source)
        self._submitted(state, inputs)
        job = _Job(execution=execution, rule=rule, started_at=started,
                   products=_absolute(outputs + logs + benchmark, state.workdir), logs=_absolute(logs, state.workdir),
                   metadata_key=outputs[0] if outputs else None, jobid=jobid, group=group,
                   accounted=accounted)
        state.jobs[jobid] = job
        if self._inferring(state):
            for path in job.products:
                state.producers[path] = jobid

    def _energy_source(self, jobid: Any, rule: str, record: Any, extra: dict[str, Any]) -> tuple[Any, Any]:
        """What the job's energy is read from: its processes here, or the cluster's accounting (see module doc).
        ``(None, None)`` when energy metering is unavailable: the job is then recorded without it."""
        try:
            if extra.get("local") is False:
                from metatrail.energy.accounting import ClusterJobEnergy

                accounted = ClusterJobEnergy(executor="cluster")
                return accounted, accounted
            if self._processes is None:
                from metatrail.plugins.snakemake.processes import JobProcesses

                self._processes = JobProcesses(record_clock=self._record_clock)
            wildcards = compat.record_value(record, "wildcards")
            feed = self._processes.job_started(jobid, rule, wildcards if isinstance(wildcards, dict) else None,
                                               _text(extra.get("shellcmd")))
            return feed, None
        except Exception as exc:  # energy must never cost the job its record
            from metatrail.logsafe import log_once

            log_once(f"snakemake-energy:{type(exc).__name__}", "metatrail: Snakemake jobs recorded without energy "
                     "(%s: %s)", type(exc).__name__, exc)
            return None, None

    def _job_ending(self, job: _Job) -> None:
        # Settle the job's processes before its energy window closes (the Recorder's stop comes next).
        if self._processes is not None and job.accounted is None:
            self._processes.job_ended(job.jobid)

    def _external_id(self, state: _RunState, message: str) -> None:
        for pattern in _EXTERNAL_ID:
            match = pattern.match(message)
            if match is None:
                continue
            ext, ident = match.group("ext").strip(), match.group("jobid")
            jobs = [job for key, job in state.jobs.items() if str(key) == ident]
            if not jobs and match.groupdict().get("group"):
                # A group job is named by an id no record carries: it is the group whose members were logged last
                # and have no external id yet.
                waiting = [job for job in state.jobs.values()
                           if job.group and job.accounted is not None and job.accounted.external_id is None]
                jobs = [job for job in waiting if job.group == waiting[-1].group] if waiting else []
            for job in jobs:
                if job.accounted is not None:
                    job.accounted.external_id = ext
            return

    def _inferring(self, state: _RunState) -> bool:
        # Under --quiet Snakemake may log no JOB_FINISHED; until one is seen, job ends are inferred.
        return self._progress_may_be_hidden and not state.saw_job_finished

    def _complete_finished(self, state: _RunState, *, job_started: bool) -> None:
        """Complete the open jobs whose persistence record says they finished (quiet mode, where no JOB_FINISHED
        comes). Without this a job stayed open until a job reading its outputs started, or the run ended: its energy
        window stayed open as long, and the energy monitor went through every such window at each sample, a cost
        that grew with the square of the number of jobs (300 no-op jobs under ``-q`` took 1.1 s of the monitor's
        CPU, against 0.1 s without ``-q``). Looked up when a record is handled: at a job's start (Snakemake starts
        the next job as soon as one finished) while few jobs are open, else at most every :data:`FINISHED_LOOK_S`;
        the oldest open jobs first."""
        now = time.monotonic()
        if now < state.next_finished_look and not (job_started and len(state.jobs) <= FINISHED_LOOK_EVERY_START):
            return
        state.next_finished_look = now + FINISHED_LOOK_S
        if not os.path.isdir(os.path.join(state.workdir, ".snakemake", "metadata")):
            return  # --drop-metadata, or the database backend: nothing to look up
        looked = 0
        for jobid, job in list(state.jobs.items()):
            if job.metadata_key is None:
                continue
            looked += 1
            if looked > FINISHED_LOOK_MAX:
                break
            metadata = compat.read_metadata(job.metadata_key, state.workdir)
            if not compat.finished_since(metadata, job.started_at):
                continue
            if self._complete_from_outputs(state, job, time.time(), metadata=metadata):
                del state.jobs[jobid]

    def _complete_producers(self, state: _RunState, inputs: Iterable[str], now: float) -> None:
        # A job can only start once the jobs producing its inputs ended: complete those (from their outputs).
        for path in inputs:
            for candidate in (path, *(str(p) for p in PurePath(path).parents)):  # a file in a directory() output
                jobid = state.producers.get(candidate)
                job = state.jobs.get(jobid) if jobid is not None else None
                if job is not None and self._complete_from_outputs(state, job, now):
                    del state.jobs[jobid]

    def _job_finished(self, record: Any) -> None:
        state = self._state
        if state is None:
            return
        state.saw_job_finished = True
        state.pending_error = None
        job = state.jobs.pop(compat.record_value(record, "job_id"), None)
        if job is None:
            return
        noticed = float(getattr(record, "created", time.time()))
        self._complete(state, job, _end_time(job, noticed))

    def _complete(self, state: _RunState, job: _Job, ended: float, *,
                  metadata: dict[str, Any] | None = None) -> None:
        """Record the job's successful end; ``metadata``: its persistence record, when the caller read it already."""
        self._job_ending(job)
        execution = job.execution
        if metadata is None and job.metadata_key:
            metadata = compat.read_metadata(job.metadata_key, state.workdir)
        rule_params = compat.rule_params(metadata)
        if rule_params is not None:
            # A copy: the START event is built from the original handle on the writer thread, and must not race
            # with parameters only known now.
            execution = replace(execution, params={**execution.params, "params": rule_params},
                                extra=dict(execution.extra))
        state.finished += 1
        self._recorder.execution_finished(execution, outputs=job.products, ended_at=ended)
        self._submitted(state, job.products)

    def _complete_from_outputs(self, state: _RunState, job: _Job, end: float, *,
                               metadata: dict[str, Any] | None = None) -> bool:
        # Ended well if every output is there, or was there until Snakemake removed it as temporary.
        outputs = [p for p in job.products if p not in job.logs]
        if not all(p in state.temp_removed or os.path.exists(p) for p in outputs):
            return False
        for path in job.products:
            state.producers.pop(path, None)
        self._complete(state, job, _end_time(job, end), metadata=metadata)
        return True

    def _job_failed(self, record: Any) -> None:
        state = self._state
        if state is None:
            return
        job = state.jobs.pop(compat.record_value(record, "jobid"), None)
        if job is None:
            return
        pending, state.pending_error = state.pending_error, None
        rule_msg = _text(compat.record_value(record, "rule_msg"))
        self._try_failed(state, job, pending, float(getattr(record, "created", time.time())),
                         fallback=rule_msg or f"Error in rule {job.rule}")

    def _try_failed(self, state: _RunState, job: _Job, error: _Error | None, ended: float, *,
                    fallback: str = _UNREPORTED_END) -> None:
        """Record the failed end of ``job``'s current try and take the job out of ``state.jobs``; ``error``, the
        ERROR that explains it, is claimed for the job (so that a retry of the job clears it)."""
        state.jobs.pop(job.jobid, None)
        self._job_ending(job)
        text = error.text if error is not None else fallback
        if error is not None:
            error.jobid = job.jobid
        state.failed_jobs[job.jobid] = text
        self._recorder.execution_failed(job.execution, error=text, outputs=_existing(job.logs),
                                        ended_at=max(ended, job.started_at), exit_code=compat.exit_code(text))
        self._submits += 1

    def _error(self, record: Any) -> None:
        state = self._state
        if state is None:
            return
        error = _Error(_message_text(record), at=float(getattr(record, "created", time.time())))
        state.errors.append(error)
        missing = _MISSING_OUTPUT.search(error.text)
        job = self._open_job(state, missing.group("jobid")) if missing is not None else None
        if job is None:
            state.pending_error = error
            return
        # The job's command ended well, then Snakemake found outputs missing: no JOB_ERROR follows for this.
        self._try_failed(state, job, error, error.at)

    def _fail_named_by_errors(self, state: _RunState) -> None:
        """At the run's end: fail the open jobs that an unclaimed ERROR names by rule, when each is the only open job
        of its rule that had started by then. That is a check after the job's command that failed on its last try
        (an empty ``ensure(non_empty=True)`` output, say): Snakemake logs the ERROR and nothing else for the job."""
        for error in state.errors:
            named = _IN_RULE.match(error.text) if error.jobid is None else None
            if named is None:
                continue
            jobs = [job for job in state.jobs.values()
                    if job.rule == named.group("rule") and job.started_at <= error.at]
            if len(jobs) == 1:
                self._try_failed(state, jobs[0], error, error.at)

    @staticmethod
    def _open_job(state: _RunState, jobid: str) -> _Job | None:
        """The open job whose id reads ``jobid`` in a message."""
        return next((job for key, job in state.jobs.items() if str(key) == jobid), None)

    def _job_restarted(self, state: _RunState, jobid: str) -> None:
        """Snakemake tries job ``jobid`` again (``--retries``): its failed try stays recorded as FAIL, but it no
        longer fails the run; a later try that fails again does."""
        for key in [key for key in state.failed_jobs if str(key) == jobid]:
            del state.failed_jobs[key]
        state.errors = [e for e in state.errors if e.jobid is None or str(e.jobid) != jobid]

    def _submitted(self, state: _RunState, paths: Iterable[str]) -> None:
        self._submits += 1
        for path in paths:
            state.named[path] = self._submits

    def wait_hashed(self, message: str, deadline: float) -> bool:
        """Wait (until the ``time.monotonic`` ``deadline``) until the Recorder has stored the last event that names
        the temp file of a "Removing temporary output" ``message``; False if the deadline passed.

        The Recorder works first in, first out and only this tracker feeds it, so that event is stored once no
        more than (submissions since it) items are pending. Otherwise the Recorder is flushed: its writer then
        stores what it holds at once instead of lingering for a fuller batch."""
        with self._lock:
            state, recorder = self._state, self._recorder
            if state is None or recorder is None:
                return True
            paths = _absolute(_temp_paths(message), state.workdir)
            mark = max((state.named.get(p, 0) for p in paths), default=0)
            allowed = self._submits - mark
        if mark == 0 or recorder.pending <= allowed:
            return True
        remaining = deadline - time.monotonic()
        return remaining > 0 and bool(recorder.flush(remaining))

    # -- plain messages -----------------------------------------------------------------------------------------
    def _message(self, record: Any) -> None:
        state = self._state
        if state is None:
            return
        msg = record.msg if isinstance(record.msg, str) else None
        if not msg:
            return
        if "submitted" in msg.lower():
            self._external_id(state, msg)
        restart = _RESTART.match(msg) if msg.startswith("Trying to restart") else None
        if restart is not None:
            job = self._open_job(state, restart.group("jobid"))
            if job is not None:  # a check after its command failed (the ERROR just before says which)
                pending, state.pending_error = state.pending_error, None
                self._try_failed(state, job, pending, float(getattr(record, "created", time.time())))
            self._job_restarted(state, restart.group("jobid"))
        if msg.startswith(TEMP_REMOVED):
            state.temp_removed.update(dict.fromkeys(_absolute(_temp_paths(msg), state.workdir)))
        elif _USER_INTERRUPT in msg:
            state.interrupted = True


def _temp_paths(message: str) -> list[str]:
    text = message[len(TEMP_REMOVED):] if message.startswith(TEMP_REMOVED) else ""
    return compat.file_list([text[:-1] if text.endswith(".") else text])


def _message_text(record: Any) -> str:
    try:
        return str(record.getMessage())
    except Exception:  # a record whose arguments do not format: its raw text still says something
        return str(getattr(record, "msg", ""))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _absolute(paths: Iterable[str], workdir: str) -> list[str]:
    # Storage URIs stay as they are; local paths are resolved against the workflow's working directory, not the
    # writer thread's cwd at hashing time.
    return [p if "://" in p else os.path.normpath(os.path.join(workdir, p)) for p in paths]


def _existing(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if os.path.lexists(p)]


def _end_time(job: _Job, noticed: float) -> float:
    """When the job ended: its newest product's mtime, clamped to [start, noticed] (see module docstring)."""
    newest: float | None = None
    for path in job.products:
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        newest = mtime if newest is None else max(newest, mtime)
    if newest is None:
        return max(noticed, job.started_at)
    return min(max(newest, job.started_at), max(noticed, job.started_at))
