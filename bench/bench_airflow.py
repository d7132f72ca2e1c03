"""Airflow plugin overhead: ``airflow dags test`` of a DAG of N no-op TaskFlow tasks, with and without recording.

    .nox/airflow/bin/python bench/bench_airflow.py [--tasks 200] [--rounds 5] [--out bench/results/airflow.txt]

Every figure comes from this one run, so ratios compare like with like on a shared machine:

* wall clock of ``airflow dags test`` (process start to exit, Airflow start-up included), baseline and recorded runs
  interleaved (off, on, off, on, ...), median ratio reported (target <= 1.03);
* time spent in the plugin's hooks per task-instance try (``on_task_instance_running`` + ``_success``, the bounded
  flush that makes a try's events durable included), read from the listener's own ``timings`` in the recorded runs,
  p50/p99; and the same hooks' cost with ``METATRAIL_DISABLED=1`` (the baseline runs);
* CPU time of each thread of the ``dags test`` process (read from ``/proc/self/task`` at exit), per kind: what the
  plugin's own threads (hook, Recorder writer, energy sampler) cost, and how much Airflow's threads change; the rest
  of the CPU difference is the Recorder's writer process.

Baseline: the plugin is installed through its entry point and so is always loaded; the baseline runs set
``METATRAIL_DISABLED=1``, so each hook returns after one environment lookup (its cost is reported too). The bench
DAG reads the listener's timings through an ``atexit`` hook it registers (``MT_BENCH_TIMINGS``); nothing in the
plugin is changed for the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).parent / "airflow")

DAG_TEMPLATE = '''"""Bench DAG: {n} independent no-op TaskFlow tasks."""
import atexit, json, os
from datetime import datetime
from airflow.sdk import dag, task

def _thread_cpu():
    # CPU seconds of each thread still alive at exit, by Python thread name (threads that ended are not listed).
    import threading
    names = {{t.native_id: t.name for t in threading.enumerate()}}
    tick = os.sysconf("SC_CLK_TCK")
    out = {{}}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{{tid}}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out

def _dump_timings():
    path = os.environ.get("MT_BENCH_TIMINGS")
    if not path:
        return
    try:
        with open(path + ".threads", "w") as fh:
            json.dump(_thread_cpu(), fh)
    except Exception:
        pass
    try:
        from metatrail.plugins.airflow.plugin import LISTENER
        timings = list(LISTENER.timings)
    except Exception as exc:
        timings = [["error", repr(exc)]]
    with open(path, "w") as fh:
        json.dump(timings, fh)

atexit.register(_dump_timings)

if os.environ.get("MT_BENCH_TASK_RUNNER_FLUSH") == "1":
    # Make this one process behave like a task runner: each try's end hook waits until its events are stored.
    from airflow.sdk.execution_time.task_runner import TaskRunnerMarker
    from metatrail.plugins.airflow.plugin import LISTENER
    LISTENER.on_starting(TaskRunnerMarker())

@dag(dag_id="bench_noop", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def bench_noop():
    @task
    def noop(i: int) -> None:
        return None

    for i in range({n}):
        noop.override(task_id=f"t{{i:04d}}")(i)

bench_noop()
'''


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _per_try(timings: list[list[Any]]) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds in our hooks per task-instance try (running + its end hook), and per hook name."""
    per_hook: dict[str, list[float]] = {}
    per_try: list[float] = []
    pending: float | None = None
    for name, seconds in timings:
        per_hook.setdefault(name, []).append(seconds)
        if name == "on_task_instance_running":
            pending = seconds
        elif name.startswith("on_task_instance_") and pending is not None:
            per_try.append(pending + seconds)
            pending = None
    return per_try, per_hook


KINDS = ("baseline", "recorded", "recorded+flush")


def _thread_group(name: str) -> str:
    # "Thread-193 (_handle_socket_comms)": one of many short-lived threads of the same function.
    match = re.fullmatch(r"Thread-\d+ \((.*)\)", name)
    return match.group(1) if match else name


