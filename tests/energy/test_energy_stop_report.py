"""The two-step contract (core/energy/interface.py): ``task_stopped`` on the task's thread, ``task_report`` later.

The property that matters: a report's figures are those of the window ``[start, stop]``, however late the report
comes. Tolerances below are in CPU-seconds and come from the method, not from timing: the CPU time before the
task's first sample is not counted (the tests idle, not burn, until the baseline can have been taken), process
CPU time is counted in clock ticks (10 ms), and a window closed by interpolation is off by at most the change of
the task's CPU rate inside one sampled interval (the burners here run at a steady rate). A report that grew would
be off by the whole burn after the stop (at least 1 CPU-second), far outside them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from powercap_fake import PowercapTree, PowerSource

from metatrail.config import load_settings
from metatrail.energy import DisabledMonitor
from metatrail.energy.estimate import CpuEstimateMeter
from metatrail.energy.interface import TaskEnergyMonitor
from metatrail.energy.meter import EnergyMeter, Reading
from metatrail.energy.monitor import EnergyMonitor
from metatrail.energy.rapl import RaplMeter
from metatrail.recorder import Recorder, _NoEnergy
from metatrail.store import open_store

Validate = Callable[[dict[str, Any]], None]
TDP = 10.0  # W per CPU for the estimate: its joules / TDP are the CPU-seconds the monitor attributed
TOLERANCE_S = 0.1


@pytest.fixture
def monitors() -> Iterator[Callable[..., EnergyMonitor]]:
    made: list[EnergyMonitor] = []

    def make(meters: list[EnergyMeter], **kw: Any) -> EnergyMonitor:
        mon = EnergyMonitor(meters=meters, **kw)
        made.append(mon)
        return mon

    yield make
    for mon in made:
        mon.close()


def own_cpu() -> float:  # read as the monitor reads this process: os.times() alone counts whole 10 ms ticks
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def burn(cpu_s: float) -> None:
    start = own_cpu()
    while own_cpu() - start < cpu_s:
        pass


def test_all_monitors_implement_the_contract() -> None:
    for monitor in (EnergyMonitor(), DisabledMonitor(), _NoEnergy()):
        assert isinstance(monitor, TaskEnergyMonitor)
    off = DisabledMonitor()
    assert off.task_report(off.task_stopped(off.task_started("x", pid=os.getpid()))) is None


def test_late_report_of_an_in_process_task_does_not_grow(monitors: Any, validate_facet: Validate) -> None:
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=0.1)
    token = mon.task_started("busy", pid=os.getpid())
    time.sleep(0.3)  # idle while the meters open and the baseline is taken
    before = own_cpu()
    burn(0.5)
    stopped = mon.task_stopped(token)
    until_stop = own_cpu() - before
    burn(1.2)  # the same process keeps burning after the task stopped
    time.sleep(0.3)
    payload = mon.task_report(stopped)
    assert payload is not None
    validate_facet(payload)
    assert payload["errors"] == []
    assert payload["end_interpolated"] is True and payload["end_task_cpu"] == "read-at-stop"
    assert payload["end_interpolation_s"] is not None and payload["end_interpolation_s"] > 0
    assert payload["task_cpu_s"] == pytest.approx(until_stop, abs=TOLERANCE_S)
    assert payload["estimated"]["cpu"]["value_j"] / TDP == pytest.approx(until_stop, abs=TOLERANCE_S)
    assert mon.task_report(stopped) is None  # one report per stopped task


def test_late_report_of_another_process_does_not_grow(monitors: Any, validate_facet: Validate) -> None:
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=0.1)
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proc = psutil.Process(child.pid)

        def child_cpu() -> float:
            t = proc.cpu_times()
            return float(t.user + t.system)

        token = mon.task_started("child", pid=child.pid)
        low = child_cpu()
        time.sleep(0.3)  # the baseline is taken in here
        high = child_cpu()
        while child_cpu() - high < 0.5:
            time.sleep(0.01)
        at_stop = child_cpu()
        stopped = mon.task_stopped(token)
        while child_cpu() - at_stop < 1.0:  # the child burns on; the task is over
            time.sleep(0.05)
        payload = mon.task_report(stopped)
    finally:
        child.kill()
        child.wait()
    assert payload is not None
    validate_facet(payload)
    assert payload["end_interpolated"] is True and payload["end_task_cpu"] == "interpolated"
    assert at_stop - high - TOLERANCE_S <= payload["task_cpu_s"] <= at_stop - low + TOLERANCE_S
    attributed = payload["estimated"]["cpu"]["value_j"] / TDP
    assert at_stop - high - TOLERANCE_S <= attributed <= at_stop - low + TOLERANCE_S


def test_measured_energy_stops_at_the_stop(
    powercap: PowercapTree, monitors: Any, validate_facet: Validate
) -> None:
    mon = monitors([RaplMeter(powercap.root)], interval_s=0.1)
    with PowerSource(powercap, {"intel-rapl:0": 40.0}):
        token = mon.task_started("rapl", pid=os.getpid())
        time.sleep(0.3)
        burn(0.3)
        stopped = mon.task_stopped(token)
        time.sleep(1.0)  # the node draws 40 W on: none of it is the task's any more
        late = mon.task_report(stopped)
    assert late is not None
    validate_facet(late)
    cpu = late["domains"]["cpu"]
    assert cpu["value_j"] is not None and late["end_interpolated"] is True
    sampled = late["wall_s"] * late["coverage"]
    assert cpu["node_j"] == pytest.approx(40.0 * sampled, rel=0.15, abs=0.5)  # node energy of the window only
    assert cpu["node_j"] < 40.0 * (late["wall_s"] + 0.5)


def test_stop_does_not_wait_for_the_meters_to_open(monitors: Any, validate_facet: Validate) -> None:
    class SlowToOpen(EnergyMeter):
        name = "slow"

        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()

        def _open(self) -> str | None:
            self.release.wait(30)
            return None

        def read(self) -> dict[str, Reading]:
            return {"cpu": Reading("cpu", 0.0, "rapl-counter")}

    meter = SlowToOpen()
    mon = monitors([meter], report_timeout_s=0.2)
    try:
        token = mon.task_started("early", pid=os.getpid())
        stopped = mon.task_stopped(token)  # returns although the probe cannot finish until released below
        assert stopped is not None and not meter.available
        payload = mon.task_report(stopped)  # bounded: gives up on the probe after report_timeout_s
    finally:
        meter.release.set()
    assert payload is not None
    validate_facet(payload)
    assert payload["measured_j"] is None
    assert any("still initialising" in e for e in payload["errors"])
    assert payload["domains"]["cpu"]["value_j"] is None and payload["domains"]["cpu"]["reason"]


def test_report_is_bounded_when_the_sampler_hangs(monitors: Any, validate_facet: Validate) -> None:
    class Hanging(EnergyMeter):
        name = "hanging"

        def __init__(self) -> None:
            super().__init__()
            self.reads = 0
            self.armed = threading.Event()
            self.release = threading.Event()

        def _open(self) -> str | None:
            return None

        def read(self) -> dict[str, Reading]:
            self.reads += 1
            if self.armed.is_set():
                self.release.wait(30)
            return {"cpu": Reading("cpu", float(self.reads), "rapl-counter")}

    meter = Hanging()
    mon = monitors([meter], interval_s=0.05, report_timeout_s=0.3)
    token = mon.task_started("stuck", pid=os.getpid())
    deadline = time.monotonic() + 10
    while meter.reads < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    meter.armed.set()
    try:
        payload = mon.task_report(mon.task_stopped(token))
    finally:
        meter.release.set()
    assert payload is not None
    validate_facet(payload)
    assert payload["measured_j"] is None
    assert any("did not answer" in e or "no energy sample came" in e for e in payload["errors"]), payload["errors"]


def test_a_window_no_sample_closes_reports_what_it_has(monitors: Any, validate_facet: Validate) -> None:
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=0.1)
    token = mon.task_started("orphan", pid=os.getpid())
    time.sleep(0.3)
    burn(0.2)
    mon.close()  # the sampler is gone: nothing will close the window
    payload = mon.task_report(mon.task_stopped(token))
    assert payload is not None
    validate_facet(payload)
    assert payload["end_interpolated"] is False
    assert any("monitor was closed after the task stopped" in e for e in payload["errors"]), payload["errors"]
    assert payload["estimated"]["cpu"]["value_j"] is not None  # up to the last sample before the stop


def test_stop_and_report_are_single_use(monitors: Any) -> None:
    mon = monitors([CpuEstimateMeter()])
    token = mon.task_started("once", pid=os.getpid())
    stopped = mon.task_stopped(token)
    assert stopped is not None and mon.task_stopped(token) is None
    assert mon.task_report(stopped) is not None and mon.task_report(stopped) is None
    assert mon.task_stopped(object()) is None and mon.task_report(object()) is None and mon.task_report(None) is None


def test_short_in_process_task_before_any_sample_still_gets_its_cpu_estimate(
    monitors: Any, validate_facet: Validate
) -> None:
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=1.0, min_sample_gap_s=0.5)
    warm = mon.task_started("warm", pid=os.getpid())
    mon.task_finished(warm)
    token = mon.task_started("short", pid=os.getpid())
    before = own_cpu()
    burn(0.05)
    until_stop = own_cpu() - before
    payload = mon.task_report(mon.task_stopped(token))
    assert payload is not None
    validate_facet(payload)
    if payload["coverage"] == 0.0:  # no sample fell inside the task: its CPU time was read at start and stop
        assert payload["task_cpu_s"] == pytest.approx(until_stop, abs=0.02)
        assert payload["estimated"]["cpu"]["value_j"] == pytest.approx(TDP * payload["task_cpu_s"])
        assert payload["end_task_cpu"] == "read-at-stop"


def test_recorder_reports_energy_from_its_writer_thread(
    tmp_path: pathlib.Path, monitors: Any, validate_facet: Validate
) -> None:
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=0.1)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    recorder = Recorder(load_settings(store=store, hash_cache=str(tmp_path / "h.db")), energy_monitor=mon)
    recorder.execution_finished(recorder.execution_started("p", "warm-up"))
    assert recorder.flush(30)  # the writer's own start-up (imports, store) is CPU time of this process too
    ex = recorder.execution_started("p", "burn")
    time.sleep(0.3)
    before = own_cpu()
    burn(0.3)
    recorder.execution_finished(ex)
    until_stop = own_cpu() - before
    burn(0.5)  # the writer reports after this; the window ended at execution_finished
    assert recorder.flush(30)
    recorder.close()
    with open_store(store) as s:
        energy = next(r["energy"] for r in s.list_runs(kind="execution") if r["stage"] == "burn")
    validate_facet(energy)
    assert energy["end_interpolated"] is True
    assert energy["task_cpu_s"] == pytest.approx(until_stop, abs=TOLERANCE_S)


def _wait_baselined(mon: EnergyMonitor, execution_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(t.token.execution_id == execution_id and t.baselined for t in list(mon._tasks.values())):
            return
        time.sleep(0.005)
    raise AssertionError(f"{execution_id} never got its first sample")


@pytest.mark.parametrize("hurried", [True, False])
def test_a_waiting_host_gets_the_closing_sample_now_not_at_the_pacing_gap(
    monitors: Any, validate_facet: Validate, hurried: bool
) -> None:
    """``hurry()`` (a flush waiting for reports) makes the next sample unpaced: the window of a task stopped just
    after its first sample closes at a sample taken then, not a whole gap after that first one. Nobody waiting,
    the pacing holds."""
    gap = 1.5
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=10.0, min_sample_gap_s=gap, report_timeout_s=30)
    token = mon.task_started("short", pid=os.getpid())
    _wait_baselined(mon, "short")
    burn(0.05)
    stopped = mon.task_stopped(token)
    if hurried:
        mon.hurry()
    payload = mon.task_report(stopped)
    assert payload is not None
    validate_facet(payload)
    assert payload["end_interpolated"] is True
    # The interpolated span runs from the task's first sample to the one that closed its window.
    if hurried:
        assert payload["end_interpolation_s"] < gap / 2, payload
    else:
        assert payload["end_interpolation_s"] >= gap * 0.9, payload
    assert payload["task_cpu_s"] == pytest.approx(0.05, abs=TOLERANCE_S)


def test_recorder_flush_hurries_the_energy_sampler(
    tmp_path: pathlib.Path, monitors: Any, validate_facet: Validate
) -> None:
    """A flush (a task runner ending its one task, a process exiting) does not wait out the sampler's pacing gap
    for the energy of the tasks it waits for."""
    gap = 1.5
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=TDP)], interval_s=10.0, min_sample_gap_s=gap, report_timeout_s=30)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    recorder = Recorder(load_settings(store=store, hash_cache=str(tmp_path / "h.db")), energy_monitor=mon)
    try:
        ex = recorder.execution_started("p", "short")
        _wait_baselined(mon, ex.id)
        burn(0.05)
        recorder.execution_finished(ex)
        assert recorder.flush(30)
    finally:
        recorder.close()
    with open_store(store) as s:
        energy = next(r["energy"] for r in s.list_runs(kind="execution") if r["stage"] == "short")
    validate_facet(energy)
    assert energy["end_interpolation_s"] < gap / 2, energy


def test_a_meter_that_fails_to_resume_does_not_end_the_sampler(monitors: Any, validate_facet: Validate) -> None:
    """A meter's ``resume`` may fail (NVML's power sampler cannot start its thread on a node out of threads): the
    sampler logs it and goes on. It once died of it, and every later report waited its whole timeout for a sample
    that never came, then said the energy was not measured."""

    class FailsToResumeOnce(EnergyMeter):
        name = "flaky"

        def __init__(self) -> None:
            super().__init__()
            self.resumes = 0

        def _open(self) -> str | None:
            return None

        def read(self) -> dict[str, Reading]:
            return {"cpu": Reading("cpu", time.monotonic() * 10.0, "rapl-counter")}

        def resume(self) -> None:
            self.resumes += 1
            if self.resumes == 1:
                raise RuntimeError("can't start new thread")

    meter = FailsToResumeOnce()
    mon = monitors([meter], interval_s=0.2, min_sample_gap_s=0.0, report_timeout_s=5.0)

    def one_task(name: str) -> dict[str, Any]:
        token = mon.task_started(name, pid=os.getpid())
        time.sleep(0.05)
        payload = mon.task_report(mon.task_stopped(token))
        assert payload is not None
        validate_facet(payload)
        return payload

    assert one_task("first")["domains"]["cpu"]["value_j"] is not None
    time.sleep(1.5)  # idle past the linger: the sampler suspends the meters, and the next task resumes them
    later = [one_task(f"later{i}") for i in range(3)]
    assert meter.resumes >= 1  # the failing resume happened
    assert all(p["domains"]["cpu"]["value_j"] is not None for p in later), later
    sampler = mon._thread
    assert sampler is not None and sampler.is_alive()
    mon.close()
    mon.task_started("after close", pid=os.getpid())
    assert mon._thread is sampler and not sampler.is_alive()  # a closed monitor is not brought back
