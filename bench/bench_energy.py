"""Energy-meter overhead: metatrail.energy vs CodeCarbon on the same 5 s single-thread CPU burn.

Run: ``python bench/bench_energy.py --codecarbon-python /tmp/cc-venv/bin/python`` (CodeCarbon in its own venv:
``python3 -m venv /tmp/cc-venv && /tmp/cc-venv/bin/pip install codecarbon``); without that option only metatrail is
measured. Each repetition runs in a fresh interpreter, alternating the tools, and reports:

* start latency (both tools byte-compiled, as pip installs them): import + construction + start call, as the
  host task waits for it (metatrail: ``import
  metatrail.energy`` + ``get_monitor()`` + ``task_started``, the ``metatrail`` package itself being imported
  already by the Recorder and reported apart; CodeCarbon: its import + ``OfflineEmissionsTracker(...)`` +
  ``start()``), and for metatrail also the time until its background thread has probed the meters and taken the
  task's first sample (the host does not wait);
* added memory: resident set size after the stop call minus before the import;
* meter CPU: CPU time of all threads but the burning main thread during the burn (``time.process_time()`` minus
  the main thread's ``time.thread_time()``), as % of one core, both sampling
  once a second (metatrail ``interval_s=1``, CodeCarbon ``measure_power_secs=1``);
* stop latency and the energy each reported (J).

Targets for metatrail: start <= 50 ms, memory <= 15 MB, meter CPU <= 0.5 % of a core at 1 Hz. Writes
``bench/results/energy.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

COMMON = r"""
import json, os, sys, threading, time
import psutil
proc = psutil.Process()
def thread_cpu():
    # CPU of every thread but this (main) one, from the precise per-process and per-thread clocks
    return time.process_time() - time.thread_time()
