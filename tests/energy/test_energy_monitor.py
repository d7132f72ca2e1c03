"""EnergyMonitor end to end: real processes, fake hardware (powercap tree, NVML module), schema-checked payloads."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_pynvml import NVML_ERROR_LIBRARY_NOT_FOUND, FakeGpu, FakeNvml, ProcessInfo
from powercap_fake import PowercapTree, PowerSource

import metatrail.energy as energy
from metatrail.energy.estimate import CpuEstimateMeter
from metatrail.energy.meter import EnergyMeter
from metatrail.energy.monitor import EnergyMonitor
from metatrail.energy.nvml import NvmlMeter
from metatrail.energy.rapl import PERMISSION_FIX, RaplMeter, read_sysfs

Validate = Callable[[dict[str, Any]], None]
BURN = "import time\nend = time.time() + {d}\nwhile time.time() < end: pass\n"
HALF = (
    "import time\nend = time.time() + {d}\n"
    "while time.time() < end:\n    t = time.time() + 0.02\n    while time.time() < t: pass\n    time.sleep(0.02)\n"
)
SLEEP = "import time\ntime.sleep({d})\n"


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


@pytest.fixture
def procs() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", code])
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_no_thread_and_no_probe_until_first_use(powercap: PowercapTree, monitors: Any) -> None:
    meter = RaplMeter(powercap.root)
    mon = monitors([meter])
    assert mon._thread is None and not meter.zones
    threads_before = set(threading.enumerate())
    token = mon.task_started("e1", pid=os.getpid())
    assert mon._thread is not None and mon._thread.daemon
    assert mon._thread not in threads_before
    payload = mon.task_finished(token)
    assert payload is not None and meter.zones


def test_concurrent_processes_get_energy_in_proportion_to_cpu(
    powercap: PowercapTree, monitors: Any, procs: Any, validate_facet: Validate
) -> None:
    mon = monitors([RaplMeter(powercap.root), CpuEstimateMeter()], interval_s=0.25)
    with PowerSource(powercap, {"intel-rapl:0": 30.0, "intel-rapl:1": 10.0, "intel-rapl:0:2": 4.0}):
        full, half, idle = procs(BURN.format(d=6)), procs(HALF.format(d=6)), procs(SLEEP.format(d=6))
        tokens = {
            "full": mon.task_started("full", pid=full.pid),
            "half": mon.task_started("half", pid=half.pid),
            "idle": mon.task_started("idle", pid=idle.pid),
        }
        time.sleep(3.0)
        payloads = {k: mon.task_finished(t) for k, t in tokens.items()}
    cpu: dict[str, float] = {}
    for name, p in payloads.items():
        assert p is not None
        validate_facet(p)
        assert p["max_concurrent_tasks"] == 3 and p["errors"] == []
        dom = p["domains"]["cpu"]
        assert dom["method"] == "rapl-counter" and dom["value_j"] is not None
        assert dom["attribution"]["value_other_policy_j"] <= dom["value_j"] + 1e-9  # active-only <= busy-share
        assert p["estimated"] == {} and p["measured_j"] == pytest.approx(
            dom["value_j"] + p["domains"]["dram"]["value_j"]
        )
        cpu[name] = dom["value_j"]
    node = payloads["full"]["domains"]["cpu"]["node_j"]
    assert sum(cpu.values()) <= node * 1.01
    ratio = cpu["full"] / cpu["half"]
    assert 1.3 < ratio < 4.0, (cpu, ratio)
    assert cpu["idle"] < 0.1 * cpu["full"], cpu


def test_reaped_children_are_counted(monitors: Any, procs: Any, validate_facet: Validate) -> None:
    mon = monitors([CpuEstimateMeter(tdp_per_cpu_w=10.0)], interval_s=0.2)
    child = "import time\nwhile time.process_time() < 0.6: pass\n"  # exactly 0.6 CPU-s, however loaded
    wrapper = procs(f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {child!r}])\ntime.sleep(5)\n")
    token = mon.task_started("wrapper", pid=wrapper.pid, include_children=True)
    deadline = time.time() + 15
    while time.time() < deadline and len(_children(wrapper.pid)) == 0:
        time.sleep(0.01)
    while time.time() < deadline and _children(wrapper.pid):
        time.sleep(0.05)  # the burning child runs, then is reaped by the wrapper
    time.sleep(0.3)
    payload = mon.task_finished(token)
    assert payload is not None
    validate_facet(payload)
    assert payload["domains"]["cpu"]["value_j"] is None  # no CPU meter: a reason, never 0
    assert payload["measured_j"] is None
    estimate = payload["estimated"]["cpu"]
    assert estimate["method"] == "estimated" and estimate["parameters"]["tdp_per_cpu_w"] == 10.0
    assert 10.0 * 0.45 <= estimate["value_j"] <= 10.0 * 1.2, estimate  # the child's 0.6 CPU-s, via children_*
    assert payload["estimated_j"] == estimate["value_j"] and payload["carbon"]["energy_basis"] == "estimated"


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def test_unreadable_energy_still_gives_a_payload_with_reasons(
    tmp_path: pathlib.Path, fake_nvml: Callable[..., FakeNvml], monitors: Any, validate_facet: Validate
) -> None:
    nvml = NvmlMeter(nvml=fake_nvml(FakeGpu("GPU-1"), init_error=NVML_ERROR_LIBRARY_NOT_FOUND))
    mon = monitors([RaplMeter(tmp_path / "no-powercap"), nvml])
    token = mon.task_started("blind", pid=os.getpid())
    time.sleep(0.2)
    payload = mon.task_finished(token)
    assert payload is not None
    validate_facet(payload)
    for domain in ("cpu", "dram", "gpu"):
        entry = payload["domains"][domain]
        assert entry["value_j"] is None and entry["reason"], domain
    # Each domain names its meter; the meter's reason (what is missing, how to fix it) is given once.
    backends = {b["name"]: b for b in payload["meter"]["backends"]}
    assert [b["available"] for b in backends.values()] == [False, False]
    assert "libnvidia-ml" in backends["nvml"]["reason"] and "powercap" in backends["rapl"]["reason"]
    assert "nvml meter is unavailable" in payload["domains"]["gpu"]["reason"]
    assert all("rapl meter is unavailable" in payload["domains"][d]["reason"] for d in ("cpu", "dram"))
    assert payload["measured_j"] is None and payload["estimated_j"] is None
    assert payload["carbon"]["co2e_g"] is None and payload["carbon"]["energy_basis"] == "none"
    serialised = json.dumps(payload)
    assert serialised.count(backends["rapl"]["reason"]) == 1 and serialised.count(backends["nvml"]["reason"]) == 1


def test_permission_denied_is_null_with_fix_and_estimate_kept_apart(
    powercap: PowercapTree, monitors: Any, validate_facet: Validate
) -> None:
    def deny(path: pathlib.Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_sysfs(path)

    mon = monitors([RaplMeter(powercap.root, reader=deny), CpuEstimateMeter()], interval_s=0.1)
    token = mon.task_started("denied", pid=os.getpid())
    end = time.time() + 0.5
    while time.time() < end:
        pass
    payload = mon.task_finished(token)
    assert payload is not None
    validate_facet(payload)
    cpu = payload["domains"]["cpu"]
    assert cpu["value_j"] is None and "rapl meter is unavailable" in cpu["reason"]
    rapl = next(b for b in payload["meter"]["backends"] if b["name"] == "rapl")
    assert PERMISSION_FIX in rapl["reason"]
    assert payload["measured_j"] is None
    assert payload["estimated"]["cpu"]["value_j"] > 0 and payload["estimated_j"] > 0


def test_gpu_exclusive_use_goes_to_the_task_on_the_gpu(
    powercap: PowercapTree,
    fake_nvml: Callable[..., FakeNvml],
    monitors: Any,
    procs: Any,
    validate_facet: Validate,
) -> None:
    gpu = FakeGpu("GPU-aaaa", energy_mj=0, processes=[ProcessInfo(os.getpid(), 1 << 30)])
    mon = monitors([RaplMeter(powercap.root), NvmlMeter(nvml=fake_nvml(gpu), visible_devices=None)], interval_s=0.1)
    other = procs(SLEEP.format(d=5))
    on_gpu = mon.task_started("on-gpu", pid=os.getpid())
    off_gpu = mon.task_started("off-gpu", pid=other.pid)
    stop = threading.Event()

    def draw() -> None:
        while not stop.wait(0.01):
            gpu.add_energy(2.0)  # about 200 W

    with PowerSource(powercap, {"intel-rapl:0": 20.0}):
        t = threading.Thread(target=draw)
        t.start()
        time.sleep(0.6)
        stop.set()
        t.join()
        p_on, p_off = mon.task_finished(on_gpu), mon.task_finished(off_gpu)
    assert p_on is not None and p_off is not None
    validate_facet(p_on)
    validate_facet(p_off)
    g_on, g_off = p_on["domains"]["gpu"], p_off["domains"]["gpu"]
    assert g_on["method"] == "nvml-energy-counter" and g_on["attribution"]["share_basis"] == "exclusive"
    assert g_on["value_j"] > 50 and g_on["value_j"] == pytest.approx(g_on["node_j"])
    assert g_on["devices"][0]["uuid"] == "GPU-aaaa" and g_on["devices"][0]["mig"] is False
    assert g_off["value_j"] == 0.0 and g_off["attribution"]["share_basis"] == "none"


def test_wraps_during_a_task_are_corrected(
    make_powercap: Callable[[str], PowercapTree], monitors: Any, validate_facet: Validate
) -> None:
    tree = make_powercap("wrapping")
    tree.add_zone("intel-rapl:0", "package-0", 150_000_000, max_uj=200_000_000)  # 200 J range
    mon = monitors([RaplMeter(tree.root)], interval_s=1.0)
    token = mon.task_started("wrap", pid=os.getpid())
    with PowerSource(tree, {"intel-rapl:0": 400.0}, period_s=0.005):  # wraps every 0.5 s
        time.sleep(1.5)
        payload = mon.task_finished(token)
    assert payload is not None
    validate_facet(payload)
    cpu = payload["domains"]["cpu"]
    assert cpu["wraps"] >= 2 and cpu["coverage"] == 1.0
    sampled = payload["wall_s"] * payload["coverage"]
    assert cpu["node_j"] == pytest.approx(400.0 * sampled, rel=0.15)


def test_active_only_policy_from_environment(
    powercap: PowercapTree, monitors: Any, monkeypatch: pytest.MonkeyPatch, validate_facet: Validate
) -> None:
    monkeypatch.setenv("METATRAIL_ENERGY_POLICY", "active-only")
    mon = monitors([RaplMeter(powercap.root)], interval_s=0.1)
    with PowerSource(powercap, {"intel-rapl:0": 20.0}):
        token = mon.task_started("k", pid=os.getpid())
        # Busy for 0.4 s and for at least two of the monitor's samples: on a loaded machine its thread can start
        # late, and a task no interval covered has nothing to attribute (tested elsewhere).
        start, task = time.time(), None
        while time.time() < start + 10:
            task = task or mon._tasks.get(token.id)
            sampled = task is not None and task.acct.first_sample is not None and task.acct.last_sample is not None \
                and task.acct.last_sample > task.acct.first_sample
            if sampled and time.time() > start + 0.4:
                break
        payload = mon.task_finished(token)
    assert payload is not None
    validate_facet(payload)
    cpu = payload["domains"]["cpu"]
    assert payload["policy"] == cpu["attribution"]["policy"] == "active-only"
    assert cpu["attribution"]["other_policy"] == "busy-share"
    assert cpu["value_j"] <= cpu["attribution"]["value_other_policy_j"] + 1e-9
    low, high = payload["uncertainty"]["attribution_low_j"], payload["uncertainty"]["attribution_high_j"]
    assert low <= payload["measured_j"] <= high
    assert payload["idle_j"] is not None and payload["idle_j"] >= 0


def test_unknown_token_and_double_finish(powercap: PowercapTree, monitors: Any) -> None:
    mon = monitors([RaplMeter(powercap.root)])
    assert mon.task_finished(object()) is None
    token = mon.task_started("once", pid=os.getpid())
    assert mon.task_finished(token) is not None
    assert mon.task_finished(token) is None


def test_short_task_gets_nulls_with_a_reason(powercap: PowercapTree, monitors: Any, validate_facet: Validate) -> None:
    mon = monitors([RaplMeter(powercap.root)])
    first = mon.task_started("first", pid=os.getpid())
    mon.task_finished(first)
    token = mon.task_started("instant", pid=os.getpid())
    payload = mon.task_finished(token)
    assert payload is not None
    validate_facet(payload)
    assert set(payload["domains"]) == {"cpu", "dram"}
    if payload["coverage"] == 0.0:
        assert payload["domains"]["cpu"]["value_j"] is None and payload["domains"]["cpu"]["reason"]
    else:
        assert payload["domains"]["cpu"]["value_j"] is not None


def _run_isolated(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("METATRAIL_")}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


PROBE = (
    "import os, sys, threading, metatrail.energy as e\n"
    "m = e.get_monitor()\n"
    "t = m.task_started('x', pid=os.getpid())\n"
    "print(type(m).__name__, m.task_finished(t), 'metatrail.energy.monitor' in sys.modules, "
    "'psutil' in sys.modules, threading.active_count(), m is e.get_monitor())\n"
)


@pytest.mark.parametrize(("var", "value"), [("METATRAIL_DISABLED", "1"), ("METATRAIL_ENERGY", "0")])
def test_switched_off_monitor_does_nothing(var: str, value: str) -> None:
    assert _run_isolated(PROBE, **{var: value}) == "DisabledMonitor None False False 1 True"


def test_import_is_light_and_get_monitor_is_process_wide() -> None:
    code = (
        "import sys, metatrail.energy\n"
        "print(sorted(m for m in ('psutil', 'pynvml', 'matplotlib', 'metatrail.energy.monitor') "
        "if m in sys.modules))\n"
    )
    assert _run_isolated(code) == "[]"
    energy.reset_monitor()
    try:
        assert energy.get_monitor() is energy.get_monitor()
        assert isinstance(energy.get_monitor(), EnergyMonitor)
    finally:
        energy.reset_monitor()


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_burst_of_short_tasks_widens_the_sampling_gap_and_keeps_every_tasks_cpu_time(
    monitors: Callable[..., EnergyMonitor], validate_facet: Validate
) -> None:
    """Tasks far shorter than the 20 ms gap, one after another in the host's process: the sampler takes a fraction
    of the samples a fixed gap allows, each task still gets its CPU time, and the gap is back at its floor once
    the burst is over."""
    mon = monitors([CpuEstimateMeter()], interval_s=1.0)
    mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
    seq_before = mon._seq
    began = time.monotonic()
    stopped = []
    for i in range(300):
        token = mon.task_started(f"short-{i}", pid=os.getpid())
        _spin(0.002)
        stopped.append(mon.task_stopped(token))
    burst_s = time.monotonic() - began
    payloads = [mon.task_report(s) for s in stopped]
    samples = mon._seq - seq_before
    fixed_gap_samples = burst_s / mon.min_sample_gap_s
    assert samples < fixed_gap_samples / 3, (samples, fixed_gap_samples)
    for p in payloads:
        assert p is not None
        validate_facet(p)
        assert p["task_cpu_s"] is not None and p["task_cpu_s"] > 0
    deadline = time.monotonic() + 5
    while mon._gap != mon.min_sample_gap_s and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mon._gap == mon.min_sample_gap_s


def _power_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "metatrail-gpu-power"}


def test_short_tasks_with_idle_gaps_between_them_are_paced_and_the_meters_stay_on(
    monitors: Callable[..., EnergyMonitor], fake_nvml: Callable[..., FakeNvml], validate_facet: Validate
) -> None:
    """A host that starts a short task every few milliseconds, each ended before the next began (Parsl's thread
    pool running no-op apps): the monitor is idle between tasks, yet a recent sample stays the baseline, so the
    tasks are paced like a burst (not a sample, nor a GPU power sampler stopped and started, per task) and each
    keeps its CPU time. Once idle for a sampling interval, the sampler drops the baseline and suspends the
    meters."""
    gpu = FakeGpu("GPU-idle-gaps", energy_mj=None, power_mw=100_000)  # no counter: power is sampled in a thread
    mon = monitors([CpuEstimateMeter(), NvmlMeter(nvml=fake_nvml(gpu), visible_devices=None)], interval_s=0.5)
    mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
    seq_before = mon._seq
    power_threads: set[threading.Thread] = set()
    stopped = []
    for i in range(100):
        token = mon.task_started(f"gap-{i}", pid=os.getpid())
        _spin(0.001)
        stopped.append(mon.task_stopped(token))
        power_threads |= _power_threads()
        time.sleep(0.003)
    payloads = [mon.task_report(s) for s in stopped]
    assert mon._seq - seq_before < len(stopped) / 3, mon._seq - seq_before
    assert len(power_threads) <= 2, len(power_threads)  # the one running since the warm-up (and one if suspended)
    for p in payloads:
        assert p is not None
        validate_facet(p)
        assert p["task_cpu_s"] is not None and p["task_cpu_s"] > 0
    deadline = time.monotonic() + 5
    while (_power_threads() or mon._prev is not None) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _power_threads() and mon._prev is None


def _closed_task(i: int, ran_s: float) -> Any:
    from metatrail.energy.ledger import TaskToken, TrackedTask

    task = TrackedTask(TaskToken(i, f"t{i}"), os.getpid(), True, 0.0, 100.0, 1)
    task.stop = 100.0 + ran_s
    return task


def test_sampling_gap_doubles_to_its_ceiling_and_halves_to_its_floor(
    monitors: Callable[..., EnergyMonitor],
) -> None:
    from metatrail.energy.monitor import MAX_BURST_GAP_S

    mon = monitors([CpuEstimateMeter()], interval_s=1.0)
    mon.task_finished(mon.task_started("opens-the-meters", pid=os.getpid()))
    floor = mon.min_sample_gap_s
    burst = [_closed_task(i, floor / 4) for i in range(2)]
    with mon._lock:
        seen = []
        for _ in range(8):
            mon._adapt_gap(burst)
            seen.append(mon._gap)
        assert seen[:3] == [2 * floor, 4 * floor, 8 * floor] and seen[-1] == MAX_BURST_GAP_S
        mon._adapt_gap(burst[:1])  # one short task: no sign of a burst either way
        assert mon._gap == MAX_BURST_GAP_S
        while mon._gap > floor:
            before = mon._gap
            mon._adapt_gap([])
            assert mon._gap == max(floor, before / 2)
        for _ in range(8):
            mon._adapt_gap(burst)
        # A task as long as the floor that no sample covered: the gap was too wide for it, back to the floor at once.
        mon._adapt_gap([*burst, _closed_task(9, 1.5 * floor)])
        assert mon._gap == floor
    fast = monitors([CpuEstimateMeter()], interval_s=0.05)  # the ceiling never passes what the interval allows
    fast.task_finished(fast.task_started("opens-the-meters", pid=os.getpid()))
    with fast._lock:
        for _ in range(8):
            fast._adapt_gap(burst)
        assert fast._gap == fast._max_wait() < MAX_BURST_GAP_S
    off = monitors([CpuEstimateMeter()], min_sample_gap_s=0.0)  # no pacing asked for: none learned either
    with off._lock:
        off._adapt_gap(burst)
        assert off._gap == 0.0


def test_a_task_running_beside_a_burst_is_sampled_at_the_narrow_pace(
    monitors: Callable[..., EnergyMonitor], validate_facet: Validate
) -> None:
    """A burst of 2 ms tasks on one thread widens the gap; a 0.4 s task started meanwhile on another still gets its
    first sample about ``min_sample_gap_s`` after its start and its closing sample soon after its stop."""
    mon = monitors([CpuEstimateMeter()], interval_s=1.0)
    mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
    done = threading.Event()

    def burst() -> None:
        stopped = []
        while not done.is_set():
            token = mon.task_started("short", pid=os.getpid())
            _spin(0.002)
            stopped.append(mon.task_stopped(token))
        for s in stopped:
            mon.task_report(s)

    thread = threading.Thread(target=burst)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while mon._gap < 4 * mon.min_sample_gap_s and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mon._gap >= 4 * mon.min_sample_gap_s  # the burst has widened the gap
        long_task = mon.task_started("long", pid=os.getpid())
        time.sleep(0.4)
        payload = mon.task_report(mon.task_stopped(long_task))
    finally:
        done.set()
        thread.join()
    assert payload is not None
    validate_facet(payload)
    # Its first sample came within a few floors of its start, not a widened gap later; its last within as much
    # after its stop (a fixed 0.2 s pace would leave up to half of the 0.4 s uncovered and 0.2 s interpolated).
    assert payload["coverage"] >= 0.7, payload
    assert payload["end_interpolation_s"] is not None and payload["end_interpolation_s"] <= 0.1, payload


def test_a_forked_child_does_not_report_the_parents_task_and_measures_its_own(
    monitors: Callable[..., EnergyMonitor], validate_facet: Validate
) -> None:
    """After a fork (told by an ``os.fork`` hook, not by asking for the pid at each start) the child's monitor says
    that a task the parent started is not measured there, and measures the child's own tasks with a sampler of its
    own; the parent's monitor goes on as before."""
    from forkkit import in_forked_child

    mon = monitors([CpuEstimateMeter()], interval_s=1.0, report_timeout_s=5.0)
    mon.task_finished(mon.task_started("warm-up", pid=os.getpid()))
    parents = mon.task_started("parent's", pid=os.getpid())

    def check() -> bool:
        inherited = mon.task_report(mon.task_stopped(parents))
        own = mon.task_finished(mon.task_started("child's", pid=os.getpid()))
        assert inherited is not None and own is not None
        validate_facet(inherited)
        validate_facet(own)
        return (any("forked while the task ran" in e for e in inherited["errors"])
                and own["task_cpu_s"] is not None and not any("forked" in e for e in own["errors"]))

    assert in_forked_child(check)
    payload = mon.task_finished(parents)
    assert payload is not None and payload["task_cpu_s"] is not None
    assert not any("forked" in e for e in payload["errors"]), payload["errors"]
