"""The EnergyMeter contract (core/energy/meter.py), checked on every meter with fake hardware; and the payload
builder's edge cases against the facet schema."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from fake_pynvml import NVML_ERROR_LIBRARY_NOT_FOUND, FakeGpu, FakeNvml
from powercap_fake import PowercapTree

from metatrail.energy.estimate import CpuEstimateMeter, resolve_tdp_per_cpu
from metatrail.energy.facet import TaskAccount, build_payload, failure_payload
from metatrail.energy.meter import EnergyMeter, Reading
from metatrail.energy.nvml import NvmlMeter
from metatrail.energy.rapl import RaplMeter

MeterFactory = Callable[[], tuple[EnergyMeter, Callable[[], None]]]


@pytest.fixture(params=["rapl", "rapl-missing", "nvml-counter", "nvml-sampling", "nvml-no-driver", "estimate"])
def meter_case(
    request: pytest.FixtureRequest, powercap: PowercapTree, tmp_path: pathlib.Path, fake_nvml: Callable[..., FakeNvml]
) -> tuple[EnergyMeter, Callable[[], None]]:
    kind = request.param
    if kind == "rapl":
        return RaplMeter(powercap.root), lambda: powercap.advance("intel-rapl:0", 1.0)
    if kind == "rapl-missing":
        return RaplMeter(tmp_path / "none"), lambda: None
    if kind.startswith("nvml"):
        gpu = FakeGpu("GPU-x", energy_mj=None if kind == "nvml-sampling" else 0)
        init_error = NVML_ERROR_LIBRARY_NOT_FOUND if kind == "nvml-no-driver" else None
        nvml = fake_nvml(gpu, init_error=init_error)
        return NvmlMeter(nvml=nvml, visible_devices=None), lambda: gpu.add_energy(1.0) if gpu.energy_mj else None
    counter = [100.0]

    def busy() -> float:
        return counter[0]

    def advance() -> None:
        counter[0] += 0.5

    return CpuEstimateMeter(busy_seconds=busy), advance


def test_meter_contract(meter_case: tuple[EnergyMeter, Callable[[], None]]) -> None:
    meter, advance = meter_case
    assert not meter.available and meter.unavailable_reason  # nothing probed yet
    meter.open()
    meter.open()  # idempotent
    assert meter.available == (meter.unavailable_reason is None)
    assert meter.max_read_interval_s > 0
    previous: dict[str, Reading] = {}
    for _ in range(3):
        advance()
        readings = meter.read()
        assert isinstance(readings, dict)
        for key, r in readings.items():
            assert isinstance(r, Reading) and r.domain == key
            assert r.method in ("rapl-counter", "nvml-energy-counter", "nvml-power-sampling", "estimated")
            if r.joules is None:
                assert r.reason, key  # never a silent gap
            else:
                assert r.joules >= 0
                old = previous.get(key)
                if old is not None and old.joules is not None:
                    assert r.joules >= old.joules  # cumulative
        previous = readings
    if not meter.available:
        assert all(r.joules is None for r in meter.read().values())
    meter.suspend()
    meter.resume()
    meter.close()
    meter.close()


def test_tdp_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METATRAIL_CPU_TDP_PER_CORE_W", raising=False)
    monkeypatch.delenv("METATRAIL_CPU_TDP_W", raising=False)
    assert resolve_tdp_per_cpu() == (4.0, "default")
    monkeypatch.setenv("METATRAIL_CPU_TDP_W", "120")
    assert resolve_tdp_per_cpu(n_cpus=8) == (15.0, "METATRAIL_CPU_TDP_W / 8 logical CPUs")
    monkeypatch.setenv("METATRAIL_CPU_TDP_PER_CORE_W", "6")
    assert resolve_tdp_per_cpu() == (6.0, "METATRAIL_CPU_TDP_PER_CORE_W")
    assert resolve_tdp_per_cpu(2.5) == (2.5, "argument")
    monkeypatch.setenv("METATRAIL_CPU_TDP_PER_CORE_W", "zero")
    assert resolve_tdp_per_cpu(n_cpus=8)[1].startswith("METATRAIL_CPU_TDP_W")


METER = {"name": "metatrail.energy", "version": "0.1.0", "backends": [{"name": "rapl", "available": False}]}


def test_failure_payload_validates(validate_facet: Callable[[dict[str, Any]], None]) -> None:
    payload = failure_payload("energy monitor error: boom", interval_s=1.0, meter=METER)
    validate_facet(payload)
    assert all(d["value_j"] is None and d["reason"] for d in payload["domains"].values())
    assert payload["errors"] and payload["measured_j"] is None


def test_payload_without_any_meter_validates(validate_facet: Callable[[dict[str, Any]], None]) -> None:
    payload = build_payload(
        TaskAccount("e", 0.0, 0.0), end_mono=2.0, policy="active-only", interval_s=0.5, meter=METER, missing={}
    )
    validate_facet(payload)
    assert payload["domains"] == {} and payload["coverage"] == 0.0 and payload["errors"]


@pytest.mark.parametrize("raw", ["inf", "nan", "abc", "-3"])
def test_a_refused_tdp_is_named_in_the_facet_errors(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    """A TDP that is not a finite number > 0 is not used (an infinite one made every estimate null) and the task's
    facet says which value was refused."""
    from metatrail.energy.monitor import EnergyMonitor

    monkeypatch.delenv("METATRAIL_CPU_TDP_W", raising=False)
    monkeypatch.setenv("METATRAIL_CPU_TDP_PER_CORE_W", raw)
    note = f"METATRAIL_CPU_TDP_PER_CORE_W={raw!r} refused (must be a finite number of watts > 0); ignored"
    notes: list[str] = []
    assert resolve_tdp_per_cpu(notes=notes) == (4.0, "default") and notes == [note]
    mon = EnergyMonitor(meters=[CpuEstimateMeter()], interval_s=0.1)
    try:
        token = mon.task_started("t", pid=os.getpid())
        busy_until = time.process_time() + 0.3
        while time.process_time() < busy_until:
            pass
        payload = mon.task_finished(token)
    finally:
        mon.close()
    assert payload is not None and note in payload["errors"]
    assert payload["estimated"]["cpu"]["value_j"] is not None
    assert payload["estimated"]["cpu"]["parameters"] == {"tdp_per_cpu_w": 4.0, "tdp_source": "default"}
