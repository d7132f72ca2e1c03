"""Property tests of the per-interval split functions and of counter wraparound."""

from __future__ import annotations

import pathlib
import tempfile

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from powercap_fake import PowercapTree

from metatrail.energy.attribution import POLICIES, normalise, other_policy, split_cpu, split_gpu
from metatrail.energy.meter import counter_delta
from metatrail.energy.rapl import RaplMeter

energy = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
seconds = st.floats(min_value=0, max_value=1e4, allow_nan=False, allow_infinity=False)
task_cpu = st.dictionaries(st.integers(0, 20), seconds, max_size=8)
policy = st.sampled_from(POLICIES)


@given(energy, task_cpu, seconds, seconds, policy)
@example(1.5, {0: 5e-324}, 0.0, 0.0, "busy-share")  # energy x CPU rounded up in the subnormal range: 2 J of 1.5
@example(1.5, {0: 5e-324}, 0.0, 0.0, "active-only")
def test_cpu_split_conserves_energy_and_is_never_negative(
    e: float, cpu: dict[int, float], busy: float, total: float, pol: str
) -> None:
    split = split_cpu(e, cpu, busy, total, pol)  # type: ignore[arg-type]
    assert set(split.tasks) == set(cpu)
    assert all(v >= 0 for v in split.tasks.values()) and split.other_j >= 0 and split.idle_j >= 0
    assert split.total_j == pytest.approx(e, rel=1e-9, abs=1e-9)


@given(energy, task_cpu, seconds, seconds)
def test_active_only_never_gives_a_task_more_than_busy_share(
    e: float, cpu: dict[int, float], busy: float, total: float
) -> None:
    busy_share = split_cpu(e, cpu, busy, total, "busy-share")
    active = split_cpu(e, cpu, busy, total, "active-only")
    for k in cpu:
        assert active.tasks[k] <= busy_share.tasks[k] + 1e-9
    assert busy_share.idle_j == 0 or sum(cpu.values()) == 0 or busy == 0


@given(energy, st.dictionaries(st.integers(0, 5), st.floats(0.001, 100), min_size=1, max_size=6), st.floats(0, 100))
def test_busy_share_proportional_to_cpu_time(e: float, cpu: dict[int, float], extra_busy: float) -> None:
    busy = sum(cpu.values()) + extra_busy
    split = split_cpu(e, cpu, busy, busy * 4, "busy-share")
    for k, c in cpu.items():
        assert split.tasks[k] == pytest.approx(e * c / busy, rel=1e-9, abs=1e-12)


def test_active_only_reports_idle_separately() -> None:
    # 2 s on 2 CPUs (T = 4 CPU-s), one task busy 1 CPU-s, node busy 1 CPU-s, 40 J measured.
    split = split_cpu(40.0, {"a": 1.0}, 1.0, 4.0, "active-only")
    assert split.tasks["a"] == pytest.approx(10.0) and split.idle_j == pytest.approx(30.0)
    assert split_cpu(40.0, {"a": 1.0}, 1.0, 4.0, "busy-share").tasks["a"] == pytest.approx(40.0)
    assert other_policy("busy-share") == "active-only" and other_policy("active-only") == "busy-share"


def test_nothing_busy_is_all_idle() -> None:
    split = split_cpu(12.0, {"a": 0.0}, 0.0, 2.0, "busy-share")
    assert split.tasks == {"a": 0.0} and split.idle_j == 12.0


@given(st.dictionaries(st.integers(), st.floats(0, 1e9, allow_nan=False), min_size=1))
def test_shares_sum_to_one(weights: dict[int, float]) -> None:
    shares = normalise(weights)
    if sum(weights.values()) > 0:
        assert sum(shares.values()) == pytest.approx(1.0)
        assert all(0 <= s <= 1 for s in shares.values())
    else:
        assert shares == {}


pids = st.integers(1, 50)
gpu_tables = st.dictionaries(pids, st.one_of(st.none(), st.integers(0, 1 << 34)), max_size=8)


@given(
    energy,
    st.one_of(st.none(), gpu_tables),
    st.one_of(st.none(), st.dictionaries(pids, st.floats(0, 100), max_size=8)),
    st.dictionaries(pids, st.sampled_from(["a", "b", "c"]), max_size=10),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True),
)
def test_gpu_split_conserves_energy(
    e: float,
    memory: dict[int, int | None] | None,
    sm: dict[int, float] | None,
    owners: dict[int, str],
    active: list[str],
) -> None:
    split = split_gpu(e, owners.get, memory, sm, active)
    assert all(v >= 0 for v in split.tasks.values()) and split.other_j >= 0 and split.idle_j >= 0
    assert split.total_j == pytest.approx(e, rel=1e-9, abs=1e-9)
    if split.tasks:
        shares = normalise(split.tasks)
        assert not shares or sum(shares.values()) == pytest.approx(1.0)


def test_gpu_bases_in_order() -> None:
    owner = {1: "a", 2: "b", 3: None}.get
    exclusive = split_gpu(100.0, owner, {1: 10}, {1: 50.0}, ["a", "b"])
    assert exclusive.basis == "exclusive" and exclusive.tasks == {"a": 100.0}
    sm = split_gpu(100.0, owner, {1: 10, 2: 10}, {1: 75.0, 2: 25.0}, ["a", "b"])
    assert sm.basis == "sm-util" and sm.tasks == pytest.approx({"a": 75.0, "b": 25.0})
    mem = split_gpu(100.0, owner, {1: 30, 2: 10}, {}, ["a", "b"])
    assert mem.basis == "memory" and mem.tasks == pytest.approx({"a": 75.0, "b": 25.0})
    equal = split_gpu(100.0, owner, {1: None, 2: 10}, None, ["a", "b"])
    assert equal.basis == "equal-split" and equal.tasks == pytest.approx({"a": 50.0, "b": 50.0})
    foreign = split_gpu(100.0, owner, {1: 10, 3: 30}, None, ["a"])
    assert foreign.basis == "memory" and foreign.tasks == pytest.approx({"a": 25.0})
    assert foreign.other_j == pytest.approx(75.0)
    unreadable = split_gpu(90.0, owner, None, None, ["a", "b", "c"])
    assert unreadable.basis == "equal-split" and unreadable.tasks == pytest.approx({"a": 30, "b": 30, "c": 30})
    nobody = split_gpu(90.0, owner, {3: 10}, None, ["a"])
    assert nobody.basis == "none" and nobody.tasks == {} and nobody.other_j == 90.0


@given(st.integers(1, 1 << 40), st.data())
def test_counter_delta_across_one_wrap(max_range: int, data: st.DataObject) -> None:
    old = data.draw(st.integers(0, max_range - 1))
    step = data.draw(st.integers(0, max_range - 1))
    new = (old + step) % max_range
    delta, wrapped = counter_delta(old, new, max_range)
    assert delta == step and delta >= 0
    assert wrapped == (old + step >= max_range)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 999_999), min_size=1, max_size=20), st.integers(0, 999_999))
def test_meter_cumulative_equals_sum_of_steps_with_wraps(steps: list[int], start: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = PowercapTree(pathlib.Path(tmp))
        tree.add_zone("intel-rapl:0", "package-0", start, max_uj=1_000_000)
        meter = RaplMeter(tree.root)
        meter.open()
        base = meter.read()["cpu"].joules
        for step in steps:
            tree.advance("intel-rapl:0", step / 1e6)
            reading = meter.read()["cpu"]
        assert base is not None and reading.joules is not None
        assert reading.joules - base == pytest.approx(sum(steps) / 1e6)
        assert reading.wraps == (start + sum(steps)) // 1_000_000