def burn(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x
rss0 = proc.memory_info().rss
"""

METATRAIL = (
    COMMON
    + r"""
tp = time.perf_counter()
import metatrail  # the Recorder's package: already imported in a recording host
t0 = time.perf_counter()
import metatrail.energy as energy
t1 = time.perf_counter()
monitor = energy.get_monitor()
t2 = time.perf_counter()
token = monitor.task_started("bench", pid=os.getpid())
t3 = time.perf_counter()
monitor._ready.wait(30)
while token.id not in monitor._tasks or not monitor._tasks[token.id].baselined:
    time.sleep(0.001)
ready = time.perf_counter()
c0 = thread_cpu()
burn(SECONDS)
c1 = thread_cpu()
t4 = time.perf_counter()
payload = monitor.task_finished(token)
t5 = time.perf_counter()
rss1 = proc.memory_info().rss
cpu = payload["domains"].get("cpu", {})
print(json.dumps({
    "package_import_s": t0 - tp,
    "import_s": t1 - t0, "construct_s": t2 - t1, "start_s": t3 - t2, "ready_s": ready - t2,
    "stop_s": t5 - t4, "rss_mb": (rss1 - rss0) / 2**20, "meter_cpu_s": c1 - c0, "burn_s": SECONDS,
    "energy_j": payload["measured_j"] if payload["measured_j"] is not None else payload["estimated_j"],
    "energy_kind": "measured" if payload["measured_j"] is not None else "estimated",
    "cpu_reason": cpu.get("reason"),
}))
"""
)

CODECARBON = (
    COMMON
    + r"""
import logging
t0 = time.perf_counter()
from codecarbon import OfflineEmissionsTracker
t1 = time.perf_counter()
tracker = OfflineEmissionsTracker(country_iso_code="FRA", measure_power_secs=1, save_to_file=False,
                                  log_level="error", tracking_mode="machine")
t2 = time.perf_counter()
tracker.start()
t3 = time.perf_counter()
c0 = thread_cpu()
burn(SECONDS)
c1 = thread_cpu()
t4 = time.perf_counter()
tracker.stop()
t5 = time.perf_counter()
rss1 = proc.memory_info().rss
data = tracker.final_emissions_data
print(json.dumps({
    "import_s": t1 - t0, "construct_s": t2 - t1, "start_s": t3 - t2, "ready_s": None,
    "stop_s": t5 - t4, "rss_mb": (rss1 - rss0) / 2**20, "meter_cpu_s": c1 - c0, "burn_s": SECONDS,
    "energy_j": data.energy_consumed * 3.6e6, "energy_kind": "codecarbon (cpu+ram+gpu)",
    "cpu_reason": f"cpu {data.cpu_energy * 3.6e6:.1f} J, ram {data.ram_energy * 3.6e6:.1f} J",
}))
"""
)


def run_once(python: str, code: str, seconds: float, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [python, "-c", code.replace("SECONDS", repr(seconds))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-3000:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def summarise(name: str, runs: list[dict[str, object]]) -> list[str]:
    def med(key: str) -> float | None:
        values = [float(r[key]) for r in runs if r.get(key) is not None]  # type: ignore[arg-type]
        return statistics.median(values) if values else None

    def ms(key: str) -> str:
        v = med(key)
        return "n/a" if v is None else f"{v * 1000:.1f} ms"

    start = sum(v for v in (med("import_s"), med("construct_s"), med("start_s")) if v is not None)
    cpu_pct = 100 * (med("meter_cpu_s") or 0.0) / (med("burn_s") or 1.0)
    lines = [
        f"{name} (median of {len(runs)})",
        f"  start latency (import + construct + start): {start * 1000:.1f} ms"
        f"  [import {ms('import_s')}, construct {ms('construct_s')}, start call {ms('start_s')}]",
    ]
    if med("ready_s") is not None:
        lines.append(f"  first sample ready after (background, the host does not wait): {ms('ready_s')}")
    if med("package_import_s") is not None:
        lines.append(
            f"  not counted above: import of the metatrail package, done by the Recorder: {ms('package_import_s')}"
        )
    return [
        *lines,
        f"  stop call: {ms('stop_s')}",
        f"  added memory (RSS after stop - before import): {med('rss_mb') or 0.0:.1f} MB",
        f"  meter CPU during the burn: {(med('meter_cpu_s') or 0.0) * 1000:.1f} ms = {cpu_pct:.2f} % of one core",
        f"  energy reported: {med('energy_j') or 0.0:.1f} J ({runs[0]['energy_kind']}; {runs[0]['cpu_reason']})",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecarbon-python", help="python of a venv with codecarbon installed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(HERE / "results" / "energy.txt"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METATRAIL_")}
    env["METATRAIL_ENERGY_INTERVAL"] = "1"
    # Both tools as installed: pip byte-compiles a wheel (CodeCarbon's venv has its .pyc files), while this
    # checkout is an editable install whose modules would be compiled from source at every start when
    # PYTHONDONTWRITEBYTECODE is set. Compile metatrail once here, then let its runs use the bytecode.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    import compileall

    import metatrail

    compileall.compile_dir(str(Path(metatrail.__file__).parent), quiet=1, force=False)
    tools = [("metatrail.energy", sys.executable, METATRAIL)]
    if args.codecarbon_python:
        tools.append(("CodeCarbon", args.codecarbon_python, CODECARBON))
    results: dict[str, list[dict[str, object]]] = {name: [] for name, _, _ in tools}
    for rep in range(args.reps):
        for name, python, code in tools:
            print(f"rep {rep + 1}/{args.reps}: {name} ...", flush=True)
            results[name].append(run_once(python, code, args.seconds, env))
    load = os.getloadavg()
    lines = [
        "# Energy meter overhead: metatrail.energy vs CodeCarbon",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {platform.platform()}; Python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        f"workload: {args.seconds:.0f} s single-thread busy loop in the main thread; each run a fresh interpreter; "
        "both tools sample at 1 Hz",
        "targets for metatrail: start <= 50 ms, added memory <= 15 MB, meter CPU <= 0.5 % of a core",
        "",
    ]
    for name, runs in results.items():
        lines += [*summarise(name, runs), ""]
    lines.append("raw runs (JSON):")
    lines += [f"  {name}: {json.dumps(r)}" for name, runs in results.items() for r in runs]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
