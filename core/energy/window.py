"""Closing a task's window at its stop time, between two samples: pure functions used by the monitor.

A task stops at ``t_stop``, somewhere inside a sampled interval ``[t_prev, t_next]``. The monitor does not
sample at the stop (that would put system calls on the host task's thread); the first sample taken after the
stop closes the window instead:

* node counters (RAPL, NVML, the estimate) and node busy CPU time are interpolated linearly to ``t_stop``:
  ``x(t_stop) = x(t_prev) + (x(t_next) - x(t_prev)) * f`` with ``f = (t_stop - t_prev) / (t_next - t_prev)``
  (:func:`interpolate_reading`, :func:`linear`). The error is bounded by how much the node's power changed
  inside ``[t_prev, t_next]``; the payload reports the span as ``end_interpolation_s``.
* the task's own CPU time is **read at the stop** when that is cheap (the task's root is the monitor's own
  process: one CPU-time read, no lock, no file) and used when the tree has no live descendants around
  the stop (:func:`cpu_at_stop`). Otherwise (a task rooted in another process, or live children) it is
  interpolated like the counters; the payload says which (``end_task_cpu``).
* a counter that gave no usable delta over ``[t_prev, t_next]`` stays unusable on both sides of the stop
  (``joules=None`` with the reason), never 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .meter import Reading

TaskCpuSource = Literal["read-at-stop", "interpolated"]


@dataclass(slots=True)
class WindowEnd:
    """How a stopped task's window was closed (reported in the facet as ``end_*``); made once per task by the sampler
    and not changed afterwards (not frozen: a frozen dataclass takes three times as long to make, and a burst of short
    tasks makes one per task).

    ``at`` is the stop time (monitor clock); ``interpolated`` whether the last partial interval was closed by
    interpolating to it, over ``span_s`` seconds (last sample before the stop to first sample after it);
    ``task_cpu`` how the task's CPU time at the stop was obtained; ``known`` the reading keys the meters gave;
    ``reason`` a sentence for the payload's errors when the window could not be closed as described.
    ``unsampled_cpu_s`` is the CPU time of a task no sample covered, from the reads at its start and stop (root
    process and reaped children; ``None`` when not read, or when another task shared the process).
    """

    at: float
    interpolated: bool = False
    span_s: float | None = None
    task_cpu: TaskCpuSource | None = None
    known: tuple[str, ...] = ()
    reason: str | None = None
    unsampled_cpu_s: float | None = None


def reading_delta(old: Reading | None, new: Reading) -> tuple[float | None, str | None]:
    """Energy between two cumulative readings of one domain, or ``None`` with the reason it is unusable."""
    if new.joules is None:
        return None, new.reason
    if old is None or old.joules is None:
        return None, old.reason if old is not None and old.reason else "no earlier reading to take a delta from"
    if new.unusable > old.unusable:
        return None, "counter reset or wrap with unknown range: interval dropped"
    return max(0.0, new.joules - old.joules), None


def interpolate_reading(old: Reading | None, new: Reading, fraction: float) -> Reading:
    """The reading at ``fraction`` (0..1) of the way from ``old`` to ``new``; unusable stays unusable."""
    delta, reason = reading_delta(old, new)
    if delta is None or old is None or old.joules is None:
        return dataclasses.replace(new, joules=None, reason=reason or "unreadable")
    return dataclasses.replace(new, joules=old.joules + delta * min(1.0, max(0.0, fraction)))


def linear(before: float | None, after: float | None, fraction: float) -> float | None:
    """A cumulative quantity at ``fraction`` of an interval; ``None`` if either end is unknown."""
    if before is None or after is None:
        return None
    return before + (after - before) * min(1.0, max(0.0, fraction))


def cpu_at_stop(
    *,
    stop_root_s: float | None,
    before_s: float | None,
    before_root_s: float | None,
    after_s: float | None,
    after_root_s: float | None,
    fraction: float,
) -> tuple[float | None, TaskCpuSource]:
    """A task tree's cumulative CPU seconds at its stop.

    ``stop_root_s`` is the root process's own (plus reaped children's) CPU time read at the stop, or ``None``;
    ``before_*``/``after_*`` are the tree totals and their root parts at the samples around the stop. The
    reading at the stop is used as it is when the tree had no live descendants at either sample: then the
    root's time (children reaped in between included) is the whole tree's. With live descendants it is not:
    a child reaped between the samples moves its time from the descendants' part into the root's, and which
    side of the stop that happened on is unknown, so the whole tree is interpolated instead.
    """
    if stop_root_s is not None and None not in (before_s, before_root_s, after_s, after_root_s):
        assert before_s is not None and before_root_s is not None  # for mypy: checked just above
        assert after_s is not None and after_root_s is not None
        if before_s - before_root_s <= 1e-9 and after_s - after_root_s <= 1e-9:
            return max(before_s, stop_root_s), "read-at-stop"
    return linear(before_s, after_s, fraction), "interpolated"
