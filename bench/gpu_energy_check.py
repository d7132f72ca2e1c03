"""GPU energy check for a machine with an NVIDIA GPU: counter vs power integration vs nvidia-smi, exclusive vs shared.

Run: ``python bench/gpu_energy_check.py --out report.txt [--seconds 15]``. Needs only ``nvidia-ml-py`` (``pynvml``)
and, for the load, ``torch`` (else ``cupy``; without either it measures an idle GPU and says so). metatrail itself
is used from this checkout when it is not installed (its NVML meter and monitor are then checked too; psutil is
needed for the monitor). Without a GPU or driver it prints why and exits 0. Finishes in well under 3 minutes.

Steps:
1. device facts: name, UUID, architecture, driver, MIG mode, which NVML calls are supported, the energy counter's
   update period (polled for 1 s);
2. idle baseline (3 s);
3. exclusive load: one worker process runs bf16 matrix products; over the same window compare the energy counter
   delta, trapezoid integration of ``nvmlDeviceGetPowerUsage`` at 20 Hz, of ``NVML_FI_DEV_POWER_INSTANT`` field
   values (where supported), of ``nvidia-smi --query-gpu=power.draw`` at 10 Hz, and metatrail's monitor;
4. shared load: two worker processes at once; metatrail's monitor registers both and splits the GPU energy
   (expected basis ``sm-util``, shares near 50/50), compared to the counter's total.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NVML_FI_DEV_POWER_INSTANT = 186

WORKER = r"""
import sys, time
seconds, n = float(sys.argv[1]), int(sys.argv[2])
try:
    import torch
    assert torch.cuda.is_available()
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    sync = torch.cuda.synchronize
    mm = lambda: a @ b
    lib = "torch " + torch.__version__
except Exception:
    import cupy
    a = cupy.random.rand(n, n, dtype=cupy.float32)
    b = cupy.random.rand(n, n, dtype=cupy.float32)
    sync = cupy.cuda.Device().synchronize
    mm = lambda: a @ b
    lib = "cupy " + cupy.__version__
mm(); sync()
print("READY", flush=True)
sys.stdin.readline()
end = time.time() + seconds
iters = 0
while time.time() < end:
    for _ in range(8):
        mm()
    sync()
    iters += 8
print(f"DONE {iters} {lib} {2 * n**3 * iters / seconds / 1e12:.1f}", flush=True)
"""


class Report:
    """Collects lines, prints them as they come, writes them to --out at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path: str | None) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("\n".join(self.lines) + "\n")


def load_metatrail() -> Any:
    """metatrail from the environment, else from this checkout's ``core/`` (the package-dir mapping)."""
    try:
        import metatrail.energy

        return metatrail
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "metatrail", REPO / "core" / "__init__.py", submodule_search_locations=[str(REPO / "core")]
    )
    if spec is None or spec.loader is None:
        raise ImportError("cannot load metatrail from core/")
    module = importlib.util.module_from_spec(spec)
    sys.modules["metatrail"] = module
    spec.loader.exec_module(module)
    import metatrail.energy

    return module


