"""Overhead of the Prefect plugin: flows of no-op tasks with and without it, sequential calls and ``.submit()``.

    python bench/bench_prefect.py                 # 500 tasks per flow, 5 runs per variant
    python bench/bench_prefect.py --tasks 200 --reps 3

Run it with the Prefect environment's Python (``.nox/prefect/bin/python``, where ``metatrail[prefect]`` is
installed). It starts a private Prefect API server on 127.0.0.1 (analytics off, no UI, no services), then runs each
flow in a fresh interpreter, as a user would: *baseline* with ``PREFECT_PLUGINS_ENABLED=0``, *plugin* with
``PREFECT_PLUGINS_ENABLED=1`` (recording into a fresh SQLite store per run). Baseline and plugin runs alternate, so
both see the same machine load. Each interpreter runs a 20-task warm-up flow first, then the timed flow.

Reported per mode: median wall-clock time of each variant from calling the flow to the end of its body, and their
ratio (target <= 1.03; the whole call is reported too: Prefect's teardown rounds it up to a whole second), and the
time the task threads spent in metatrail's code per task run, elapsed and in thread CPU time (p50/p99: observer
creation, the Running and Completed state handlers and the span end, which include the Recorder calls; the Recorder's
writer, which builds and stores events in the background, is not in these figures but is in the wall-clock ratio).
Writes the report to ``bench/results/prefect.txt`` (``--out`` to change). Exit status 1 when the wall-clock target is
missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "prefect.txt"
RATIO_TARGET = 1.03
WARMUP_TASKS = 20
MODES = ("sequential", "submit")
# variant -> extra environment; "plugin" is the default configuration, "no-energy" the same with energy metering off
VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {"PREFECT_PLUGINS_ENABLED": "0"},
    "plugin": {"PREFECT_PLUGINS_ENABLED": "1"},
    "no-energy": {"PREFECT_PLUGINS_ENABLED": "1", "METATRAIL_ENERGY": "0"},
}


# -- the child: one interpreter, one timed flow ------------------------------------------------------------------


def child(mode: str, count: int) -> None:
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    hook_times: dict[str, float] = {}
    hook_cpu: dict[str, float] = {}
    plugin = os.environ.get("PREFECT_PLUGINS_ENABLED") == "1"
    if plugin:
        _time_hooks(hook_times, hook_cpu)

    @task
    def noop(i: int) -> int:
        return i

    body_end: list[float] = []
    body_cpu: list[float] = []
    body_children: list[float] = []

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
    def noops(n: int) -> int:
        if mode == "submit":
            futures = [noop.submit(i) for i in range(n)]
            total = sum(f.result() for f in futures)
        else:
            total = sum(noop(i) for i in range(n))
        body_end.append(time.perf_counter())
        body_cpu.append(time.process_time())
        body_children.append(_children_cpu())
        return total

    noops(WARMUP_TASKS)
    warmup_flush_s = None
    if plugin:
        # The writer's first batch imports the event and store libraries (once per process): keep that out of the
        # timed flow, and report it.
        from metatrail import get_recorder

        start = time.perf_counter()
        get_recorder().flush(120)
        warmup_flush_s = time.perf_counter() - start
    hook_times.clear()
    hook_cpu.clear()
    cpu_start, children_start = time.process_time(), _children_cpu()
    start = time.perf_counter()
    total = noops(count)
    call = time.perf_counter() - start
    # From the call to the end of the flow's body: the flow's set-up, every task run and its state changes. What
    # follows is the flow's teardown, where Prefect joins its heartbeat thread, which sleeps in whole seconds: the
    # call's time is rounded up to the heartbeat's next tick, whatever the tasks cost.
    wall = body_end[-1] - start
    assert total == count * (count - 1) // 2
    flush_s = written = None
    if plugin:
        from metatrail import get_recorder

        recorder = get_recorder()
        start = time.perf_counter()
        recorder.flush(120)
        flush_s = time.perf_counter() - start
        written = recorder.written
    print(json.dumps({"wall": wall, "call": call, "cpu": body_cpu[-1] - cpu_start,
                      "children_cpu": body_children[-1] - children_start,
                      "hook_ms": sorted(v * 1000 for v in hook_times.values()),
                      "hook_cpu_ms": sorted(v * 1000 for v in hook_cpu.values()),
                      "flush_s": flush_s, "warmup_flush_s": warmup_flush_s, "written": written}))


def _children_cpu() -> float:
    """CPU seconds of this process's live children (the Recorder's writer process, once started)."""
    return _tree_cpu(os.getpid(), with_root=False)


def _tree_cpu(pid: int, *, with_root: bool = True) -> float:
    """CPU seconds of a process's live descendants, and of the process itself with ``with_root``."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*([root] if with_root else []), *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _time_hooks(totals: dict[str, float], cpu_totals: dict[str, float]) -> None:
    """Accumulate, per task run, the time the calling thread spends in metatrail's observer code: elapsed time in
    ``totals``, the thread's CPU time in ``cpu_totals`` (on a loaded machine the elapsed time also counts the time
    the thread waited for a CPU or the GIL)."""
    from metatrail.plugins.prefect import tracing
    from metatrail.plugins.prefect.observer import TaskObserver

    guard = tracing._guard

    def timed_guard(what: str, fn: Any, *args: Any) -> Any:
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            return guard(what, fn, *args)
        finally:
            cpu = time.thread_time() - cpu_start
            elapsed = time.perf_counter() - start
            if what == "start":
                attributes = args[0]
                key = attributes.get("prefect.run.id") if attributes.get("prefect.run.type") == "task" else None
            else:
                owner = getattr(fn, "__self__", None)
                key = owner.run_id if isinstance(owner, TaskObserver) else None
            if key is not None:
                totals[key] = totals.get(key, 0.0) + elapsed
                cpu_totals[key] = cpu_totals.get(key, 0.0) + cpu

    tracing._guard = timed_guard


