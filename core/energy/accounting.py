"""Energy of tasks that ran outside this node, from the batch system's accounting (Slurm ``sacct``).

A workflow controller (Snakemake with a cluster executor) records jobs that run on other nodes; the node monitor
here cannot see them. Such a host passes a :class:`ClusterJobEnergy` as ``source`` to ``task_started``; its
:meth:`AccountedEnergy.report` replaces the node monitor's figures and runs on the Recorder's writer thread, never
on the host's.

:class:`ClusterJobEnergy` asks Slurm when the job has a Slurm job id and ``sacct`` is on ``PATH``::

    sacct -j ID --noheader --parsable2 --format=JobID,ConsumedEnergyRaw,Elapsed,State,NodeList

(hard timeout ``METATRAIL_SACCT_TIMEOUT``, default 5 s; after two timeouts in one process it stops asking).
``ConsumedEnergyRaw`` is joules measured by Slurm's ``AcctGatherEnergyType`` plugin (RAPL, IPMI, ...) on the
job's nodes: the allocation's line is used, else the ``batch`` step's, else the sum of the numbered steps. The
value is the nodes' energy while the job ran, not split among jobs sharing a node (the facet says so). It is
reported under the domain ``node`` with method ``slurm-sacct``. An empty or zero value (energy accounting not
configured), a job still running, an unknown job or a failed call give ``value_j: null`` with the reason; a
job without a Slurm id, or without ``sacct``, is null with "not measured here".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from abc import ABC, abstractmethod
from typing import Any

from .facet import accounted_payload

SACCT_FORMAT = "JobID,ConsumedEnergyRaw,Elapsed,State,NodeList"
DEFAULT_SACCT_TIMEOUT_S = 5.0
MAX_SACCT_TIMEOUTS = 2
_SLURM_ID = re.compile(r"^\d+(?:_\d+)?$")
_FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE")
_timeouts = 0
_timeouts_lock = threading.Lock()


class AccountedEnergy(ABC):
    """Energy a task's host gets from elsewhere than this node's meters (see the module docstring)."""

    @abstractmethod
    def report(
        self, *, wall_s: float, interval_s: float, meter: dict[str, Any], region: str | None, pue: float | None
    ) -> dict[str, Any]:
        """The ``metatrail_energy`` facet body for the finished task; may block (bounded); never raises."""


def slurm_job_id(external_id: str | None) -> str | None:
    """The Slurm job id in an executor's external job id (``1234``, ``1234;cluster``, ``1234_7``), or None."""
    if not external_id:
        return None
    head = external_id.strip().split(";", 1)[0].strip()
    return head if _SLURM_ID.match(head) else None


def _elapsed_s(text: str) -> float | None:
    """Slurm's ``[D-]HH:MM:SS`` (or ``MM:SS``, with optional fraction) in seconds."""
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        try:
            days = int(head)
        except ValueError:
            return None
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    return days * 86400 + seconds


