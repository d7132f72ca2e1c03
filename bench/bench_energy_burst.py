"""Energy-sampler cost in a burst of short tasks: no monitor, the sampler with a fixed 20 ms gap, and the default
(a gap that widens in bursts, see ``metatrail.energy.monitor``).

    python bench/bench_energy_burst.py            # 500 tasks per run, 5 runs per variant
    python bench/bench_energy_burst.py --tasks 200 --reps 3

Workloads, each in the host's own process as Prefect, Parsl's ThreadPoolExecutor and ``airflow dags test`` run
tasks: *sequential*, one task after another, each spinning until its thread has used 3 ms of CPU (so the time the
sampler holds the GIL makes tasks longer, as it does a host's); *threads*, the same tasks on 4 threads at once.
Each run is a fresh interpreter; variants alternate, so they see the same machine.

Reported per variant (medians over runs): wall-clock time per task above the task's own 3 ms and the ratio of the
run's wall time to the no-monitor run's; the CPU time of every thread but the tasks' own per task (the sampler);
samples taken; and the share of tasks whose report carries their CPU time. *fixed-20ms* is the sampler as it was
before the gap adapted (its ceiling pinned to the floor).

A second table splits the monitor's CPU per task by thread, for 1,000 short tasks (0.2 ms of CPU each) with the
default monitor (the meters ``get_monitor()`` gives): *calls*, ``task_started`` + ``task_stopped`` on the tasks'
threads; *sampler*, the sampler thread; *report*, ``task_report`` on a writer thread of its own that, as the
Recorder's, wakes now and then (every 50 ms here) and reports what stopped meanwhile; all CPU time
(``time.thread_time()``, and the sampler's thread clock), medians over runs. Workloads: sequential and 2 threads,
each back to back and with 1 ms idle after each task (a host such as Parsl's thread pool, whose tasks end before
the next is launched, leaves the monitor idle between tasks). ``--cpu-only`` runs only this table; run with
``PYTHONPATH`` pointing at another copy of ``metatrail`` to compare versions. Writes
``bench/results/energy_burst.txt``.
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
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "energy_burst.txt"
VARIANTS = ("no-monitor", "fixed-20ms", "adaptive")
WORKLOADS = ("sequential", "threads")
TASK_S = 0.003

CHILD = r"""
import json, os, sys, threading, time
variant, workload, n, task_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
import metatrail.energy.monitor as monitor_module
from metatrail.energy.estimate import CpuEstimateMeter
if variant == "fixed-20ms":
    monitor_module.MAX_BURST_GAP_S = monitor_module.MIN_SAMPLE_GAP_S
mon = None if variant == "no-monitor" else monitor_module.EnergyMonitor(meters=[CpuEstimateMeter()])
task_cpu = {}  # thread id -> CPU seconds spent in the tasks' own code (spin + monitor calls)
stopped, lock = [], threading.Lock()

def spin(seconds):  # CPU time of this thread, so that time the GIL spends elsewhere makes the task longer
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

def task(i):
    token = mon.task_started(f"t{i}", pid=os.getpid()) if mon else None
    spin(task_s)
    if mon:
        s = mon.task_stopped(token)
        with lock:
            stopped.append(s)

def worker(indices):
    c = time.thread_time()
    for i in indices:
        task(i)
    with lock:
        task_cpu[threading.get_ident()] = task_cpu.get(threading.get_ident(), 0.0) + time.thread_time() - c

for i in range(20):  # warm-up: the sampler's start and its imports are not what is measured here
    task(-1 - i)
time.sleep(0.3)
if mon:
    [mon.task_report(s) for s in stopped]
    stopped.clear()
seq0 = mon._seq if mon else 0
cpu0 = time.process_time()
t0 = time.perf_counter()
if workload == "sequential":
    worker(range(n))