def _thread_rows(runs: dict[str, list[dict[str, Any]]], tasks: int) -> list[str]:
    """Per thread (grouped by name), the median CPU seconds per kind, and the recorded kinds' difference per task:
    where the plugin's CPU goes (its own threads, or Airflow's threads made slower)."""
    per_kind: dict[str, dict[str, list[float]]] = {}
    for kind in KINDS:
        for r in runs[kind]:
            grouped: dict[str, float] = {}
            for name, seconds in r.get("threads", {}).items():
                grouped[_thread_group(name)] = grouped.get(_thread_group(name), 0.0) + seconds
            for name, seconds in grouped.items():
                per_kind.setdefault(name, {}).setdefault(kind, []).append(seconds)
    rows = []
    for name in sorted(per_kind, key=lambda n: -max(statistics.median(v) for v in per_kind[n].values())):
        medians = {kind: statistics.median(per_kind[name][kind]) if per_kind[name].get(kind) else 0.0
                   for kind in KINDS}
        deltas = ", ".join(f"{(medians[kind] - medians['baseline']) / tasks * 1000:+.2f}" for kind in KINDS[1:])
        rows.append(f"  {name[:40]:<40}" + "".join(f"{medians[kind]:16.2f}" for kind in KINDS) + f"   {deltas}")
    return rows