def parse_sacct(jobid: str, text: str) -> tuple[float | None, str | None, dict[str, Any]]:
    """``(joules, reason, detail)`` from ``sacct --parsable2`` lines in :data:`SACCT_FORMAT` for ``jobid``."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) >= 4 and fields[0]:
            rows[fields[0]] = fields
    main = rows.get(jobid)
    if main is None:
        return None, f"sacct knows no job {jobid} (accounting purged, or another cluster)", {}
    state = main[3].split()[0] if main[3] else ""
    elapsed = _elapsed_s(main[2])
    detail: dict[str, Any] = {"state": state or None, "elapsed_s": elapsed,
                              "nodes": main[4] if len(main) > 4 and main[4] else None}
    if state and state not in _FINAL_STATES:
        return None, f"Slurm job {jobid} is {state}: its energy is not final yet", detail

    def joules(fields: list[str]) -> float | None:
        try:
            value = float(fields[1])
        except (ValueError, IndexError):
            return None
        return value if value > 0 else None

    value = joules(main)
    source = jobid
    if value is None and f"{jobid}.batch" in rows:
        value, source = joules(rows[f"{jobid}.batch"]), f"{jobid}.batch"
    if value is None:
        steps = [joules(f) for key, f in rows.items() if re.fullmatch(rf"{re.escape(jobid)}\.\d+", key)]
        known = [s for s in steps if s is not None]
        if known:
            value, source = sum(known), f"{jobid}.<steps>"
    detail["source_line"] = source if value is not None else None
    if value is None:
        raw = main[1] if len(main) > 1 else ""
        shown = "empty" if raw == "" else repr(raw)
        return None, (
            f"sacct reports ConsumedEnergyRaw {shown} for job {jobid}: Slurm energy accounting is not configured "
            "(set AcctGatherEnergyType, e.g. acct_gather_energy/rapl, in slurm.conf)"
        ), detail
    return value, None, detail


def sacct_energy(jobid: str, *, timeout_s: float | None = None) -> tuple[float | None, str | None, dict[str, Any]]:
    """Ask ``sacct`` for a job's consumed energy: ``(joules, reason, detail)``; never raises, never hangs."""
    global _timeouts
    exe = shutil.which("sacct")
    if exe is None:
        return None, "not measured here: sacct is not on PATH (no Slurm accounting on this host)", {}
    if _timeouts >= MAX_SACCT_TIMEOUTS:
        return None, "not asked: sacct timed out twice in this process", {}
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get("METATRAIL_SACCT_TIMEOUT") or DEFAULT_SACCT_TIMEOUT_S)
        except ValueError:
            timeout_s = DEFAULT_SACCT_TIMEOUT_S
    try:
        done = subprocess.run(
            [exe, "-j", jobid, "--noheader", "--parsable2", f"--format={SACCT_FORMAT}"],
            capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired:
        with _timeouts_lock:
            _timeouts += 1
        return None, f"sacct did not answer within {timeout_s:.1f} s (METATRAIL_SACCT_TIMEOUT)", {}
    except OSError as exc:
        return None, f"sacct could not be run: {exc}", {}
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        return None, f"sacct failed (exit {done.returncode}): {message[0] if message else 'no message'}", {}
    return parse_sacct(jobid, done.stdout)


class ClusterJobEnergy(AccountedEnergy):
    """A job run by a batch system outside this node. ``external_id`` is set by the host once the executor
    names it (it may come after the start); ``executor`` names the executor for the reason."""

    def __init__(self, executor: str | None = None, external_id: str | None = None) -> None:
        self.executor = executor
        self.external_id = external_id

    def report(
        self, *, wall_s: float, interval_s: float, meter: dict[str, Any], region: str | None, pue: float | None
    ) -> dict[str, Any]:
        """Slurm's figure where there is one, else null with the reason (see the module docstring)."""
        errors: list[str] = []
        where = f" by the {self.executor} executor" if self.executor else ""
        jobid = slurm_job_id(self.external_id)
        detail: dict[str, Any] = {}
        value: float | None
        reason: str | None
        if self.external_id is None:
            value, reason = None, (f"not measured here: the job ran outside this node{where} and no external job "
                                   "id was logged")
        elif jobid is None:
            value, reason = None, (f"not measured here: the job ran outside this node{where} (job "
                                   f"{self.external_id!r} is not a Slurm job id, so there is no accounting to ask)")
        else:
            value, reason, detail = sacct_energy(jobid)
        entry: dict[str, Any] = {
            "value_j": value,
            "reason": reason,
            "method": "slurm-sacct" if jobid is not None else None,
            "node_j": value,
            "attribution": None,
            "coverage": 1.0 if value is not None else 0.0,
            "wraps": 0,
            "intervals": 1 if value is not None else 0,
            "counted_in_total": True,
            "sources": [f"slurm:{detail.get('source_line') or jobid}"] if jobid is not None else [],
        }
        if value is not None:
            entry["reason"] = ("energy of the job's node(s) while it ran, as Slurm's AcctGatherEnergy plugin "
                               "measured it: not split among jobs sharing a node")
        if detail.get("elapsed_s") is not None:
            wall_s = float(detail["elapsed_s"])
        if reason and value is None:
            errors.append(reason)
        return accounted_payload("node", entry, wall_s=wall_s, interval_s=interval_s, meter=meter, errors=errors,
                                 region=region, pue=pue)
