"""Which of the Snakemake controller's child processes belong to which running job (local execution).

Snakemake's local executor runs each job from a pool thread of the controller: ``shell:`` and ``script:`` rules
as a ``bash -c`` child started by ``snakemake.shell.shell`` (which keeps ``jobid -> Popen`` in
``shell._processes`` while it runs), ``run:`` rules as a spawned ``python -m snakemake --target-jobs
'<rule>:<wildcards>'`` child. No log record names a pid. :class:`JobProcesses` looks at the controller's direct
children every ``poll_s`` (0.1 s; only while local jobs run) and assigns each new one to a job:

1. **exact**: the pid is the ``Popen`` Snakemake registered for that job id;
2. **command line**: the child runs the job's shell command, or is the spawned job for its rule and wildcards;
3. **by elimination**: after three more looks (the job's record may reach the plugin late), a child still
   unassigned goes to the one running job that has no process yet (non-shell jobs first: a ``script:`` rule's
   interpreter names only a temporary file); a spawned job's child waits for its own job;
4. **equal split**: with several such jobs, each gets an equal share of it, and the facet says so
   (``shared_process`` and a sentence in ``errors``). A child when no job lacks a process is the controller's own.

The job's whole tree is counted (grandchildren through the child). When a child exits, the controller's
reaped-children CPU time (``os.times()``) grows by exactly that tree's CPU time (the child and every descendant
it waited for): the increase is handed to the job as the child's final figure, so the tail after the energy
monitor's last sample is not lost. An increase with no known child gone belongs to processes born and reaped
between two looks: it goes to the running jobs that have no process yet, as in steps 3-4. At a job's end
(``JOB_FINISHED``/``JOB_ERROR``) one more look settles its processes before its energy window closes.

Limits: a child that is not a job's (a version check Snakemake runs; metatrail's own threads are left out) is
assigned like one if a job lacks a process at that moment; processes a job leaves running in the background are
followed only while the child lives. Thread-safe; nothing here raises into Snakemake.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metatrail.energy.processes import TaskProcesses
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
    ended: bool = False


@dataclass
class _Child:
    pid: int
    first_seen: int  # poll number
    jobs: list[Any] = field(default_factory=list)  # job ids it was assigned to (several: equal split)
    cpu_s: float = 0.0  # own + reaped children's CPU seconds at the last look
    spawned: bool = False  # a spawned job (--target-jobs): only its own job may have it


def _own_threads() -> set[str]:
    """Native ids of this process's metatrail threads: what they start (the Recorder's ``git``) is no job's."""
    return {str(t.native_id) for t in threading.enumerate() if t.name.startswith("metatrail") and t.native_id}


def _direct_children(pid: int) -> list[int]:
    """Children of ``pid`` from /proc (every thread's ``children`` file, metatrail's own threads left out), psutil
    where that file is missing."""
    out: list[int] = []
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        tids = []
    skip = _own_threads() if pid == os.getpid() else set()
    for tid in tids:
        if tid in skip:
            continue
        try:
            with open(f"{base}/{tid}/children", "rb") as fh:
                out.extend(int(x) for x in fh.read().split())
        except FileNotFoundError:
            if os.path.exists(f"{base}/{tid}"):
                return _children_psutil(pid)
        except OSError:
            continue
    return out


