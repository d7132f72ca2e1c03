"""Which of the Snakemake controller's child processes belong to which running job (local execution).

Snakemake's local executor runs each job from a pool thread of the controller: ``shell:`` and ``script:`` rules
as a ``bash -c`` child started by ``snakemake.shell.shell`` (which keeps ``jobid -> Popen`` in
``shell._processes`` while it runs), ``run:`` rules as a spawned ``python -m snakemake --target-jobs
'<rule>:<wildcards>'`` child. No log record names a pid. :class:`JobProcesses` looks at the controller's direct
children every ``poll_s`` (0.1 s; only while local jobs run) and assigns each new one to a job:

1. **exact**: the pid is the ``Popen`` Snakemake registered for that job id (if that job's record has not reached
   the plugin yet, the child waits for it);
2. **command line**: the child runs the job's shell command, or is the spawned job for its rule and wildcards;
3. **by elimination**: once every record Snakemake logged before the child was first seen has reached the plugin
   (so its job, if any, is known: a job's record is logged before its process starts, but is delivered later,
   on Snakemake's log listener thread), a child still unassigned goes to the one running job that has no process
   of its own from steps 1-2 (non-shell jobs first: a ``script:`` rule's interpreter names only a temporary
   file, and Snakemake runs a version check of that interpreter before it); a spawned job's child waits for its
   own job, and a child that has not yet exec'd (its command line is still the controller's) waits for that;
4. **equal split**: with several such jobs, each gets an equal share of it, and the facet says so
   (``shared_process`` and a sentence in ``errors``). A child when every running job has its own process is the
   controller's own.

The job's whole tree is counted (grandchildren through the child). When a child exits, the controller's
reaped-children CPU time (``os.times()``) grows by exactly that tree's CPU time (the child and every descendant
it waited for): the child's final figure is its tree's CPU time at the last look (live descendants included:
a ``bash -c`` child's interpreter is not in bash's own counters until bash reaps it) plus its share of the part
of the increase no look saw, so the tail after the energy monitor's last sample is not lost. An increase with
no known child gone belongs to processes born and reaped between two looks: it goes to the running jobs that have
no process yet, as in steps 3-4. A child that exits before any job claimed it waits (with its final figure) in
the same way. At a job's end
(``JOB_FINISHED``/``JOB_ERROR``) one more look settles its processes before its energy window closes.

Limits: a child that is not a job's (metatrail's own threads are left out) is assigned like one if a job lacks
a process of its own at that moment; processes a job leaves running in the background are
followed only while the child lives; a process started by a ``threading.Timer`` thread is not seen alive (see
:class:`~metatrail.energy.procfs.ChildrenReader`). Thread-safe; nothing here raises into Snakemake.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from metatrail.energy.cputime import ProcessTree
from metatrail.energy.processes import TaskProcesses
from metatrail.energy.procfs import ChildrenReader, read_all
from metatrail.logsafe import log_once

POLL_S = 0.1
FALLBACK_AFTER = 3  # looks before a child no job claims is assigned by elimination (its job's record may lag)
log = logging.getLogger("metatrail")


@dataclass
class _Job:
    jobid: Any
    rule: str
    target: str  # ``rule:k=v,...`` as Snakemake's --target-jobs writes it
    shellcmd: str | None
    feed: TaskProcesses
    roots: set[int] = field(default_factory=set)
    claimed: bool = False  # a process is certainly its own (steps 1-2), so no guessed one goes to it
    ended: bool = False


@dataclass
class _Child:
    """A direct child of the controller (or, ``orphan``, CPU time of children never seen alive)."""

    pid: int
    first_seen: int  # poll number
    logged_at: int | None  # number of the last record logged when it was first seen (None: no record clock)
    cmdline: str = ""
    jobs: list[Any] = field(default_factory=list)  # job ids it was assigned to (several: equal split)
    cpu_s: float = 0.0  # own + reaped children's CPU seconds at the last look
    spawned: bool = False  # a spawned job (--target-jobs): only its own job may have it
    popen_job: Any = None  # the job id Snakemake registered its Popen under, before that job's record arrived
    final_s: float | None = None  # its tree's final CPU seconds, once it exited
    ignored: bool = False  # the controller's own (no job was waiting for a process)
    orphan: bool = False
    tree: ProcessTree | None = None  # reads its whole tree's CPU time: its own, reaped and live descendants'

    @property
    def waits_for_its_job(self) -> bool:
        return self.spawned or self.popen_job is not None


def _children(reader: ChildrenReader) -> list[int]:
    """Direct children of the reader's process; psutil's list where the kernel has no ``children`` files."""
    kids = reader.children()
    return _children_psutil(reader.pid) if kids is None else kids


def _read_proc(path: str) -> bytes | None:
    """A ``/proc`` file's content (raw system calls: a buffered ``open`` costs several times more); None when it
    does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return b""
    try:
        return read_all(fd)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _children_psutil(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _cmdline(pid: int) -> str:
    data = _read_proc(f"/proc/{pid}/cmdline")
    return data.replace(b"\0", b" ").decode("utf-8", "replace") if data else ""


def _reaped_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _registered_popens() -> dict[int, Any]:
    """pid -> job id of the shell processes Snakemake registered (``snakemake.shell.shell._processes``)."""
    module = sys.modules.get("snakemake.shell")
    shell = getattr(module, "shell", None)
    processes = getattr(shell, "_processes", None)
    if not isinstance(processes, dict):
        return {}
    try:
        items = list(processes.items())  # one C-level copy: safe against Snakemake's threads changing it
    except RuntimeError:
        return {}
    out: dict[int, Any] = {}
    for jobid, proc in items:
        pid = getattr(proc, "pid", None)
        if isinstance(pid, int):
            out[pid] = jobid
    return out


def target_spec(rule: str, wildcards: Mapping[str, Any] | None) -> str:
    """The ``--target-jobs`` spelling of a job (``rule:k=v,k2=v2``), as a spawned job's command line has it."""
    def quoted(value: Any) -> str:
        text = str(value)
        return f'"{text}"' if "," in text else text

    return f"{rule}:" + ",".join(f"{k}={quoted(v)}" for k, v in (wildcards or {}).items())


class JobProcesses:
    """Assigns the controller's children to running jobs and feeds each job's :class:`TaskProcesses`.

    ``record_clock`` returns ``(logged, processed)``: the number of the last record Snakemake logged and of the last
    one the plugin has handled. A job's record is logged before its process starts, but reaches the plugin later
    (on Snakemake's listener thread, behind other records); so a process no job claims is assigned by a guess
    (steps 3-4 of the module docstring) only once every record logged before it was seen has been handled. Without
    a clock the guess waits ``FALLBACK_AFTER`` looks instead.
    """

    def __init__(self, *, poll_s: float = POLL_S, controller_pid: int | None = None,
                 record_clock: Callable[[], tuple[int, int]] | None = None) -> None:
        self.poll_s = poll_s
        self.pid = controller_pid if controller_pid is not None else os.getpid()
        self._record_clock = record_clock
        self._own_cmdline = _cmdline(self.pid)
        # Timer threads only wait, then call one function (Snakemake starts one per rescheduling, dozens can be
        # alive): none starts a job's process.
        self._reader = ChildrenReader(self.pid, skip_timers=True)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._jobs: dict[Any, _Job] = {}
        self._children: dict[int, _Child] = {}
        self._parked: list[_Child] = []  # exited before any job claimed them: assigned once their job is known
        self._reaped = _reaped_cpu()
        self._polls = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- called by the tracker (Snakemake's log listener thread) ----------------------------------------------
    def job_started(self, jobid: Any, rule: str, wildcards: Mapping[str, Any] | None,
                    shellcmd: str | None) -> TaskProcesses:
        """Start following a job; returns the process set to pass to the Recorder as its energy source."""
        feed = TaskProcesses()
        job = _Job(jobid, rule, target_spec(rule, wildcards), (shellcmd or "").strip() or None, feed)
        with self._lock:
            self._jobs[jobid] = job
            # Processes seen before this record arrived (alive or already exited) that are this job's.
            for child in [*self._children.values(), *self._parked]:
                if not child.jobs and not child.ignored and not child.orphan and _claims(job, child):
                    self._give(child, [jobid], certain=True)
        self._ensure_thread()
        self._wake.set()
        return feed

    def job_ended(self, jobid: Any) -> None:
        """Settle the job's processes (one more look) and close its set, before its energy window closes.
        Called while the tracker handles the job's end record."""
        with self._lock:
            job = self._jobs.get(jobid)
            if job is None:
                return
            try:
                self._poll(handling_record=True)
            except Exception as exc:
                log_once(f"snakemake-processes:{type(exc).__name__}",
                         "metatrail: could not follow Snakemake's job processes (%s: %s)", type(exc).__name__, exc)
            job.ended = True
            del self._jobs[jobid]
            if not job.roots:
                job.feed.note("no process of this job was seen alive: its CPU time is what the controller "
                              "reaped while it ran (see the other notes)")
            job.feed.close()

    def close(self) -> None:
        """Stop looking (the run ended)."""
        self._closed = True
        self._wake.set()
        with self._lock:
            self._reader.close()

    # -- the looking thread -----------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        thread = threading.Thread(target=self._run, name="metatrail-snakemake-jobs", daemon=True)
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                idle = not self._jobs and not self._parked
            if idle:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                with self._lock:
                    self._poll()
            except Exception as exc:
                log_once(f"snakemake-processes:{type(exc).__name__}",
                         "metatrail: could not follow Snakemake's job processes (%s: %s)", type(exc).__name__, exc)
            time.sleep(self.poll_s)

    def _poll(self, *, handling_record: bool = False) -> None:
        """One look (under the lock): assign new children, hand final figures of exited ones to their jobs.
        ``handling_record``: called while the plugin handles a record (that record counts as handled)."""
        self._polls += 1
        position = self._record_clock() if self._record_clock is not None else None
        logged = position[0] if position is not None else None
        handled = position[1] + (1 if handling_record else 0) if position is not None else None
        children = set(_children(self._reader))
        reaped = _reaped_cpu()
        gained, self._reaped = max(0.0, reaped - self._reaped), reaped
        popens = _registered_popens()
        gone = [c for pid, c in self._children.items() if pid not in children]
        for c in gone:
            del self._children[c.pid]
        for pid in sorted(children):
            if pid not in self._children:
                child = self._children[pid] = _Child(pid, self._polls, logged, _cmdline(pid),
                                                     tree=ProcessTree(pid, True))
                self._assign_exact(child, popens)
        for child in self._children.values():
            if not child.jobs and not child.ignored:
                if child.first_seen < self._polls:
                    self._assign_exact(child, popens)  # Snakemake registers its Popen just after starting it
                if not child.jobs and self._may_guess(child, handled):
                    self._assign_fallback(child)
            cpu = child.tree.seconds() if child.tree is not None else None
            if cpu is not None:
                child.cpu_s = max(child.cpu_s, cpu)
        if gone:
            # The reaped counter grew by the gone children's trees: each gets its last look plus a share of the
            # tail nobody saw (the CPU time it spent after that look).
            surplus = max(0.0, gained - sum(c.cpu_s for c in gone)) / len(gone)
            for c in gone:
                c.final_s = c.cpu_s + surplus
                if c.jobs:
                    self._exited(c)
                elif not c.ignored:
                    self._parked.append(c)
        elif gained > 0:  # processes born and reaped between two looks
            # At a job's end record, the likeliest owner is that job (reaped just before the record was logged):
            # the guess is made now, among the jobs known so far, rather than after later records arrive.
            at = handled if handling_record else logged
            self._parked.append(_Child(0, self._polls, at, final_s=gained, orphan=True))
        if self._parked:
            self._settle_parked(handled)

    def _may_guess(self, child: _Child, handled: int | None) -> bool:
        """Whether an unclaimed process may now be assigned by elimination (see the class docstring)."""
        if child.waits_for_its_job:
            return False
        if child.final_s is None and child.cmdline == self._own_cmdline:
            return False  # forked, not yet exec'd: the next look tells what it runs
        if handled is None or child.logged_at is None:
            return (child.final_s is not None or child.first_seen + FALLBACK_AFTER <= self._polls
                    or not self._jobs)
        return handled >= child.logged_at and (child.final_s is not None or child.first_seen < self._polls)

    def _settle_parked(self, handled: int | None) -> None:
        waiting: list[_Child] = []
        for item in self._parked:
            if item.jobs:
                continue  # claimed by its job when that job's record arrived
            caught_up = handled is None or item.logged_at is None or handled >= item.logged_at
            if item.waits_for_its_job and caught_up:
                continue  # its job's record came and did not claim it: that job had already ended
            if self._may_guess(item, handled):
                if item.orphan:
                    self._orphan_cpu(item.final_s or 0.0)
                else:
                    self._assign_fallback(item)
                continue
            waiting.append(item)
        self._parked = waiting

    def _exited(self, child: _Child) -> None:
        for jobid in child.jobs:
            job = self._jobs.get(jobid)
            if job is not None:
                job.feed.exited(child.pid, child.final_s)

    def _assign_exact(self, child: _Child, popens: Mapping[int, Any]) -> None:
        jobid = popens.get(child.pid)
        if jobid is not None:
            if jobid in self._jobs:
                self._give(child, [jobid], certain=True)
            else:
                child.popen_job = jobid  # its job's record has not arrived yet
            return
        if child.first_seen < self._polls:
            child.cmdline = _cmdline(child.pid) or child.cmdline  # it may have exec'd since the last look
        if not child.cmdline:
            return
        child.spawned = "--target-jobs" in child.cmdline
        for job in self._jobs.values():
            if _claims(job, child):
                self._give(child, [job.jobid], certain=True)
                return

    def _candidates(self) -> list[_Job]:
        # A job with only guessed processes stays a candidate: a ``script:`` job first runs a short version check
        # of its interpreter, then the interpreter itself, and both are its own.
        unclaimed = [j for j in self._jobs.values() if not j.claimed and not j.ended]
        non_shell = [j for j in unclaimed if j.shellcmd is None]
        return non_shell or unclaimed

    def _assign_fallback(self, child: _Child) -> None:
        candidates = self._candidates()
        if not candidates:
            child.ignored = True  # the controller's own (no job is waiting for a process)
            return
        if len(candidates) == 1:
            candidates[0].feed.note(f"process {child.pid} assigned to this job by elimination (the only running "
                                    "job without a process)")
        self._give(child, [j.jobid for j in candidates])

    def _give(self, child: _Child, jobids: list[Any], *, certain: bool = False) -> None:
        child.jobs = jobids
        share = len(jobids)
        for jobid in jobids:
            job = self._jobs[jobid]
            job.roots.add(child.pid)
            job.claimed = job.claimed or certain
            job.feed.add(child.pid, share=share)
            if share > 1:
                job.feed.note(f"process {child.pid} could not be told apart between {share} running jobs: its CPU "
                              "time is split equally among them")
        if child.final_s is not None:
            self._exited(child)

    def _orphan_cpu(self, seconds: float) -> None:
        """Reaped CPU time of processes never seen alive: the running jobs without a process get it."""
        candidates = self._candidates()
        if not candidates:
            return
        for job in candidates:
            job.feed.add_cpu(seconds, share=len(candidates))
            if len(candidates) > 1:
                job.feed.note("CPU time of processes that ended between two looks is split equally among the "
                              "running jobs without a process")
            else:
                job.feed.note("CPU time of processes that ended between two looks is attributed by elimination "
                              "(the only running job without a process)")


def _claims(job: _Job, child: _Child) -> bool:
    """Whether ``child`` is certainly ``job``'s: Snakemake registered it for the job, or its command line is the
    job's (a spawned job for its rule and wildcards, or its shell command)."""
    if child.popen_job is not None:
        return bool(child.popen_job == job.jobid)
    if "--target-jobs" in child.cmdline:
        return job.target in child.cmdline
    return job.shellcmd is not None and job.shellcmd in child.cmdline
