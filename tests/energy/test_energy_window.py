"""Closing a task's window at its stop time (core/energy/window.py, core/energy/ledger.py): pure functions and
one interval split by hand, with no threads and no clocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metatrail.energy.facet import TaskAccount
from metatrail.energy.ledger import IntervalSplit, Sample, TaskToken, TrackedTask
from metatrail.energy.meter import Reading
from metatrail.energy.window import cpu_at_stop, interpolate_reading, linear, reading_delta

joules = st.floats(min_value=0.0, max_value=1e9, allow_nan=False)
fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def rapl(j: float | None, *, unusable: int = 0, reason: str | None = None) -> Reading:
    return Reading("cpu", j, "rapl-counter", reason=reason, unusable=unusable, sources=("package-0",))


@given(joules, joules, fractions)
def test_interpolation_splits_an_interval_without_losing_or_making_energy(a: float, d: float, f: float) -> None:
    old, new = rapl(a), rapl(a + d)
    mid = interpolate_reading(old, new, f)
    first, _ = reading_delta(old, mid)
    second, _ = reading_delta(mid, new)
    whole, _ = reading_delta(old, new)
    assert first is not None and second is not None and whole is not None
    assert first >= 0 and second >= 0
    assert first + second == pytest.approx(whole, rel=1e-9, abs=1e-6)
    assert first == pytest.approx(whole * f, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (rapl(None, reason="Permission denied"), rapl(5.0)),
        (rapl(1.0), rapl(None, reason="Permission denied")),
        (rapl(1.0), rapl(2.0, unusable=1)),
        (None, rapl(2.0)),
    ],
)
def test_an_unusable_interval_stays_unusable_on_both_sides_of_the_stop(old: Reading | None, new: Reading) -> None:
    mid = interpolate_reading(old, new, 0.5)
    assert mid.joules is None and mid.reason
    for delta, reason in (reading_delta(old, mid), reading_delta(mid, new)):
        assert delta is None and reason  # null with a reason, never 0


def test_linear_and_cpu_at_stop() -> None:
    assert linear(1.0, 3.0, 0.25) == 1.5 and linear(None, 3.0, 0.5) is None and linear(1.0, 3.0, 2.0) == 3.0
    # No live descendants around the stop: the reading at the stop is the tree's CPU time.
    at, how = cpu_at_stop(
        stop_root_s=10.4, before_s=10.0, before_root_s=10.0, after_s=11.0, after_root_s=11.0, fraction=0.9
    )
    assert (at, how) == (10.4, "read-at-stop")
    # Live descendants: a child reaped in between could sit on either side of the stop, so interpolate.
    at, how = cpu_at_stop(
        stop_root_s=10.4, before_s=12.0, before_root_s=10.0, after_s=13.0, after_root_s=11.0, fraction=0.5
    )
    assert (at, how) == (12.5, "interpolated")
    # Not read at the stop (another process): interpolated.
    at, how = cpu_at_stop(
        stop_root_s=None, before_s=1.0, before_root_s=1.0, after_s=2.0, after_root_s=2.0, fraction=0.5
    )
    assert (at, how) == (1.5, "interpolated")


@dataclass
class FakeTree:
    """Stands in for ProcessTree: the split only needs the pid and the root part of the last reading."""

    pid: int
    last_root_seconds: float | None
    children: set[int] = field(default_factory=set)

    def owns(self, pid: int) -> bool:
        return pid == self.pid


def tracked(tid: int, pid: int, cpu_before: float) -> TrackedTask:
    task = TrackedTask(TaskToken(tid, f"e{tid}"), pid, True, 0.0, 0.0, 1)
    task.tree = FakeTree(pid, cpu_before)
    task.account = TaskAccount(f"e{tid}", 0.0, 0.0, first_sample=0.0, last_sample=0.0)
    task.last_cpu = task.last_root = cpu_before
    task.baselined = True
    return task


def test_a_stop_inside_an_interval_splits_it_at_the_stop() -> None:
    """[0, 1] s: 100 J, node busy 2 CPU-s; task a (pid 1) stops at 0.25 s after 0.25 CPU-s read at the stop,
    task b (pid 2) runs throughout at 1 CPU. Busy-share: [0, 0.25] has 25 J over 0.5 busy-s, a and b 0.25 CPU-s
    each; [0.25, 1] has 75 J over 1.5 busy-s, b alone 0.75 CPU-s."""
    a, b = tracked(1, 1, 0.0), tracked(2, 2, 0.0)
    a.stop, a.stop_root_cpu = 0.25, 0.25
    prev = Sample(0.0, {"cpu": rapl(0.0)}, 0.0)
    cur = Sample(1.0, {"cpu": rapl(100.0)}, 2.0)
    a.proc.last_root_seconds = 1.0  # a's process went on burning after its stop
    b.proc.last_root_seconds = 1.0
    split = IntervalSplit("busy-share", 2, seq=7, gpu={}, known=("cpu",))
    ends = split.span(prev, cur, [a, b], [a], {1: 1.0, 2: 1.0})

    end = ends[1]
    assert end.interpolated and end.span_s == 1.0 and end.task_cpu == "read-at-stop" and end.at == 0.25
    ca, cb = a.acct.domains["cpu"], b.acct.domains["cpu"]
    assert ca.value_j == pytest.approx(12.5) and cb.value_j == pytest.approx(12.5 + 37.5)
    assert a.acct.cpu_s == pytest.approx(0.25) and b.acct.cpu_s == pytest.approx(1.0)
    assert a.acct.last_sample == 0.25 and ca.sampled_s == pytest.approx(0.25)
    assert ca.intervals == 1 and cb.intervals == 1  # one sampled interval, however many parts
    assert ca.node_j == pytest.approx(25.0) and cb.node_j == pytest.approx(100.0)
    # Nothing made or lost: the rest went to non-task processes (a's process after its stop among them).
    assert ca.value_j + cb.value_j <= 100.0


def test_stops_at_the_same_time_are_closed_together() -> None:
    a, b, c = tracked(1, 1, 0.0), tracked(2, 2, 0.0), tracked(3, 3, 0.0)
    for t in (a, b):
        t.stop, t.stop_root_cpu = 0.5, 0.5
    prev = Sample(0.0, {"cpu": rapl(0.0)}, 0.0)
    cur = Sample(1.0, {"cpu": rapl(30.0)}, 3.0)
    for t in (a, b, c):
        t.proc.last_root_seconds = 1.0
    split = IntervalSplit("busy-share", 3, seq=1, gpu={}, known=("cpu",))
    ends = split.span(prev, cur, [a, b, c], [a, b], {1: 1.0, 2: 1.0, 3: 1.0})
    assert set(ends) == {1, 2}
    values: dict[str, Any] = {t.token.execution_id: t.acct.domains["cpu"] for t in (a, b, c)}
    assert all(v.intervals == 1 for v in values.values())
    assert values["e1"].value_j == pytest.approx(values["e2"].value_j) == pytest.approx(5.0)
    assert values["e3"].value_j == pytest.approx(5.0 + 5.0)