# -- the parent: server, alternating runs, report ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _versions() -> str:
    from importlib.metadata import version

    names = ("metatrail", "prefect", "opentelemetry-api", "SQLAlchemy")
    return ", ".join(f"{n} {version(n)}" for n in names) + f", Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--server-timeout", type=float, default=300)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from machine import use_bytecode

    bytecode = use_bytecode()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0

    home = Path(tempfile.mkdtemp(prefix="metatrail-bench-prefect-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_ENABLED": "false", "PREFECT_LOGGING_TO_API_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    env.pop("METATRAIL_DISABLED", None)
    load_start = os.getloadavg()
    log = (home / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-services", "--no-ui", "--analytics-off"],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        deadline = time.monotonic() + args.server_timeout
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"Prefect server did not start (see {home / 'server.log'})")
            time.sleep(0.5)
        for rep in range(args.reps):
            for mode in MODES:
                order = list(VARIANTS)
                for variant in order[rep % len(order):] + order[: rep % len(order)]:  # rotate: same load for all
                    store = home / f"store-{mode}-{variant}-{rep}" / "metatrail.db"
                    run_env = {**env, **VARIANTS[variant], "METATRAIL_STORE": f"sqlite:///{store}"}
                    server_cpu = _tree_cpu(server.pid)
                    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(args.tasks)],
                                          capture_output=True, text=True, env=run_env, timeout=900)
                    server_cpu = _tree_cpu(server.pid) - server_cpu
                    if proc.returncode != 0:
                        sys.exit(f"{variant} {mode} run failed:\n{proc.stderr[-4000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    result["server_cpu"] = server_cpu
                    runs.setdefault((mode, variant), []).append(result)
                    print(f"rep {rep + 1}/{args.reps} {mode:10s} {variant:9s} {result['wall']:.3f} s", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()
        subprocess.run(["rm", "-rf", str(home)], check=False)

    lines = [
        f"Prefect plugin overhead: {args.tasks} no-op tasks per flow, {args.reps} runs per variant, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        "",
        f"machine       {platform.platform()}, {os.cpu_count()} logical CPUs (a shared VM: other work ran on it)",
        f"load average  {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end (1, 5, 15 min)",
        f"versions      {_versions()}",
        f"bytecode      {bytecode}",
        "server        prefect server start --no-services --no-ui (SQLite), on 127.0.0.1",
        "flows         sequential: noop(i) called N times in the flow; submit: noop.submit(i) N times on a",
        "              ThreadPoolTaskRunner(max_workers=4), then every result()",
        "",
        f"{'mode':11s} {'variant':10s} {'wall s':>8s} {'ratio':>6s} {'per task':>9s} {'in-hook p50':>12s} "
        f"{'in-hook p99':>12s} {'flush after':>12s} {'call s':>8s} {'ratio':>6s} {'hook CPU p50':>13s} "
        f"{'hook CPU p99':>13s}",
    ]
    missed = False
    for mode in MODES:
        base = statistics.median(r["wall"] for r in runs[(mode, "baseline")])
        base_call = statistics.median(r["call"] for r in runs[(mode, "baseline")])
        lines.append(f"{mode:11s} {'baseline':10s} {base:8.3f} {'':6s} {'':9s} {'':12s} {'':12s} {'':12s} "
                     f"{base_call:8.3f}")
        for variant in ("plugin", "no-energy"):
            results = runs[(mode, variant)]
            wall = statistics.median(r["wall"] for r in results)
            hooks = [ms for r in results for ms in r["hook_ms"]]
            hooks_cpu = [ms for r in results for ms in r["hook_cpu_ms"]]
            flush = statistics.median(r["flush_s"] for r in results)
            ratio = wall / base
            if variant == "plugin":
                missed |= ratio > RATIO_TARGET
            call = statistics.median(r["call"] for r in results)
            lines.append(f"{'':11s} {variant:10s} {wall:8.3f} {ratio:6.3f} {(wall - base) / args.tasks * 1000:7.2f}ms "
                         f"{_percentile(hooks, 0.5):10.3f}ms {_percentile(hooks, 0.99):10.3f}ms {flush:10.3f} s "
                         f"{call:8.3f} {call / base_call:6.3f} {_percentile(hooks_cpu, 0.5):11.3f}ms "
                         f"{_percentile(hooks_cpu, 0.99):11.3f}ms")
    warmups = [r["warmup_flush_s"] for (_, v), rs in runs.items() if v != "baseline" for r in rs]
    lines += [
        "",
        f"target: plugin/baseline wall-clock <= {RATIO_TARGET} -> {'MISSED' if missed else 'met'}",
        "wall = from calling the flow to the end of its body (every task run and state change included);",
        "ratio = median variant wall / median baseline wall; per task = (variant - baseline) / N;",
        "call = the whole flow call, as the caller sees it: it adds the flow's teardown, where Prefect (3.9) joins",
        "  its run-heartbeat thread, which sleeps in 1 s steps, so call times come in whole-second steps and their",
        "  ratio says which side of a tick each variant ended on rather than what the tasks cost;",
        "in-hook = time the task's own thread spent in metatrail per task run (all state events of the run);",
        "hook CPU = the same span in the thread's CPU time (time.thread_time): what the elapsed in-hook time",
        "  counts besides, on a loaded machine, is waiting for a CPU or for the GIL;",
        "flush after = time after the flow returned until the writer had stored every event (not in the ratio);",
        "plugin = default settings (energy metering on); no-energy = METATRAIL_ENERGY=0.",
        f"first-use cost, kept out of the timed flow: the writer's first flush after the {WARMUP_TASKS}-task warm-up "
        f"took {statistics.median(warmups):.2f} s (median; imports of the event and store libraries).",
        "",
        "CPU per task run (ms; medians over runs): flow = the flow process during the timed flow (task threads,",
        "  engine, metatrail's hooks and writer thread); writer = the Recorder's writer process over the same span;",
        "  server = the Prefect API server over the whole run of that interpreter (warm-up included), per task run",
    ]
    for mode in MODES:
        for variant in VARIANTS:
            results = runs[(mode, variant)]
            per, server_per = 1000 / args.tasks, 1000 / (args.tasks + WARMUP_TASKS)
            lines.append(
                f"  {mode:10s} {variant:9s} flow {statistics.median(r['cpu'] for r in results) * per:6.3f}  "
                f"writer {statistics.median(r['children_cpu'] for r in results) * per:6.3f}  "
                f"server {statistics.median(r['server_cpu'] for r in results) * server_per:6.3f}")
    lines += [
        "",
        "raw flow wall-clock times (s), in run order:",
    ]
    for (mode, variant), results in sorted(runs.items()):
        walls = ", ".join(f"{r['wall']:.3f} (call {r['call']:.3f})" for r in results)
        written = {r["written"] for r in results if r["written"] is not None}
        lines.append(f"  {mode:10s} {variant:9s} {walls}" + (f"   (events stored per run: {sorted(written)})"
                                                               if written else ""))
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
