"""NvmlMeter against the fake NVML module (and the fake checked against the real pynvml's signatures)."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable

import pytest
from fake_pynvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    FakeGpu,
    FakeNvml,
    NVMLError,
    NVMLError_NotSupported,
    ProcessInfo,
    ProcessUtilizationSample,
)

from metatrail.energy.nvml import NvmlMeter, select_devices

UUIDS = ["GPU-11111111-aaaa", "GPU-22222222-bbbb", "GPU-33333333-cccc"]
FakeFactory = Callable[..., FakeNvml]


def _meter(nvml: FakeNvml, visible: str | None = None, **kw: object) -> NvmlMeter:
    meter = NvmlMeter(nvml=nvml, visible_devices=visible, **kw)  # type: ignore[arg-type]
    meter.open()
    return meter


def test_fake_matches_real_pynvml_signatures() -> None:
    pynvml = pytest.importorskip("pynvml")
    fake = FakeNvml()
    names = [n for n in vars(FakeNvml) if n.startswith("nvml")]
    assert len(names) >= 14
    for name in names:
        real = getattr(pynvml, name)
        real_params = list(inspect.signature(real).parameters)
        fake_params = list(inspect.signature(getattr(fake, name)).parameters)
        assert fake_params == real_params, name
    for name in ("NVMLError_NotSupported", "NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"):
        assert hasattr(pynvml, name) and hasattr(fake, name)
    assert pynvml.NVML_ERROR_NOT_SUPPORTED == fake.NVML_ERROR_NOT_SUPPORTED
    assert isinstance(NVMLError(NVML_ERROR_NOT_SUPPORTED), NVMLError_NotSupported)


def test_energy_counter_deltas(fake_nvml: FakeFactory) -> None:
    gpu = FakeGpu(UUIDS[0], energy_mj=5_000_000)
    meter = _meter(fake_nvml(gpu))
    assert meter.available
    first = meter.read()[f"gpu:{UUIDS[0]}"]
    gpu.add_energy(123.456)
    second = meter.read()[f"gpu:{UUIDS[0]}"]
    assert first.method == second.method == "nvml-energy-counter"
    assert first.joules is not None and second.joules is not None
    assert second.joules - first.joules == pytest.approx(123.456)


def test_counter_reset_is_dropped_not_negative(fake_nvml: FakeFactory) -> None:
    gpu = FakeGpu(UUIDS[0], energy_mj=9_000_000)
    meter = _meter(fake_nvml(gpu))
    before = meter.read()[f"gpu:{UUIDS[0]}"]
    gpu.energy_mj = 1_000  # the driver was reloaded
    after = meter.read()[f"gpu:{UUIDS[0]}"]
    assert after.joules is not None and before.joules is not None and after.joules >= before.joules
    assert after.unusable == before.unusable + 1


def test_power_sampling_when_counter_not_supported(fake_nvml: FakeFactory) -> None:
    gpu = FakeGpu(UUIDS[0], energy_mj=None, power_mw=150_000)
    meter = _meter(fake_nvml(gpu), sample_interval_s=0.02)
    try:
        start = meter.read()[f"gpu:{UUIDS[0]}"]
        assert start.method == "nvml-power-sampling"
        t0 = time.monotonic()
        time.sleep(0.3)
        end = meter.read()[f"gpu:{UUIDS[0]}"]
        elapsed = time.monotonic() - t0
        assert start.joules is not None and end.joules is not None
        assert end.joules - start.joules == pytest.approx(150.0 * elapsed, rel=0.05)
        assert meter._thread is not None and meter._thread.is_alive()
        meter.suspend()
        assert meter._thread is None
    finally:
        meter.close()


def test_trapezoid_integration_with_injected_clock(fake_nvml: FakeFactory) -> None:
    now = [0.0]
    gpu = FakeGpu(UUIDS[0], energy_mj=None, power_mw=100_000)
    meter = NvmlMeter(nvml=fake_nvml(gpu), visible_devices=None, clock=lambda: now[0])
    meter.open()
    meter.suspend()  # drive samples by hand
    dev = meter.devices[0]
    dev.last_power_t, dev.last_power_w, dev.accumulated_j = 0.0, 100.0, 0.0
    gpu.power_mw = 300_000
    now[0] = 2.0
    reading = meter.read()[f"gpu:{UUIDS[0]}"]
    assert reading.joules == pytest.approx((100.0 + 300.0) / 2 * 2.0)
    meter.close()


def test_neither_counter_nor_power_gives_null_and_reason(fake_nvml: FakeFactory) -> None:
    gpu = FakeGpu(UUIDS[0], energy_mj=None, power_mw=None)
    meter = _meter(fake_nvml(gpu))
    reading = meter.read()[f"gpu:{UUIDS[0]}"]
    assert reading.joules is None and "neither an energy counter" in (reading.reason or "")


@pytest.mark.parametrize(
    ("code", "text"),
    [(NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so.1"), (NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded")],
)
def test_missing_library_or_driver(fake_nvml: FakeFactory, code: int, text: str) -> None:
    meter = _meter(fake_nvml(FakeGpu(UUIDS[0]), init_error=code))
    assert not meter.available and text in (meter.unavailable_reason or "")
    assert meter.read() == {}


def test_missing_pynvml_module_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = NvmlMeter(visible_devices=None)
    meter.open()
    assert not meter.available and "pip install 'metatrail[gpu]'" in (meter.unavailable_reason or "")


def test_cuda_visible_devices_by_index_and_uuid(fake_nvml: FakeFactory) -> None:
    gpus = [FakeGpu(u) for u in UUIDS]
    assert [d.uuid for d in _meter(fake_nvml(*gpus), "2,0").devices] == [UUIDS[2], UUIDS[0]]
    assert [d.uuid for d in _meter(fake_nvml(*gpus), "GPU-22222222").devices] == [UUIDS[1]]
    assert [d.uuid for d in _meter(fake_nvml(*gpus), "1,7,0").devices] == [UUIDS[1]]  # CUDA stops at 7
    empty = _meter(fake_nvml(*gpus), "")
    assert not empty.available and "CUDA_VISIBLE_DEVICES=''" in (empty.unavailable_reason or "")


def test_cuda_visible_devices_from_environment(fake_nvml: FakeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUIDS[2])
    meter = NvmlMeter(nvml=fake_nvml(*[FakeGpu(u) for u in UUIDS]))
    meter.open()
    assert [d.index for d in meter.devices] == [2]


def test_select_devices_pure() -> None:
    assert select_devices(None, UUIDS) == ([0, 1, 2], [])
    assert select_devices("", UUIDS) == ([], [])
    chosen, notes = select_devices("0,GPU-3,1", UUIDS)
    assert chosen == [0, 2, 1] and notes == []
    chosen, notes = select_devices("0,-1,1", UUIDS)
    assert chosen == [0] and "ignored" in notes[0]
    assert select_devices("MIG-abc", UUIDS, lambda u: 1)[0] == [1]


def test_mig_detected_and_flagged(fake_nvml: FakeFactory) -> None:
    parent = FakeGpu(UUIDS[0], mig=True, processes=[ProcessInfo(101, 1 << 30)])
    nvml = fake_nvml(parent)
    nvml.mig_devices["MIG-aaaa"] = FakeGpu("MIG-aaaa", parent=parent)
    meter = _meter(nvml, "MIG-aaaa")
    assert [d.uuid for d in meter.devices] == [UUIDS[0]] and meter.devices[0].mig
    reading = meter.read()[f"gpu:{UUIDS[0]}"]
    assert reading.detail["mig"] is True
    procs = meter.processes()[f"gpu:{UUIDS[0]}"]
    assert procs.mig and procs.sm_util is None and "MIG" in (procs.reason or "")
    assert procs.memory == {101: 1 << 30}


def test_processes_and_sm_util_since_last_call(fake_nvml: FakeFactory) -> None:
    gpu = FakeGpu(
        UUIDS[0],
        processes=[ProcessInfo(10, 2 << 30), ProcessInfo(20, None)],
        samples=[ProcessUtilizationSample(10, 1_000, 60), ProcessUtilizationSample(20, 1_000, 20)],
    )
    meter = _meter(fake_nvml(gpu))
    procs = meter.processes()[f"gpu:{UUIDS[0]}"]
    assert procs.memory == {10: 2 << 30, 20: None}
    assert procs.sm_util == {10: 60.0, 20: 20.0}
    again = meter.processes()[f"gpu:{UUIDS[0]}"]
    assert again.sm_util == {}  # NOT_FOUND: nothing new since the last timestamp
    gpu.samples.append(ProcessUtilizationSample(20, 2_000, 90))
    assert meter.processes()[f"gpu:{UUIDS[0]}"].sm_util == {20: 90.0}


def test_unreadable_process_table_is_reported(fake_nvml: FakeFactory) -> None:
    gpu = FakeGpu(UUIDS[0], processes_error=NVML_ERROR_NO_PERMISSION, utilization_error=NVML_ERROR_NOT_SUPPORTED)
    procs = _meter(fake_nvml(gpu)).processes()[f"gpu:{UUIDS[0]}"]
    assert procs.memory is None and procs.sm_util is None
    assert "Insufficient Permissions" in (procs.reason or "") and "Not Supported" in (procs.reason or "")


def test_close_shuts_nvml_down(fake_nvml: FakeFactory) -> None:
    nvml = fake_nvml(FakeGpu(UUIDS[0]))
    meter = _meter(nvml)
    assert nvml.initialised == 1
    meter.close()
    assert nvml.initialised == 0
