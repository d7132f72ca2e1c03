"""Per-task accumulators and the ``metatrail_energy`` run-facet payload built from them.

The payload follows ``core/openlineage/schemas/MetatrailEnergyRunFacet.json`` (without ``_producer`` and
``_schemaURL``, which the event builder adds). Rules: a domain that gave no usable interval is ``value_j:
null`` with a ``reason``; estimates appear only under ``estimated`` and only for domains that were not
measured; ``measured_j`` adds cpu + dram + gpu (psys overlaps them and is never added).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .attribution import CpuPolicy, other_policy
from .carbon import carbon_block
from .window import WindowEnd

FACET_KEY = "metatrail_energy"
SCHEMA_URL = (
    "https://raw.githubusercontent.com/metatrail/metatrail/v0.1.0/core/openlineage/schemas/"
    "MetatrailEnergyRunFacet.json#/$defs/MetatrailEnergyRunFacet"
)
TOTAL_DOMAINS = ("cpu", "dram", "gpu")
# The NVML energy counter updates every 20-100 ms (100 ms measured on an H200, driver 580): shorter windows are coarse.
GPU_COUNTER_RESOLUTION_S = 0.1
NOT_COVERED = ["power supply losses", "fans", "storage", "network", "other node components outside RAPL/NVML"]


@dataclass(slots=True)
class DomainAccount:
    """What one task accumulated for one measured domain (``cpu``, ``dram``, ``psys``, ``gpu:<uuid>``)."""

    method: str | None = None
    value_j: float = 0.0
    value_other_j: float = 0.0
    node_j: float = 0.0
    idle_j: float = 0.0
    intervals: int = 0
    covered_s: float = 0.0
    sampled_s: float = 0.0
    wraps_first: int | None = None
    wraps_last: int = 0
    reasons: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=list)
    sources: tuple[str, ...] = ()
    detail: dict[str, object] = field(default_factory=dict)
    last_sample_seq: int = -1
    """The monitor sample that last added to ``intervals`` (an interval split at a stop counts once)."""

    def count_interval(self, seq: int) -> None:
        """Count the sampled interval ``seq`` once, however many parts a stop split it into."""
        if seq != self.last_sample_seq:
            self.last_sample_seq = seq
            self.intervals += 1

    def note(self, reason: str) -> None:
        """Remember a distinct reason (kept short: the first few)."""
        if reason not in self.reasons and len(self.reasons) < 5:
            self.reasons.append(reason)

    def basis(self, basis: str) -> None:
        """Remember an attribution basis used in some interval."""
        if basis not in self.bases:
            self.bases.append(basis)


@dataclass(slots=True)
class TaskAccount:
    """Everything measured for one registered task so far."""

    execution_id: str
    start_wall: float
    start_mono: float
    first_sample: float | None = None
    last_sample: float | None = None
    max_concurrent: int = 1
    shared_process: bool = False
    cpu_s: float | None = None
    """CPU seconds of the task's tree over its sampled window (after any equal split), plus, for a task in the
    monitor's own process, its root's before the first sample; for a task no sample covered, its root's between
    start and stop; None if never read."""
    domains: dict[str, DomainAccount] = field(default_factory=dict)
    estimates: dict[str, DomainAccount] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        """Record a distinct error sentence."""
        if message not in self.errors and len(self.errors) < 20:
            self.errors.append(message)


def _share(value: float, node: float) -> float | None:
    return min(1.0, max(0.0, value / node)) if node > 0 else None


def _domain_reason(acc: DomainAccount, coverage: float) -> str | None:
    if acc.intervals == 0:
        return "; ".join(acc.reasons) or "no sampled interval covered this task"
    if coverage < 0.999 and acc.reasons:
        return f"partial: {coverage:.0%} of the task covered; " + "; ".join(acc.reasons)
    return None


def _cpu_domain(
    acc: DomainAccount, policy: CpuPolicy, sampled_s: float, counted: bool, shared: bool = False
) -> dict[str, Any]:
    coverage = min(1.0, acc.covered_s / sampled_s) if sampled_s > 0 else 0.0
    measured = acc.intervals > 0
    out: dict[str, Any] = {
        "value_j": acc.value_j if measured else None,
        "reason": _domain_reason(acc, coverage),
        "method": acc.method,
        "node_j": acc.node_j if measured else None,
        "attribution": {
            "policy": policy,
            "share_basis": "cpu-time",
            "share": _share(acc.value_j, acc.node_j) if measured else None,
            "value_other_policy_j": acc.value_other_j if measured else None,
            "other_policy": other_policy(policy),
            "shared_process": shared,
        },
        "coverage": coverage,
        "wraps": max(0, acc.wraps_last - (acc.wraps_first or 0)),
        "intervals": acc.intervals,
        "counted_in_total": counted,
        "sources": list(acc.sources),
    }
    return out


def _gpu_basis(bases: list[str]) -> str:
    used = [b for b in bases if b != "none"] or bases or ["none"]
    return used[0] if len(set(used)) == 1 else "mixed"


def _gpu_domain(devices: dict[str, DomainAccount], sampled_s: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for key, acc in sorted(devices.items()):
        coverage = min(1.0, acc.covered_s / sampled_s) if sampled_s > 0 else 0.0
        measured = acc.intervals > 0
        index = acc.detail.get("index")
        name = acc.detail.get("name")
        rows.append(
            {
                "uuid": key.split(":", 1)[1],
                "index": index if isinstance(index, int) else None,
                "name": name if isinstance(name, str) else None,
                "value_j": acc.value_j if measured else None,
                "node_j": acc.node_j if measured else None,
                "reason": _domain_reason(acc, coverage),
                "method": acc.method,
                "share_basis": _gpu_basis(acc.bases),
                "mig": bool(acc.detail.get("mig", False)),
            }
        )
    values = [r["value_j"] for r in rows if r["value_j"] is not None]
    nodes = [r["node_j"] for r in rows if r["node_j"] is not None]
    methods = {r["method"] for r in rows if r["method"]}
    bases = [r["share_basis"] for r in rows if r["value_j"] is not None]
    basis = _gpu_basis(bases) if bases else "none"
    reasons = [f"GPU {r['index']}: {r['reason']}" for r in rows if r["reason"]]
    if 0 < sampled_s < 5 * GPU_COUNTER_RESOLUTION_S and any(r["method"] == "nvml-energy-counter" for r in rows):
        reasons.append(
            f"below resolution: {sampled_s:.2f} s window, the GPU energy counter updates only every "
            f"~{GPU_COUNTER_RESOLUTION_S * 1000:.0f} ms"
        )
    if any(r["mig"] for r in rows):
        reasons.append("MIG enabled: the task's part of the whole GPU's energy is apportioned, not measured")
    total = sum(values) if values else None
    node_total = sum(nodes) if nodes else None
    covered = [devices[k].covered_s for k in devices]
    return {
        "value_j": total,
        "reason": "; ".join(reasons) or None,
        "method": (methods.pop() if len(methods) == 1 else "mixed") if methods else None,
        "node_j": node_total,
        "attribution": {
            "policy": basis if basis != "none" else "exclusive",
            "share_basis": basis,
            "share": _share(total, node_total) if total is not None and node_total else None,
            "value_other_policy_j": None,
            "other_policy": None,
        },
        "coverage": min(1.0, min(covered) / sampled_s) if covered and sampled_s > 0 else 0.0,
        "wraps": 0,
        "intervals": max((devices[k].intervals for k in devices), default=0),
        "counted_in_total": True,
        "sources": [r["uuid"] for r in rows],
        "devices": rows,
    }


def build_payload(
    task: TaskAccount,
    *,
    end_mono: float,
    policy: CpuPolicy,
    interval_s: float,
    meter: dict[str, Any],
    missing: dict[str, str],
    known: tuple[str, ...] = (),
    estimate_parameters: dict[str, object] | None = None,
    region: str | None = None,
    pue: float | None = None,
    end: WindowEnd | None = None,
) -> dict[str, Any]:
    """The facet body for a finished task. ``missing`` maps domains no meter could read to the reason; ``known``
    lists the reading keys the meters gave (so a task that saw no interval still lists them, null with a reason);
    ``end`` says how the window was closed at the stop (see :mod:`metatrail.energy.window`)."""
    wall = max(0.0, end_mono - task.start_mono)
    sampled = 0.0
    if task.first_sample is not None and task.last_sample is not None:
        sampled = max(0.0, task.last_sample - task.first_sample)
    domains: dict[str, Any] = {}
    for name in ("cpu", "dram", "psys"):
        if name in task.domains:
            domains[name] = _cpu_domain(
                task.domains[name], policy, sampled, counted=name != "psys", shared=task.shared_process
            )
        elif name in missing:
            domains[name] = {"value_j": None, "reason": missing[name], "method": None}
        elif name in known:
            domains[name] = {"value_j": None, "reason": None, "method": None}
    gpus = {k: v for k, v in task.domains.items() if k.startswith("gpu:")}
    if gpus:
        domains["gpu"] = _gpu_domain(gpus, sampled)
    elif "gpu" in missing:
        domains["gpu"] = {"value_j": None, "reason": missing["gpu"], "method": None}
    elif any(k.startswith("gpu:") for k in known):
        domains["gpu"] = {"value_j": None, "reason": None, "method": None}
    if sampled <= 0:
        why = (
            "the task ended before the monitor's first sample (meters still starting, or a task shorter than "
            "the first sample)"
        )
        for entry in domains.values():
            if entry.get("value_j") is None and not entry.get("reason"):
                entry["reason"] = why
        task.error(why)

    estimated: dict[str, Any] = {}
    cpu_measured = domains.get("cpu", {}).get("value_j") is not None
    est = task.estimates.get("cpu")
    if not cpu_measured and est is not None and est.intervals > 0:
        estimated["cpu"] = {
            "value_j": est.value_j,
            "method": "estimated",
            "model": "TDP per logical CPU x task CPU-seconds (linear, no idle power)",
            "parameters": dict(estimate_parameters or {}),
            "reason": domains.get("cpu", {}).get("reason"),
        }

    counted = [domains[d]["value_j"] for d in TOTAL_DOMAINS if d in domains and domains[d]["value_j"] is not None]
    measured_j = sum(counted) if counted else None
    estimated_vals = [e["value_j"] for e in estimated.values() if e["value_j"] is not None]
    estimated_j = sum(estimated_vals) if estimated_vals else None
    low = high = measured_j
    if measured_j is not None:
        other_total = 0.0
        for d in TOTAL_DOMAINS:
            entry = domains.get(d)
            if not entry or entry["value_j"] is None:
                continue
            alt = (entry.get("attribution") or {}).get("value_other_policy_j")
            other_total += alt if alt is not None else entry["value_j"]
        low, high = min(measured_j, other_total), max(measured_j, other_total)
    idle = [task.domains[d].idle_j for d in ("cpu", "dram") if d in task.domains and task.domains[d].intervals]
    carbon, carbon_errors = carbon_block(measured_j, estimated_j, region=region, pue=pue)
    for e in carbon_errors:
        task.error(e)
    return {
        "policy": policy,
        "interval_s": interval_s,
        "wall_s": wall,
        "coverage": min(1.0, sampled / wall) if wall > 0 else (1.0 if sampled > 0 else 0.0),
        "max_concurrent_tasks": max(1, task.max_concurrent),
        "domains": domains,
        "estimated": estimated,
        "measured_j": measured_j,
        "estimated_j": estimated_j,
        "idle_j": sum(idle) if idle else None,
        "task_cpu_s": task.cpu_s,
        "end_interpolated": bool(end and end.interpolated),
        "end_interpolation_s": end.span_s if end and end.interpolated else None,
        "end_task_cpu": end.task_cpu if end else None,
        "uncertainty": {"attribution_low_j": low, "attribution_high_j": high, "not_covered": NOT_COVERED},
        "carbon": carbon,
        "meter": meter,
        "errors": list(task.errors),
    }


def failure_payload(reason: str, *, interval_s: float, meter: dict[str, Any]) -> dict[str, Any]:
    """A valid facet body for a task whose energy could not be handled at all."""
    task = TaskAccount("", 0.0, 0.0)
    task.error(reason)
    missing = {d: reason for d in ("cpu", "dram", "gpu")}
    return build_payload(task, end_mono=0.0, policy="busy-share", interval_s=interval_s, meter=meter, missing=missing)


def accounted_payload(
    domain: str,
    entry: dict[str, Any],
    *,
    wall_s: float,
    interval_s: float,
    meter: dict[str, Any],
    errors: list[str],
    region: str | None = None,
    pue: float | None = None,
) -> dict[str, Any]:
    """A facet body for energy that came from elsewhere than this node's meters (a batch system's accounting):
    ``entry`` is the one domain's object (``value_j`` null with a ``reason`` when it could not be had); it counts
    in ``measured_j`` when it has a value. The node-monitor fields (coverage, task CPU time) do not apply."""
    value = entry.get("value_j")
    carbon, carbon_errors = carbon_block(value, None, region=region, pue=pue)
    return {
        "policy": "busy-share",
        "interval_s": interval_s,
        "wall_s": max(0.0, wall_s),
        "coverage": 1.0 if value is not None else 0.0,
        "max_concurrent_tasks": 1,
        "domains": {domain: entry},
        "estimated": {},
        "measured_j": value,
        "estimated_j": None,
        "idle_j": None,
        "task_cpu_s": None,
        "end_interpolated": False,
        "end_interpolation_s": None,
        "end_task_cpu": None,
        "uncertainty": {"attribution_low_j": value, "attribution_high_j": value, "not_covered": NOT_COVERED},
        "carbon": carbon,
        "meter": meter,
        "errors": list(errors) + carbon_errors,
    }