def _run(home: Path, dag_file: Path, day: int, kind: str, work: Path) -> dict[str, Any]:
    timings = work / f"timings-{day}.json"
    store = work / f"store-{day}" / "metatrail.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    # METATRAIL_WRITER passes through, to compare where events are built (thread or writer process).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "METATRAIL_")) or k == "METATRAIL_WRITER"}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent), "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
                "METATRAIL_STORE": f"sqlite:///{store}", "METATRAIL_HASH_CACHE": str(store.parent / "hc.db"),
                "MT_BENCH_TIMINGS": str(timings)})
    recorded = kind != "baseline"
    if not recorded:
        env["METATRAIL_DISABLED"] = "1"
    if kind == "recorded+flush":
        env["MT_BENCH_TASK_RUNNER_FLUSH"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([AIRFLOW, "dags", "test", "bench_noop", f"2024-01-{day:02d}T00:00:00+00:00", "-f",
                           str(dag_file)], env=env, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the dags test process and the writer process it waited for
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"airflow dags test failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    events = 0
    if recorded:
        from metatrail.store import open_store

        with open_store(f"sqlite:///{store}") as s:
            events = s.stats()["events"]
    threads = Path(f"{timings}.threads")
    return {"wall": wall, "cpu": cpu, "timings": json.loads(timings.read_text()) if timings.exists() else [],
            "threads": json.loads(threads.read_text()) if threads.exists() else {},
            "events": events, "load": os.getloadavg()[0]}


def _uncontended() -> list[tuple[str, float]]:
    """Microseconds per call of the hook body's parts, in this process with nothing else running: what the hooks
    cost without the GIL contention of a real Airflow process (its threads and the Recorder's writer thread)."""
    import datetime as dt

    from airflow.sdk import dag, task

    from metatrail.boundedcall import BoundedCaller
    from metatrail.model import PipelineRun
    from metatrail.plugins.airflow import adapter, compat
    from metatrail.recorder import Recorder

    @dag(dag_id="bench_parts", schedule=None, start_date=dt.datetime(2024, 1, 1))
    def parts() -> None:
        @task
        def noop(i: int) -> None:
            return None

        noop.override(task_id="t0")(1)

    operator = parts().task_dict["t0"]
    redact = compat.redactor()
    collector = compat.hook_lineage_collector()
    guard = BoundedCaller()
    with tempfile.TemporaryDirectory(prefix="bench-airflow-parts-") as tmp:
        os.environ["METATRAIL_STORE"] = f"sqlite:///{tmp}/metatrail.db"
        os.environ["METATRAIL_HASH_CACHE"] = f"{tmp}/hc.db"
        recorder = Recorder()
        run = PipelineRun(id="0190a2a6-5c00-7000-8000-000000000001", pipeline="p", namespace="airflow",
                          integration="AIRFLOW")

        def recorder_pair() -> None:
            execution = recorder.execution_started("p", "s", pipeline_run=run, params={"a": 1}, integration="AIRFLOW",
                                                   pid=os.getpid())
            recorder.execution_finished(execution)

        cases = [
            ("parameters (task_params, Airflow's masker)",
             lambda: adapter.task_params(operator, params={"a": 1}, conf={"b": 2}, redact=redact), 2000),
            ("datasets (inlets, argument paths, lineage marks)",
             lambda: (adapter.declared_artifacts(operator.inlets),
                      adapter.local_paths(adapter.call_arguments(operator)), adapter.lineage_marks(collector)), 2000),
            ("time-cap handoff to the hook thread (empty body)", lambda: guard.call("x", lambda: None, 5.0), 2000),
            ("Recorder execution_started + _finished (energy on)", recorder_pair, 300),
        ]
        out = []
        for label, fn, n in cases:
            fn()
            started = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((label, (time.perf_counter() - started) / n * 1e6))
        recorder.close(60)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each kind, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "airflow.txt")
    args = parser.parse_args()
    from machine import use_bytecode

    bytecode = use_bytecode()

    from airflow import __version__ as airflow_version

    from metatrail import __version__ as metatrail_version

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-airflow-") as tmp:
        work = Path(tmp)
        home = work / "home"
        dags = work / "dags"
        dags.mkdir(parents=True)
        dag_file = dags / "bench_noop.py"
        dag_file.write_text(DAG_TEMPLATE.format(n=args.tasks))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "METATRAIL_"))}
        env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
        subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, check=True, timeout=900)
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        day = 0
        for round_ in range(args.rounds):
            # Rotate the order each round: on a shared machine the load drifts, and a fixed order would bias one kind.
            for kind in KINDS[round_ % len(KINDS):] + KINDS[:round_ % len(KINDS)]:
                day += 1
                result = _run(home, dag_file, day, kind, work)
                runs[kind].append(result)
                print(f"  {kind} run {len(runs[kind])}: {result['wall']:.1f} s (load {result['load']:.2f})",
                      file=sys.stderr)

    walls = {kind: [r["wall"] for r in runs[kind]] for kind in KINDS}
    cpus = {kind: [r["cpu"] for r in runs[kind]] for kind in KINDS}
    ratios = {kind: statistics.median(walls[kind]) / statistics.median(walls["baseline"]) for kind in KINDS[1:]}
    # Each round runs every kind back to back, so a ratio within a round sees the same machine load on both sides;
    # the median of those ratios is less exposed to load drifting between rounds than the ratio of medians.
    paired = {kind: statistics.median(w / b for w, b in zip(walls[kind], walls["baseline"], strict=True))
              for kind in KINDS[1:]}
    cpu_ratios = {kind: statistics.median(cpus[kind]) / statistics.median(cpus["baseline"]) for kind in KINDS[1:]}
    thread_rows = _thread_rows(runs, args.tasks)
    per_try: dict[str, list[float]] = {}
    hooks_by_kind: dict[str, dict[str, list[float]]] = {}
    for kind in KINDS:
        per_try[kind], hooks_by_kind[kind] = [], {}
        for r in runs[kind]:
            tries, hooks = _per_try(r["timings"])
            per_try[kind] += tries
            for k, v in hooks.items():
                hooks_by_kind[kind].setdefault(k, []).extend(v)

    def row(label: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values] or [float("nan")]
        return (f"  {label:<46} {_percentile(ms, 0.5):9.3f} {_percentile(ms, 0.9):9.3f} {_percentile(ms, 0.99):9.3f} "
                f"{max(ms):9.3f} {statistics.fmean(ms):9.3f} {len(values):7d}")

    lines = [
        f"metatrail Airflow plugin benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        "",
        f"machine       {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, shared VM",
        f"load average  {load_start[0]:.2f}, {load_start[1]:.2f}, {load_start[2]:.2f} (1, 5, 15 min) at start; "
        f"{os.getloadavg()[0]:.2f} at end",
        f"versions      apache-airflow {airflow_version}, metatrail {metatrail_version}, "
        f"CPython {platform.python_version()}",
        f"bytecode      {bytecode}",
        f"workload      airflow dags test of {args.tasks} independent no-op TaskFlow tasks (one process), "
        f"{args.rounds} runs of each kind, interleaved, order rotated per round",
        "kinds         baseline: METATRAIL_DISABLED=1 (plugin loaded, every hook returns at once)",
        "              recorded: the plugin as installed; under `dags test` a try's end hook does not wait for the",
        "                store (the process flushes at exit)",
        "              recorded+flush: as a task runner does, each try's end hook waits (bounded) until its",
        "                START and COMPLETE are committed to SQLite",
        "",
        "(a) wall clock of `airflow dags test` (s), start-up included",
        *[f"  {kind:<16} " + ", ".join(f"{w:.1f}" for w in walls[kind])
          + (f"   median ratio to baseline {ratios[kind]:.3f}" if kind in ratios else "") for kind in KINDS],
        *[f"  {kind:<16} median of per-round ratios {paired[kind]:.3f}; ratio of fastest runs "
          f"{min(walls[kind]) / min(walls['baseline']):.3f}" for kind in KINDS[1:]],
        "  CPU time (s, user+sys of `airflow dags test` and the processes it waited for)",
        *[f"  {kind:<16} " + ", ".join(f"{c:.1f}" for c in cpus[kind])
          + (f"   median ratio {cpu_ratios[kind]:.3f}, "
             f"{(statistics.median(cpus[kind]) - statistics.median(cpus['baseline'])) / args.tasks * 1000:+.2f} ms "
             "per task against the baseline" if kind in cpu_ratios else "") for kind in KINDS],
        "  target: wall-clock ratio of medians <= 1.03: "
        + ", ".join(f"{kind} {'MET' if ratios[kind] <= 1.03 else 'MISSED'}" for kind in KINDS[1:]),
        "  loads during runs: "
        + ", ".join(f"{r['load']:.1f}" for kind in KINDS for r in runs[kind]),
        "  events stored per recorded run: "
        + ", ".join(str(r["events"]) for kind in KINDS[1:] for r in runs[kind]) + f" (expected {2 * args.tasks + 2})",
        "",
        "  CPU time by thread of the `airflow dags test` process (s, median of runs; threads alive at exit)",
        f"  {'thread':<40}" + "".join(f"{kind:>16}" for kind in KINDS) + "   ms per task against the baseline",
        *thread_rows,
        "",
        "(b) time in the plugin's hooks (ms)                  p50       p90       p99       max      mean       n",
    ]
    for kind in KINDS:
        lines.append(row(f"per task try, {kind} (running+end)", per_try[kind]))
        if kind != "baseline":
            lines += [row(f"  {name}", hooks_by_kind[kind][name]) for name in sorted(hooks_by_kind[kind])]
    lines += ["", "(c) the same parts without contention (this process, µs per call)"]
    lines += [f"  {label:<52} {us:9.1f}" for label, us in _uncontended()]
    lines += [
        "",
        "The running hook hands the START to the Recorder's writer (its thread; after 32 events, its writer process)",
        "and starts the energy meter; the end hook hands over the COMPLETE (outputs are hashed by the writer).",
        "get_template_context() is never called. Wall-clock",
        "differences below ~30 % are within the noise of this shared machine; the in-hook times are the robust figure.",
        "In a real run the hooks cost more than (c) adds up to: the hook thread and the Recorder's writer thread wait",
        "for the GIL behind Airflow's threads and each other (switch interval 5 ms), which the p90/p99 show.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
