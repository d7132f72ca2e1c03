"""Pure functions that split one sampling interval's energy among concurrent tasks on a node.

CPU-side domains (cpu, dram, psys, and the CPU estimate), per interval with node energy ``E``, node busy CPU
time ``B``, task CPU times ``c_i`` and capacity ``T = wall x n_cpus``:

===============  =====================================  ======================================================
policy           task i                                 rest
===============  =====================================  ======================================================
``busy-share``   ``E x c_i / B``                        ``other = E x (B - sum c) / B`` (non-task processes)
``active-only``  ``E x c_i / T`` (= active x c_i / B,   ``other = E x (B - sum c) / T``,
                 active = E x B / T; Kepler-like)       ``idle = E x (T - B) / T``
===============  =====================================  ======================================================

Sampling skew can make ``sum c > B`` or ``B > T``; both are clamped (``B := max(B, sum c)``, ``T := max(T,
B)``) so that, always, ``sum tasks + other + idle = E`` and nothing is negative. With ``B = 0`` nothing ran:
all is idle. For a model without idle power (the estimate) pass ``total_s = busy_s``: both policies then
agree.

GPU, per device and interval (:func:`split_gpu`): ``exclusive`` when only one task's processes are on the
device; else ``sm-util`` share from per-process SM-utilisation samples; else ``memory`` share of used GPU
memory; else ``equal-split``; ``none`` when no task process is on the device (all of it is ``other``).
Processes on the device that belong to no task form the ``other`` group, so a foreign job keeps its part.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)

CpuPolicy = Literal["busy-share", "active-only"]
POLICIES: tuple[CpuPolicy, ...] = ("busy-share", "active-only")
GpuBasis = Literal["exclusive", "sm-util", "memory", "equal-split", "none"]


def other_policy(policy: CpuPolicy) -> CpuPolicy:
    """The policy whose value is reported next to ``policy``'s as the attribution uncertainty."""
    return "active-only" if policy == "busy-share" else "busy-share"


@dataclass(frozen=True, slots=True)
class Split(Generic[K]):
    """One interval's energy divided up: per task, to non-task processes (``other_j``), and idle
    (``idle_j``)."""

    tasks: dict[K, float]
    other_j: float
    idle_j: float
    basis: str

    @property
    def total_j(self) -> float:
        """Everything handed out; equals the interval's energy."""
        return sum(self.tasks.values()) + self.other_j + self.idle_j


def normalise(weights: Mapping[K, float]) -> dict[K, float]:
    """Shares proportional to the non-negative ``weights``; they sum to 1 (empty if all weights are 0)."""
    clean = {k: max(0.0, float(w)) for k, w in weights.items()}
    total = sum(clean.values())
    if total <= 0:
        return {}
    return {k: w / total for k, w in clean.items()}


def split_cpu(
    energy_j: float,
    task_cpu_s: Mapping[K, float],
    busy_s: float,
    total_s: float,
    policy: CpuPolicy,
) -> Split[K]:
    """Split a CPU-side interval by ``policy`` (see the module docstring for the formulas)."""
    energy = max(0.0, float(energy_j))
    cpu = {k: max(0.0, float(c)) for k, c in task_cpu_s.items()}
    tasks_s = sum(cpu.values())
    busy = max(float(busy_s), tasks_s, 0.0)
    if busy <= 0.0 or energy == 0.0:
        return Split({k: 0.0 for k in cpu}, 0.0, energy, "cpu-time")
    denominator = busy if policy == "busy-share" else max(float(total_s), busy)
    # The share first: c <= denominator, so it is at most 1 and a task never gets more than the interval's energy
    # (energy * c / denominator rounded 1.5 J x 5e-324 s up to 1e-323 before dividing, and gave 2 J).
    per_task = {k: energy * (c / denominator) for k, c in cpu.items()}
    if policy == "busy-share":  # the rest (rounding included) goes to non-task processes; nothing is idle
        return Split(per_task, max(0.0, energy - sum(per_task.values())), 0.0, "cpu-time")
    other = energy * ((busy - tasks_s) / denominator)
    idle = max(0.0, energy - sum(per_task.values()) - other)
    return Split(per_task, other, idle, "cpu-time")


def split_gpu(
    energy_j: float,
    owner: Callable[[int], K | None],
    memory: Mapping[int, int | None] | None,
    sm_util: Mapping[int, float] | None,
    active_tasks: Collection[K],
) -> Split[K]:
    """Split one GPU's interval energy among tasks (see the module docstring for the order of bases).

    ``owner(pid)`` maps a process on the device to its task (``None`` for foreign processes); ``memory`` is
    the running-process table (pid -> used bytes, ``None`` = unreadable table); ``sm_util`` the summed SM
    samples per pid since the previous interval (``None`` = unreadable); ``active_tasks`` the tasks registered
    now, used only for the equal split when the process table is unreadable.
    """
    energy = max(0.0, float(energy_j))
    if memory is None:
        tasks = list(active_tasks)
        if not tasks:
            return Split({}, energy, 0.0, "none")
        return Split({k: energy / len(tasks) for k in tasks}, 0.0, 0.0, "equal-split")

    groups: dict[K | None, list[int]] = {}
    for pid in memory:
        groups.setdefault(owner(pid), []).append(pid)
    task_groups = [g for g in groups if g is not None]
    if not task_groups:
        return Split({}, energy, 0.0, "none")
    if len(groups) == 1:
        only: K = task_groups[0]
        return Split({only: energy}, 0.0, 0.0, "exclusive")

    shares: dict[K | None, float] = {}
    basis: GpuBasis = "equal-split"
    if sm_util:
        shares = normalise({g: sum(sm_util.get(p, 0.0) for p in pids) for g, pids in groups.items()})
        basis = "sm-util"
    if not shares and all(memory[p] is not None for p in memory):
        shares = normalise({g: float(sum(memory[p] or 0 for p in pids)) for g, pids in groups.items()})
        basis = "memory"
    if not shares:
        shares = {g: 1.0 / len(groups) for g in groups}
        basis = "equal-split"
    per_task = {g: energy * s for g, s in shares.items() if g is not None}
    other = energy * shares.get(None, 0.0)
    return Split(per_task, other, max(0.0, energy - sum(per_task.values()) - other), basis)
