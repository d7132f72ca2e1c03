"""GPU energy through NVML (the ``nvidia-ml-py`` package, imported lazily as ``pynvml``).

Per visible GPU, in order of preference (method recorded per device):

* ``nvml-energy-counter``: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load, Volta and newer).
  A counter that goes backwards (driver reloaded) drops that delta and counts it as unusable.
* ``nvml-power-sampling``: where the counter is NotSupported, ``nvmlDeviceGetPowerUsage`` (mW) sampled by a
  daemon thread every ``sample_interval_s`` (<= 0.1 s) and integrated with the trapezoid rule. Ampere and
  newer report a 1 s average there, so short windows are smoothed.

For attribution :meth:`NvmlMeter.processes` gives, per GPU, the compute processes with their used memory
(``nvmlDeviceGetComputeRunningProcesses``) and the SM-utilisation samples since the last call
(``nvmlDeviceGetProcessUtilization``). MIG mode is detected and flagged: only the parent GPU's energy exists
and per-process utilisation is not available under MIG. PIDs are host PIDs (containers need ``--pid=host``).

``CUDA_VISIBLE_DEVICES`` is respected: indices, ``GPU-<uuid>`` (unique prefixes allowed) and ``MIG-<uuid>``
entries; as in CUDA, the first invalid entry ends the list. Indices are NVML (PCI bus) order, which equals
CUDA's order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; a note is added where that could matter.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .meter import EnergyMeter, Method, Reading

_UNSET: Any = object()
NVML_DEVICE_MIG_ENABLE = 1
_NOT_SUPPORTED = 3
_NOT_FOUND = 6
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13


def _err_value(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class GpuDevice:
    """One visible GPU and its accumulated energy."""

    index: int
    uuid: str
    name: str | None
    handle: object
    mig: bool = False
    method: Method | None = None
    reason: str | None = None
    last_mj: int | None = None
    accumulated_j: float = 0.0
    unusable: int = 0
    last_power_w: float | None = None
    last_power_t: float | None = None
    last_util_ts: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def domain(self) -> str:
        """The reading key, ``gpu:<uuid>``."""
        return f"gpu:{self.uuid}"


@dataclass(frozen=True, slots=True)
class GpuProcesses:
    """What runs on one GPU: ``memory`` maps pid -> used bytes (None where NVML hides it); ``sm_util`` maps
    pid -> summed SM-utilisation samples since the previous call. Either is ``None`` when unreadable
    (``reason`` says why); an empty ``sm_util`` means no process was active since the previous call."""

    domain: str
    memory: dict[int, int | None] | None
    sm_util: dict[int, float] | None
    mig: bool = False
    reason: str | None = None


def select_devices(
    spec: str | None, uuids: list[str], resolve_mig: Callable[[str], int | None] | None = None
) -> tuple[list[int], list[str]]:
    """Indices (NVML order) selected by a ``CUDA_VISIBLE_DEVICES`` value, and notes on what was ignored.

    ``None`` selects all devices, ``""`` none. Entries are indices, ``GPU-`` UUIDs or unique UUID prefixes, or
    ``MIG-`` UUIDs (mapped to the parent GPU by ``resolve_mig``). The first invalid entry ends the list, as in
    CUDA.
    """
    if spec is None:
        return list(range(len(uuids))), []
    chosen: list[int] = []
    notes: list[str] = []
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            continue
        index: int | None = None
        if token.lstrip("-").isdigit():
            i = int(token)
            index = i if 0 <= i < len(uuids) else None
        elif token.startswith("MIG-"):
            index = resolve_mig(token) if resolve_mig else None
        else:
            wanted = token if token.startswith("GPU-") else f"GPU-{token}"
            matches = [i for i, u in enumerate(uuids) if u.startswith(wanted)]
            index = matches[0] if len(matches) == 1 else None
        if index is None:
            notes.append(f"CUDA_VISIBLE_DEVICES entry {token!r} matches no GPU; it and later entries are ignored")
            break
        if index not in chosen:
            chosen.append(index)
    return chosen, notes


class NvmlMeter(EnergyMeter):
    """Energy per visible NVIDIA GPU (see the module docstring)."""

    name = "nvml"

    def __init__(
        self,
        *,
        nvml: Any = None,
        visible_devices: str | None = _UNSET,
        sample_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._nvml_injected = nvml
        self.nvml: Any = None
        self._visible = visible_devices
        self.sample_interval_s = min(max(sample_interval_s, 0.005), 0.1)
        self._clock = clock
        self.devices: list[GpuDevice] = []
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._initialised = False

    # -- probing -------------------------------------------------------------------------------------------
    def _open(self) -> str | None:
        nvml = self._nvml_injected
        if nvml is None:
            try:
                import pynvml

                nvml = pynvml
            except ImportError:
                return "pynvml is not installed: pip install 'metatrail[gpu]' (the nvidia-ml-py package)"
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            return self._init_reason(exc)
        self._initialised = True
        try:
            count = int(nvml.nvmlDeviceGetCount())
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except Exception as exc:
            return f"NVML could not list GPUs: {exc}"
        spec = os.environ.get("CUDA_VISIBLE_DEVICES") if self._visible is _UNSET else self._visible
        chosen, notes = select_devices(spec, uuids, self._resolve_mig(uuids))
        self.notes.extend(notes)
        if (
            spec
            and len(chosen) > 1
            and any(t.strip().isdigit() for t in spec.split(","))
            and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID"
        ):
            self.notes.append(
                "CUDA_VISIBLE_DEVICES indices were read in NVML (PCI bus) order; "
                "set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA uses the same order"
            )
        for i in chosen:
            self.devices.append(self._probe_device(i, uuids[i], handles[i]))
        if not self.devices:
            shown = "unset" if spec is None else repr(spec)
            return f"no NVIDIA GPU visible to this process (NVML sees {count}; CUDA_VISIBLE_DEVICES={shown})"
        self.resume()
        return None

    @staticmethod
    def _init_reason(exc: BaseException) -> str:
        value = _err_value(exc)
        if value == _LIBRARY_NOT_FOUND:
            return (
                "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver here; install the driver, "
                "or in a container run with the NVIDIA container toolkit (--gpus)"
            )
        if value == _DRIVER_NOT_LOADED:
            return "NVIDIA driver not loaded (nvidia kernel module): load it (modprobe nvidia) or check nvidia-smi"
        return f"nvmlInit failed: {exc}"

    def _resolve_mig(self, uuids: list[str]) -> Callable[[str], int | None]:
        nvml = self.nvml

        def resolve(mig_uuid: str) -> int | None:
            try:
                mig_handle = nvml.nvmlDeviceGetHandleByUUID(mig_uuid)
                parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig_handle)
                parent_uuid = _text(nvml.nvmlDeviceGetUUID(parent))
            except Exception:
                return None
            return uuids.index(parent_uuid) if parent_uuid in uuids else None

        return resolve

    def _probe_device(self, index: int, uuid: str, handle: object) -> GpuDevice:
        nvml = self.nvml
        name: str | None
        try:
            name = _text(nvml.nvmlDeviceGetName(handle))
        except Exception:
            name = None
        dev = GpuDevice(index, uuid, name, handle)
        try:
            dev.mig = int(nvml.nvmlDeviceGetMigMode(handle)[0]) == NVML_DEVICE_MIG_ENABLE
        except Exception:
            dev.mig = False  # pre-Ampere GPUs have no MIG: NotSupported
        if dev.mig:
            dev.notes.append(
                "MIG mode is enabled: only the whole GPU's energy is measured; a task's part of it is apportioned"
            )
        try:
            dev.last_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            dev.method = "nvml-energy-counter"
            return dev
        except Exception as exc:
            counter_error = exc
        try:
            nvml.nvmlDeviceGetPowerUsage(handle)
            dev.method = "nvml-power-sampling"
            dev.notes.append(f"energy counter unavailable ({counter_error}); power sampled and integrated")
        except Exception as exc:
            dev.reason = (
                f"GPU {index} ({uuid}) reports neither an energy counter ({counter_error}) "
                f"nor power ({exc}); NVML cannot measure this GPU (vGPU or unsupported board)"
            )
        return dev

    # -- sampling ------------------------------------------------------------------------------------------
    def _sampling_devices(self) -> list[GpuDevice]:
        return [d for d in self.devices if d.method == "nvml-power-sampling"]

    def _sample_power(self, dev: GpuDevice, now: float) -> None:
        try:
            watts = int(self.nvml.nvmlDeviceGetPowerUsage(dev.handle)) / 1000.0
        except Exception as exc:
            dev.reason = f"power reading failed on GPU {dev.index}: {exc}"
            if dev.last_power_t is not None:
                dev.unusable += 1
            dev.last_power_t = None
            return
        dev.reason = None
        if dev.last_power_t is not None and dev.last_power_w is not None:
            dev.accumulated_j += (watts + dev.last_power_w) / 2.0 * max(0.0, now - dev.last_power_t)
        dev.last_power_w, dev.last_power_t = watts, now

    def _sampler(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            with self._lock:
                now = self._clock()
                for dev in self._sampling_devices():
                    self._sample_power(dev, now)

    def resume(self) -> None:
        """Start the power sampler thread if some GPU needs power integration."""
        devices = self._sampling_devices()
        if not devices or (self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            now = self._clock()
            for dev in devices:
                self._sample_power(dev, now)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sampler, name="metatrail-gpu-power", daemon=True)
        self._thread.start()

    def suspend(self) -> None:
        """Stop the power sampler; the next :meth:`resume` starts a fresh integration."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=2.0)
        with self._lock:
            for dev in self._sampling_devices():
                dev.last_power_t = None

    def read(self) -> dict[str, Reading]:
        """Cumulative joules per visible GPU (``gpu:<uuid>``); never raises."""
        out: dict[str, Reading] = {}
        with self._lock:
            now = self._clock()
            for dev in self.devices:
                if dev.method == "nvml-energy-counter":
                    self._read_counter(dev)
                elif dev.method == "nvml-power-sampling":
                    self._sample_power(dev, now)
                ok = dev.method is not None and dev.reason is None
                out[dev.domain] = Reading(
                    dev.domain,
                    dev.accumulated_j if ok else None,
                    dev.method or "nvml-energy-counter",
                    reason=None if ok else dev.reason,
                    unusable=dev.unusable,
                    sources=(dev.uuid,),
                    detail={"index": dev.index, "name": dev.name, "mig": dev.mig, "notes": list(dev.notes)},
                )
        return out

    def _read_counter(self, dev: GpuDevice) -> None:
        try:
            mj = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle))
        except Exception as exc:
            dev.reason = f"energy counter read failed on GPU {dev.index}: {exc}"
            return
        dev.reason = None
        if dev.last_mj is not None:
            if mj >= dev.last_mj:
                dev.accumulated_j += (mj - dev.last_mj) / 1000.0
            else:
                dev.unusable += 1  # the driver was reloaded and the counter restarted
        dev.last_mj = mj

    # -- attribution inputs --------------------------------------------------------------------------------
    def processes(self) -> dict[str, GpuProcesses]:
        """Per GPU: compute processes with used memory and SM-utilisation samples since the last call."""
        out: dict[str, GpuProcesses] = {}
        if not self._available:
            return out
        nvml = self.nvml
        for dev in self.devices:
            reasons: list[str] = []
            memory: dict[int, int | None] | None
            try:
                memory = {}
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(dev.handle):
                    used = getattr(proc, "usedGpuMemory", None)
                    memory[int(proc.pid)] = int(used) if isinstance(used, int) else None
            except Exception as exc:
                memory = None
                reasons.append(f"running processes unreadable: {exc}")
            sm: dict[int, float] | None
            if dev.mig:
                sm = None
                reasons.append("per-process utilisation is not available in MIG mode")
            else:
                sm, reason = self._sm_util(dev)
                if reason:
                    reasons.append(reason)
            out[dev.domain] = GpuProcesses(dev.domain, memory, sm, dev.mig, "; ".join(reasons) or None)
        return out

    def _sm_util(self, dev: GpuDevice) -> tuple[dict[int, float] | None, str | None]:
        try:
            samples = self.nvml.nvmlDeviceGetProcessUtilization(dev.handle, dev.last_util_ts)
        except Exception as exc:
            # The wrapper raises NVMLError(NOT_FOUND), or NVMLError(SUCCESS) for an empty buffer: no samples.
            if _err_value(exc) in (0, _NOT_FOUND):
                return {}, None
            return None, f"per-process utilisation unreadable: {exc}"
        sm: dict[int, float] = {}
        newest = dev.last_util_ts
        for s in samples:
            ts = int(s.timeStamp)
            if ts <= dev.last_util_ts:
                continue
            newest = max(newest, ts)
            sm[int(s.pid)] = sm.get(int(s.pid), 0.0) + float(s.smUtil)
        dev.last_util_ts = newest
        return sm, None

    def close(self) -> None:
        """Stop the sampler and shut NVML down; never raises."""
        self.suspend()
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