def _children_psutil(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _tree_cpu(pid: int) -> float | None:
    """Own plus reaped children's CPU seconds of ``pid`` (what the parent's counter gains when it is reaped)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system + t.children_user + t.children_system)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


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
    """Assigns the controller's children to running jobs and feeds each job's :class:`TaskProcesses`."""

    def __init__(self, *, poll_s: float = POLL_S, controller_pid: int | None = None) -> None:
        self.poll_s = poll_s
        self.pid = controller_pid if controller_pid is not None else os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._jobs: dict[Any, _Job] = {}
        self._children: dict[int, _Child] = {}
        self._ignored: set[int] = set()
        self._reaped = _reaped_cpu()
        self._polls = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- called by the tracker (Snakemake's log listener thread) ----------------------------------------------
    def job_started(self, jobid: Any, rule: str, wildcards: Mapping[str, Any] | None,
                    shellcmd: str | None) -> TaskProcesses:
        """Start following a job; returns the process set to pass to the Recorder as its energy source."""
        feed = TaskProcesses()
        with self._lock:
            self._jobs[jobid] = _Job(jobid, rule, target_spec(rule, wildcards), (shellcmd or "").strip() or None,
                                     feed)
        self._ensure_thread()
        self._wake.set()
        return feed

    def job_ended(self, jobid: Any) -> None:
        """Settle the job's processes (one more look) and close its set, before its energy window closes."""
        with self._lock:
            job = self._jobs.get(jobid)
            if job is None:
                return
            try:
                self._poll()
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
                idle = not self._jobs
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

    def _poll(self) -> None:
        """One look (under the lock): assign new children, hand final figures of exited ones to their jobs."""
        self._polls += 1
        children = set(_direct_children(self.pid))
        reaped = _reaped_cpu()
        gained, self._reaped = max(0.0, reaped - self._reaped), reaped
        popens = _registered_popens()
        gone = [c for pid, c in self._children.items() if pid not in children]
        for c in gone:
            del self._children[c.pid]
        ignored_gone = bool(self._ignored - children)
        self._ignored &= children
        for pid in sorted(children):
            if pid in self._children or pid in self._ignored:
                continue
            child = self._children[pid] = _Child(pid, self._polls)
            self._assign_exact(child, popens)
        for child in list(self._children.values()):
            if not child.jobs and child.first_seen < self._polls:
                self._assign_exact(child, popens)  # Snakemake registers its Popen just after starting it
            if not child.jobs and not child.spawned and (child.first_seen + FALLBACK_AFTER <= self._polls
                                                         or not self._jobs):
                self._assign_fallback(child)
            if child.jobs:
                cpu = _tree_cpu(child.pid)
                if cpu is not None:
                    child.cpu_s = max(child.cpu_s, cpu)
        for child in gone:
            if not child.jobs:  # ended before it could be told apart: assigned as in step 3-4 now
                self._assign_fallback(child)
        self._ignored &= children
        assigned_gone = [c for c in gone if c.jobs]
        if assigned_gone:
            known = sum(c.cpu_s for c in assigned_gone)
            surplus = max(0.0, gained - known) / len(assigned_gone)
            for c in assigned_gone:
                final = c.cpu_s + surplus
                for jobid in c.jobs:
                    job = self._jobs.get(jobid)
                    if job is not None:
                        job.feed.exited(c.pid, final)
        elif gained > 0 and not gone and not ignored_gone:
            self._orphan_cpu(gained)

    def _assign_exact(self, child: _Child, popens: Mapping[int, Any]) -> None:
        jobid = popens.get(child.pid)
        if jobid is not None and jobid in self._jobs:
            self._give(child, [jobid])
            return
        cmdline = _cmdline(child.pid)
        if not cmdline:
            return
        child.spawned = "--target-jobs" in cmdline
        for job in self._jobs.values():
            if "--target-jobs" in cmdline and f"{job.target}" in cmdline:
                self._give(child, [job.jobid])
                return
        for job in self._jobs.values():
            if job.shellcmd and job.shellcmd in cmdline:
                self._give(child, [job.jobid])
                return

    def _candidates(self) -> list[_Job]:
        rootless = [j for j in self._jobs.values() if not j.roots and not j.ended]
        non_shell = [j for j in rootless if j.shellcmd is None]
        return non_shell or rootless

    def _assign_fallback(self, child: _Child) -> None:
        candidates = self._candidates()
        if not candidates:
            self._ignored.add(child.pid)  # the controller's own (no job is waiting for a process)
            self._children.pop(child.pid, None)
            return
        if len(candidates) == 1:
            candidates[0].feed.note(f"process {child.pid} assigned to this job by elimination (the only running "
                                    "job without a process)")
        self._give(child, [j.jobid for j in candidates])

    def _give(self, child: _Child, jobids: list[Any]) -> None:
        child.jobs = jobids
        share = len(jobids)
        for jobid in jobids:
            job = self._jobs[jobid]
            job.roots.add(child.pid)
            job.feed.add(child.pid, share=share)
            if share > 1:
                job.feed.note(f"process {child.pid} could not be told apart between {share} running jobs: its CPU "
                              "time is split equally among them")

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