class Sampler:
    """Integrates a power function (watts) with the trapezoid rule in a thread."""

    def __init__(self, power_w: Callable[[], float], period_s: float) -> None:
        self.power_w, self.period_s = power_w, period_s
        self.joules, self.samples, self.errors = 0.0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.values: list[float] = []

    def _run(self) -> None:
        last: tuple[float, float] | None = None
        while not self._stop.is_set():
            try:
                p = self.power_w()
            except Exception:
                self.errors += 1
                p = None
            t = time.monotonic()
            if p is not None:
                self.samples += 1
                self.values.append(p)
                if last is not None:
                    self.joules += (p + last[1]) / 2 * (t - last[0])
                last = (t, p)
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class SmiSampler:
    """``nvidia-smi --query-gpu=power.draw -lms 100`` integrated over arrival times."""

    def __init__(self, index: int) -> None:
        self.index, self.joules, self.samples = index, 0.0, 0
        self.proc: subprocess.Popen[str] | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SmiSampler:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            self.error = "nvidia-smi not on PATH"
            return self
        cmd = [exe, f"--id={self.index}", "--query-gpu=power.draw", "--format=csv,noheader,nounits", "-lms", "100"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        last: tuple[float, float] | None = None
        for line in self.proc.stdout:
            t = time.monotonic()
            try:
                p = float(line.strip().split()[0])
            except (ValueError, IndexError):
                self.error = line.strip()[:200]
                continue
            self.samples += 1
            if last is not None:
                self.joules += (p + last[1]) / 2 * (t - last[0])
            last = (t, p)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_workers(count: int, seconds: float, n: int, env: dict[str, str]) -> list[subprocess.Popen[str]]:
    """Start workers, wait until each has CUDA ready, then release them together."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(seconds), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(count)
    ]
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("READY"):
            rest = p.stdout.read() if p.poll() is not None else ""
            raise RuntimeError(f"GPU worker failed to start: {line.strip()} {rest[-800:]}")
    return procs


def release_and_wait(procs: list[subprocess.Popen[str]]) -> list[str]:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        results.append(out.strip().splitlines()[-1] if out.strip() else f"exit {p.returncode}")
    return results


def counter_period(nvml: Any, handle: Any) -> str:
    try:
        last = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as exc:
        return f"energy counter not supported ({exc})"
    changes: list[float] = []
    t_last = time.monotonic()
    end = t_last + 1.0
    polls = 0
    while time.monotonic() < end:
        v = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        polls += 1
        if v != last:
            t = time.monotonic()
            changes.append(t - t_last)
            t_last, last = t, v
    if len(changes) < 2:
        return f"counter changed {len(changes)} times in 1 s ({polls} polls)"
    return (
        f"counter changed {len(changes)} times in 1 s ({polls} polls); median update period "
        f"{statistics.median(changes[1:]) * 1000:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the report here too")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load window (default 15)")
    parser.add_argument("--size", type=int, default=8192, help="matrix size for the load (default 8192)")
    parser.add_argument("--device", type=int, default=0, help="NVML index of the GPU to use (default 0)")
    args = parser.parse_args()
    say = Report()
    say("# metatrail GPU energy check")
    say(f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    try:
        import pynvml as nvml
    except ImportError:
        say("no GPU check possible: pynvml is not installed (pip install nvidia-ml-py)")
        say.write(args.out)
        return 0
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except Exception as exc:
        say(f"no GPU: NVML could not start ({type(exc).__name__}: {exc})")
        say.write(args.out)
        return 0
    if count == 0:
        say("no GPU: NVML sees 0 devices")
        say.write(args.out)
        return 0
    try:
        return run_checks(nvml, args, say)
    except Exception as exc:
        import traceback

        say(f"check failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return 1
    finally:
        say.write(args.out)
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def run_checks(nvml: Any, args: argparse.Namespace, say: Report) -> int:
    h = nvml.nvmlDeviceGetHandleByIndex(args.device)

    def get(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            return f"n/a ({exc})"

    uuid = get(lambda: nvml.nvmlDeviceGetUUID(h))
    say("\n## Device")
    say(f"name: {get(lambda: nvml.nvmlDeviceGetName(h))}; uuid: {uuid}")
    say(
        f"driver: {get(lambda: nvml.nvmlSystemGetDriverVersion())}; "
        f"architecture code: {get(lambda: nvml.nvmlDeviceGetArchitecture(h))}"
    )
    say(f"MIG mode [current, pending]: {get(lambda: nvml.nvmlDeviceGetMigMode(h))}")
    say(f"power usage now: {get(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000)} W")
    say(f"energy counter: {get(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))} mJ since driver load")
    say(
        "compute processes now: "
        f"{get(lambda: [(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)])}"
    )
    say(counter_period(nvml, h))

    def instant() -> float:
        v = nvml.nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_POWER_INSTANT])[0]
        if v.nvmlReturn != 0:
            raise RuntimeError(f"field value return {v.nvmlReturn}")
        return float(v.value.uiVal) / 1000

    instant_ok = not isinstance(get(instant), str)
    say(f"NVML_FI_DEV_POWER_INSTANT: {get(instant)} W")

    try:
        mt = load_metatrail()
        from metatrail.energy.monitor import EnergyMonitor
        from metatrail.energy.nvml import NvmlMeter

        say(f"metatrail {mt.__version__} loaded from {Path(mt.__file__).parent}")
    except Exception as exc:
        EnergyMonitor = NvmlMeter = None  # type: ignore[assignment, misc, unused-ignore]
        say(f"metatrail not usable here ({type(exc).__name__}: {exc}); raw NVML checks only")

    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = str(uuid) if not str(uuid).startswith("n/a") else str(args.device)
    have_load = importlib.util.find_spec("torch") is not None or importlib.util.find_spec("cupy") is not None
    if not have_load:
        say("\nno torch or cupy: CUDA-free fallback, the windows below measure an idle GPU")

    say("\n## Idle baseline (3 s)")
    e0 = get(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))
    with Sampler(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000, 0.05) as idle:
        t0 = time.monotonic()
        time.sleep(3)
        dt = time.monotonic() - t0
    e1 = get(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))
    if isinstance(e0, int) and isinstance(e1, int):
        say(f"counter: {(e1 - e0) / 1000:.1f} J = {(e1 - e0) / 1000 / dt:.1f} W mean")
    say(f"power sampling: {idle.joules:.1f} J over {idle.samples} samples = {idle.joules / dt:.1f} W mean")

    def window(label: str, workers: int) -> None:
        what = f"{workers} worker process(es), {args.seconds:.0f} s of {args.size}^2 matrix products"
        say(f"\n## {label}: {what if have_load else 'no load library, idle GPU for ' + str(args.seconds) + ' s'}")
        monitor = (
            EnergyMonitor(meters=[NvmlMeter(visible_devices=env["CUDA_VISIBLE_DEVICES"])], interval_s=0.5)
            if EnergyMonitor
            else None
        )
        procs = start_workers(workers, args.seconds, args.size, env) if have_load else []
        tokens = [monitor.task_started(f"w{i}", pid=p.pid) for i, p in enumerate(procs)] if monitor else []
        if monitor and not procs:
            tokens = [monitor.task_started("idle", pid=os.getpid())]
        time.sleep(0.3)  # the monitor's baseline sample
        c0 = get(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))
        with (
            Sampler(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000, 0.05) as usage,
            Sampler(instant, 0.05) if instant_ok else contextlib.nullcontext() as inst,
            SmiSampler(args.device) as smi,
        ):
            t0 = time.monotonic()
            if procs:
                results = release_and_wait(procs)
            else:
                time.sleep(args.seconds)
                results = []
            dt = time.monotonic() - t0
        c1 = get(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))
        payloads = [monitor.task_finished(t) for t in tokens] if monitor else []
        if monitor:
            monitor.close()
        counter_j = (c1 - c0) / 1000 if isinstance(c0, int) and isinstance(c1, int) else None
        say(f"window {dt:.1f} s; workers: {results}")
        rows: list[tuple[str, float | None, int | None]] = [
            ("energy counter (nvmlDeviceGetTotalEnergyConsumption)", counter_j, None)
        ]
        rows.append(("nvmlDeviceGetPowerUsage, 20 Hz trapezoid", usage.joules, usage.samples))
        if inst is not None:
            rows.append(("NVML_FI_DEV_POWER_INSTANT, 20 Hz trapezoid", inst.joules, inst.samples))
        rows.append(
            (
                f"nvidia-smi power.draw, 10 Hz{' (' + smi.error + ')' if smi.error else ''}",
                smi.joules if smi.samples else None,
                smi.samples,
            )
        )
        for name, joules, samples in rows:
            if joules is None:
                say(f"  {name}: n/a")
                continue
            rel = f", {100 * (joules - counter_j) / counter_j:+.1f} % vs counter" if counter_j else ""
            n = f", {samples} samples" if samples is not None else ""
            say(f"  {name}: {joules:.1f} J = {joules / dt:.1f} W mean{n}{rel}")
        total = 0.0
        for i, p in enumerate(payloads):
            gpu = (p or {}).get("domains", {}).get("gpu", {})
            dev = (gpu.get("devices") or [{}])[0]
            total += gpu.get("value_j") or 0.0
            say(
                f"  metatrail task w{i}: gpu {gpu.get('value_j')} J of device {gpu.get('node_j')} J, method "
                f"{gpu.get('method')}, basis {dev.get('share_basis')}, coverage {gpu.get('coverage')}, "
                f"reason {gpu.get('reason')}; errors {(p or {}).get('errors')}"
            )
        if payloads and counter_j:
            say(f"  metatrail tasks together: {total:.1f} J ({100 * total / counter_j:.1f} % of the counter's window)")

    try:
        window("Exclusive", 1)
        window("Shared", 2)
    except Exception as exc:
        buf = io.StringIO()
        import traceback

        traceback.print_exc(file=buf)
        say(f"check failed: {type(exc).__name__}: {exc}\n{buf.getvalue()}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