else:
    threads = [threading.Thread(target=worker, args=(range(k, n, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
wall = time.perf_counter() - t0
cpu = time.process_time() - cpu0
samples = (mon._seq - seq0) if mon else 0
with_cpu = 0
if mon:
    reports = [mon.task_report(s) for s in stopped]
    with_cpu = sum(1 for r in reports if r is not None and r.get("task_cpu_s") not in (None, 0.0))
    mon.close()
print(json.dumps({"wall": wall, "other_cpu": cpu - sum(task_cpu.values()), "samples": samples, "with_cpu": with_cpu}))
"""


CPU_CHILD = r"""
import json, os, queue, sys, threading, time
n, n_threads, task_s, idle_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
from metatrail.energy.monitor import EnergyMonitor
mon = EnergyMonitor()
reports = queue.Queue()
report_cpu = [0.0]

def writer():  # the Recorder's writer thread: wakes every 50 ms and reports the tasks stopped meanwhile
    c = time.thread_time()
    while True:
        time.sleep(0.05)
        batch = []
        while not reports.empty():
            batch.append(reports.get())
        for s in batch:
            if s is None:
                report_cpu[0] = time.thread_time() - c
                return
            mon.task_report(s)

def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

calls = {}
def worker(indices, key):
    c = 0.0
    for i in indices:
        t0 = time.thread_time()
        token = mon.task_started(f"t{i}", pid=os.getpid())
        c += time.thread_time() - t0
        spin(task_s)
        t0 = time.thread_time()
        s = mon.task_stopped(token)
        c += time.thread_time() - t0
        reports.put(s)
        if idle_s:
            time.sleep(idle_s)
    calls[key] = c

writing = threading.Thread(target=writer)
writing.start()
worker(range(20), "warm-up")  # the sampler's start, the meters' probing and the imports are not measured
time.sleep(1.5)  # past the sampler's linger: the run starts from an idle monitor
sampler = mon._thread
clock = time.pthread_getcpuclockid(sampler.ident)
s0, seq0 = time.clock_gettime(clock), mon._seq
if n_threads == 1:
    worker(range(n), 0)
else:
    threads = [threading.Thread(target=worker, args=(range(k, n, n_threads), k)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
reports.put(None)
writing.join()
sampler_cpu = time.clock_gettime(clock) - s0
print(json.dumps({"calls": sum(v for k, v in calls.items() if k != "warm-up"), "sampler": sampler_cpu,
                  "report": report_cpu[0], "samples": mon._seq - seq0}))
mon.close()
"""
CPU_WORKLOADS = (("sequential", 1, 0.0), ("2 threads", 2, 0.0), ("sequential, 1 ms idle", 1, 0.001),
                 ("2 threads, 1 ms idle", 2, 0.001))
CPU_TASK_S = 0.0002


def run_cpu_child(n_threads: int, idle_s: float, tasks: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run([sys.executable, "-c", CPU_CHILD, str(tasks), str(n_threads), str(CPU_TASK_S), str(idle_s)],
                         capture_output=True, text=True, check=True, env=env, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def cpu_table(tasks: int, reps: int, say: Callable[[str], None]) -> None:
    """The per-thread CPU table (see the module docstring)."""
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(reps):
        for name, n_threads, idle_s in CPU_WORKLOADS:
            runs.setdefault(name, []).append(run_cpu_child(n_threads, idle_s, tasks))
    say(f"monitor CPU per task by thread: {tasks} tasks of {CPU_TASK_S * 1e3:.1f} ms CPU, {reps} runs, medians; the "
        "meters get_monitor() gives here")
    say(f"{'workload':<24} {'calls':>8} {'sampler':>8} {'report':>8} {'total':>8} {'samples':>8}")
    for name, *_ in CPU_WORKLOADS:
        r = runs[name]

        def med(key: str, r: list[dict[str, float]] = r) -> float:
            return statistics.median(x[key] for x in r) / tasks * 1e6

        total = statistics.median(sum(x[k] for k in ("calls", "sampler", "report")) for x in r) / tasks * 1e6
        say(f"{name:<24} {med('calls'):>5.1f} us {med('sampler'):>5.1f} us {med('report'):>5.1f} us "
            f"{total:>5.1f} us {statistics.median(x['samples'] for x in r):>8.0f}")
    say("  raw (calls/sampler/report us per task, samples): " + "; ".join(
        f"{name}: " + ", ".join(f"{x['calls'] / tasks * 1e6:.1f}/{x['sampler'] / tasks * 1e6:.1f}/"
                                f"{x['report'] / tasks * 1e6:.1f}/{x['samples']:.0f}" for x in r)
        for name, r in runs.items()))


def run_child(variant: str, workload: str, tasks: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run([sys.executable, "-c", CHILD, variant, workload, str(tasks), str(TASK_S)],
                         capture_output=True, text=True, check=True, env=env, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cpu-tasks", type=int, default=1000)
    parser.add_argument("--cpu-only", action="store_true", help="only the per-thread CPU table")
    args = parser.parse_args()
    import metatrail

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    say(f"Energy sampler in a burst of short tasks: {args.tasks} tasks of {TASK_S * 1e3:.0f} ms CPU per run, "
        f"{args.reps} runs per variant, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say()
    say(f"machine       {platform.platform()}, {os.cpu_count()} logical CPUs (a shared VM: other work may run on it)")
    say(f"load average  {load} at start")
    say(f"versions      metatrail {metatrail.__version__}, Python {platform.python_version()}")
    say("meters        the CPU estimate only (what a VM or CI machine has); a RAPL or NVML read adds to each sample")
    say(f"metatrail     {Path(metatrail.__file__).parent}")
    say()
    if args.cpu_only:
        cpu_table(args.cpu_tasks, args.reps, say)
        args.out.write_text("\n".join(lines) + "\n")
        return 0
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for workload in WORKLOADS:
        for _ in range(args.reps):
            for variant in VARIANTS:
                results.setdefault((workload, variant), []).append(run_child(variant, workload, args.tasks))
    say(f"{'workload':<11} {'variant':<11} {'wall s':>7} {'ratio':>6} {'wall/task over 3 ms':>20} "
        f"{'sampler CPU/task':>17} {'samples':>8} {'tasks with CPU time':>20}")
    for workload in WORKLOADS:
        base = statistics.median(r["wall"] for r in results[(workload, "no-monitor")])
        for variant in VARIANTS:
            runs = results[(workload, variant)]
            wall = statistics.median(r["wall"] for r in runs)
            per_task_wall = (wall - base) / args.tasks * 1e6
            other = statistics.median(r["other_cpu"] for r in runs) / args.tasks * 1e6
            samples = statistics.median(r["samples"] for r in runs)
            with_cpu = statistics.median(r["with_cpu"] for r in runs)
            monitored = variant != "no-monitor"
            say(f"{workload:<11} {variant:<11} {wall:>7.3f} {wall / base:>6.3f} "
                f"{(f'{per_task_wall:+.0f} us' if monitored else ''):>20} {f'{other:.0f} us':>17} "
                f"{(f'{samples:.0f}' if monitored else ''):>8} "
                f"{(f'{with_cpu / args.tasks:.0%}' if monitored else ''):>20}")
    say()
    say("ratio = median wall / median no-monitor wall (same workload, same run of this script);")
    say("sampler CPU/task = CPU time of the process minus its task threads' own, per task (for no-monitor: what")
    say("  the interpreter itself spends beside the tasks); tasks with CPU time = reports whose task_cpu_s is read")
    say("  and not 0 (concurrent tasks in one process that no sample told apart have none: their reports say so).")
    say()
    say("raw runs (wall s / sampler CPU s / samples), in run order:")
    for (workload, variant), runs in results.items():
        say(f"  {workload:<11} {variant:<11} " + ", ".join(
            f"{r['wall']:.3f}/{r['other_cpu']:.3f}/{r['samples']:.0f}" for r in runs))
    say()
    cpu_table(args.cpu_tasks, args.reps, say)
    say(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
