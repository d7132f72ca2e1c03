"""Parsl plugin overhead: 1,000 no-op apps with and without ``metatrail.plugins.parsl.track``, ThreadPool and HTEX.

    .nox/parsl/bin/python bench/bench_parsl.py [--tasks 1000] [--reps 3] [--out bench/results/parsl.txt]

Every figure comes from this one run, so ratios compare like with like on a shared machine:

* wall clock from the first submit to the last result (the DFK and its workers already up; 50 warm-up tasks run
  first and, in tracked runs, their records are waited for, so one-time costs are not in it: each process's first
  write imports the store (SQLAlchemy), and the DFK's writer process starts once it has recorded 32 events; the
  time that wait took is reported), baseline and tracked runs interleaved, median ratio reported;
* CPU seconds used by every process of the run (the DFK, HTEX's interchange, manager and workers, any writer process)
  over the same window, extended in tracked runs until the tasks' records are stored (work deferred past the last
  result is counted; the bench's own polling is not): on a shared machine this is the steadier figure, and with the
  2 cores saturated by no-op tasks extra CPU is what becomes extra wall clock;
* time spent in our code on the DFK side per task (``check_memo``'s recording, the ``submit`` wrapper, the final
  hook), measured inside the tracked runs, as wall time and as the thread's CPU time (``time.thread_time``: on a
  shared machine wall time also counts waits for the GIL and for a core);
* time the worker-side wrapper adds around one task (start + end recording), measured in-process with the real
  recorder and store, as wall time and as thread CPU time, with the share of the thread CPU spent inside
  ``Recorder.execution_started``/``execution_finished`` (the rest is the plugin's own);
* the cost of the ``.pth`` hook line when ``METATRAIL_PARSL`` is unset (what every Python start-up pays).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections import defaultdict
from pathlib import Path
from typing import Any

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
from parsl.providers import LocalProvider

WARMUP_TASKS = 50


@python_app
def noop():
    return None


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class HookTimer:
    """Times the plugin's DFK-side hooks per task (bench-only instrumentation of the real classes)."""

    def __init__(self) -> None:
        self.per_task: dict[int, float] = defaultdict(float)  # this run's tasks (task ids restart per DFK)
        self.samples: list[float] = []  # per-task totals of every tracked run so far
        self.cpu_per_task: dict[int, float] = defaultdict(float)  # the same, as the hook threads' CPU time
        self.cpu_samples: list[float] = []
        self.warm_waits: list[float] = []  # seconds until the warm-up tasks' records were stored, per tracked run
        self.stored_after: list[float] = []  # seconds from the last result until every record was stored
        self._current = threading.local()

    def end_run(self) -> None:
        """Move this run's per-task totals into ``samples`` (the warm-up task excluded)."""
        self.samples.extend(v for k, v in self.per_task.items() if k > 0)
        self.per_task.clear()
        self.cpu_samples.extend(v for k, v in self.cpu_per_task.items() if k > 0)
        self.cpu_per_task.clear()

    def install(self) -> None:
        from metatrail.plugins.parsl.memoizer import TrackingMemoizer

        timer = self
        on_launch, on_final = TrackingMemoizer._on_launch, TrackingMemoizer._on_final

        def timed_launch(self: Any, task: Any, memo: Any) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            on_launch(self, task, memo)
            timer.cpu_per_task[task["id"]] += time.thread_time() - c0
            timer.per_task[task["id"]] += time.perf_counter() - t0
            timer._current.task = task["id"]

        def timed_final(self: Any, task: Any, error: Any) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            on_final(self, task, error)
            timer.cpu_per_task[task["id"]] += time.thread_time() - c0
            timer.per_task[task["id"]] += time.perf_counter() - t0

        TrackingMemoizer._on_launch = timed_launch  # type: ignore[method-assign]
        TrackingMemoizer._on_final = timed_final  # type: ignore[method-assign]

    def wrap_executor(self, executor: Any) -> None:
        """Around the original submit (inside our wrapper) and around our wrapper: the difference is ours."""
        original, timer = executor.submit, self

        def inner(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                timer._current.inner_cpu = time.thread_time() - c0
                timer._current.inner = time.perf_counter() - t0

        executor.submit = inner
        return None

    def wrap_tracked(self, executor: Any) -> None:
        tracked_submit, timer = executor.submit, self

        def outer(*args: Any, **kwargs: Any) -> Any:
            timer._current.inner = timer._current.inner_cpu = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return tracked_submit(*args, **kwargs)
            finally:
                ours_cpu = time.thread_time() - c0 - timer._current.inner_cpu
                ours = time.perf_counter() - t0 - timer._current.inner
                task = getattr(timer._current, "task", -1)
                timer.cpu_per_task[task] += ours_cpu
                timer.per_task[task] += ours

        executor.submit = outer


def make_executor(kind: str, workdir: str) -> Any:
    if kind == "threads":
        return ThreadPoolExecutor(label="workers", max_threads=2)
    return HighThroughputExecutor(label="workers", max_workers_per_node=2, cores_per_worker=1,
                                  provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))


def run_cpu_seconds(run_dir: str) -> dict[int, float]:
    """CPU seconds so far of this process, its descendants and the HTEX worker pool of ``run_dir`` (the local
    provider starts it through a shell that exits, so it is not our descendant) with its descendants, by pid."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if run_dir in cmdline and "process_worker_pool" in cmdline:
                procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    seconds: dict[int, float] = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            seconds[proc.pid] = times.user + times.system
        except psutil.Error:
            continue
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def one_run(kind: str, tracked: bool, tasks: int, workdir: str, timer: HookTimer | None) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of all the run's processes)`` for ``tasks`` no-op apps."""
    executor = make_executor(kind, workdir)
    run_dir = os.path.join(workdir, "runinfo", f"{kind}-{'tracked' if tracked else 'baseline'}-{time.time_ns()}")
    config = Config(executors=[executor], run_dir=run_dir, strategy="none")
    if tracked:
        import metatrail.plugins.parsl

        assert timer is not None
        timer.wrap_executor(executor)
        metatrail.plugins.parsl.track(config)
        timer.wrap_tracked(executor)
    with parsl.load(config):
        for future in [noop() for _ in range(WARMUP_TASKS)]:
            future.result()  # workers up
        if tracked and timer is not None:
            timer.warm_waits.append(wait_for_records(config, WARMUP_TASKS))
        cpu0 = run_cpu_seconds(run_dir)
        t0 = time.perf_counter()
        futures = [noop() for _ in range(tasks)]
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
        polling = 0.0
        if tracked and timer is not None:
            polling = time.thread_time()
            timer.stored_after.append(wait_for_records(config, WARMUP_TASKS + tasks))
            polling = time.thread_time() - polling
        cpu = cpu_used(cpu0, run_cpu_seconds(run_dir)) - polling
    if timer is not None and tracked:
        timer.end_run()
    return elapsed, cpu


def wait_for_records(config: Any, count: int, timeout: float = 120.0) -> float:
    """Seconds until ``count`` executions of the tracked run have ended in the store: the processes that record
    them have then imported what they write with (and the DFK's writer process, if any, is up)."""
    from metatrail.store import open_store

    t0 = time.perf_counter()
    run = config.memoizer._run  # bench-only: the TrackingMemoizer's pipeline run
    with open_store(os.environ["METATRAIL_STORE"]) as store:
        while time.perf_counter() - t0 < timeout:
            children = (store.get_run(run.id) or {}).get("children", [])
            if sum(1 for c in children if c.get("state") in ("completed", "failed")) >= count:
                break
            time.sleep(0.05)
    return time.perf_counter() - t0


class WorkerCost:
    """Per-call figures of a no-op through TrackedCall (with context, real recorder and store) and without."""

    def __init__(self) -> None:
        self.wall: list[float] = []  # tracked minus plain, per call
        self.cpu: list[float] = []  # the same in the calling thread's CPU time
        self.recorder_cpu: list[float] = []  # of ``cpu``: inside Recorder.execution_started/finished


def worker_side_cost(calls: int, workdir: str) -> WorkerCost:
    """Time a no-op through TrackedCall (with context, real recorder and store) and without, call by call."""
    from metatrail.config import load_settings
    from metatrail.plugins.parsl.worker import CTX_KEY, encode_context, tracked
    from metatrail.recorder import Recorder

    def plain() -> None:
        return None

    from metatrail.plugins.parsl import worker

    worker._worker_recorders.clear()  # a fresh recorder that reads METATRAIL_ENERGY now
    store = f"sqlite:///{workdir}/worker-bench/metatrail.db"
    settings = load_settings(store=store)
    base_ctx = {"run": "0192f3a0-0000-7000-8000-000000000000", "pipeline": "bench", "namespace": "parsl",
                "version": parsl.__version__, "store": settings.store, "hash_cache": settings.hash_cache,
                "stage": "plain", "try": 0, "extra": {"parsl_task_id": 0}}
    wrapper = tracked(plain)
    wrapper(**{CTX_KEY: encode_context(dict(base_ctx, id="0192f3a0-0000-7000-8000-00000000ffff"))})  # warm
    in_recorder = [0.0]
    originals = {name: getattr(Recorder, name) for name in ("execution_started", "execution_finished")}

    def timed(method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                in_recorder[0] += time.thread_time() - c0
        return call

    cost = WorkerCost()
    for name, method in originals.items():
        setattr(Recorder, name, timed(method))
    try:
        for i in range(calls):
            ctx = encode_context(dict(base_ctx, id=f"0192f3a0-0000-7000-8000-{i:012x}"))  # as HTEX delivers it
            in_recorder[0] = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            wrapper(**{CTX_KEY: ctx})
            c1, t1 = time.thread_time(), time.perf_counter()
            plain()
            c2, t2 = time.thread_time(), time.perf_counter()
            cost.wall.append((t1 - t0) - (t2 - t1))
            cost.cpu.append((c1 - c0) - (c2 - c1))
            cost.recorder_cpu.append(in_recorder[0])
    finally:
        for name, method in originals.items():
            setattr(Recorder, name, method)
    for rec in worker._worker_recorders.values():
        rec.flush(30)
    return cost


def recorder_event_cost(workdir: str, n: int = 500) -> tuple[float, float]:
    """Seconds per event the recorder's writer thread spends building and storing a task's events."""
    from metatrail.config import load_settings
    from metatrail.model import Execution
    from metatrail.recorder import Recorder, _Item
    from metatrail.store import open_store

    os.makedirs(workdir, exist_ok=True)
    rec = Recorder(load_settings(store=f"sqlite:///{workdir}/unused.db"))
    runs = [Execution(id=f"0192f3a0-0000-7000-8000-{i:012x}", pipeline="bench", stage="noop", namespace="parsl",
                      integration="PARSL", params={"i": i}) for i in range(n + 1)]
    rec._build(_Item("exec_start", runs[0], time.time()))  # imports warm
    t0 = time.perf_counter()
    events = [rec._build(_Item("exec_start", r, time.time())) for r in runs[1:]]
    build = (time.perf_counter() - t0) / n
    with open_store(f"sqlite:///{workdir}/events.db") as store:
        store.ingest([rec._build(_Item("exec_start", runs[0], time.time()))])
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            store.ingest(events[i:i + 256])
        ingest = (time.perf_counter() - t0) / n
    return build, ingest


def pth_line_cost() -> float:
    from metatrail.plugins.parsl.autoload import PTH_LINE

    env_before = os.environ.pop("METATRAIL_PARSL", None)
    try:
        code = compile(PTH_LINE, "<pth>", "exec")
        n = 20000
        return timeit.timeit(lambda: exec(code, {}), number=n) / n
    finally:
        if env_before is not None:
            os.environ["METATRAIL_PARSL"] = env_before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--executors", default="threads,htex")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parsl.txt"))
    args = ap.parse_args()
    from machine import use_bytecode

    bytecode = use_bytecode()
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="bench-parsl-") as work:
        os.environ["METATRAIL_STORE"] = f"sqlite:///{work}/.metatrail/metatrail.db"
        os.environ.pop("METATRAIL_DISABLED", None)
        say(f"# bench_parsl: {args.tasks} no-op apps, {args.reps} interleaved reps per variant")
        say(f"# parsl {parsl.__version__}, Python {platform.python_version()}, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
        say(f"# {bytecode}")
        timer = HookTimer()
        timer.install()
        for kind in args.executors.split(","):
            walls: dict[str, list[float]] = {"baseline": [], "tracked": [], "tracked, energy off": []}
            cpus: dict[str, list[float]] = {name: [] for name in walls}
            for _ in range(args.reps):
                for variant in walls:
                    if variant.endswith("energy off"):
                        os.environ["METATRAIL_ENERGY"] = "0"
                    try:
                        wall, cpu = one_run(kind, variant != "baseline", args.tasks, work,
                                            None if variant == "baseline" else timer)
                    finally:
                        os.environ.pop("METATRAIL_ENERGY", None)
                    walls[variant].append(wall)
                    cpus[variant].append(cpu)
            base, base_cpu = walls["baseline"], cpus["baseline"]
            say(f"{kind}: baseline wall s {' '.join(f'{x:.3f}' for x in base)}; CPU s "
                f"{' '.join(f'{x:.2f}' for x in base_cpu)}")
            for variant in ("tracked", "tracked, energy off"):
                ratios = [t / b for t, b in zip(walls[variant], base, strict=True)]
                say(f"{kind}: {variant} wall s {' '.join(f'{x:.3f}' for x in walls[variant])} -> ratio median "
                    f"{statistics.median(ratios):.2f} (per rep {' '.join(f'{r:.2f}' for r in ratios)}; "
                    f"target <= 1.03)")
                cpu_ratios = [t / b for t, b in zip(cpus[variant], base_cpu, strict=True)]
                extra = statistics.median(cpus[variant]) - statistics.median(base_cpu)
                say(f"{kind}: {variant} CPU s {' '.join(f'{x:.2f}' for x in cpus[variant])} -> CPU ratio median "
                    f"{statistics.median(cpu_ratios):.2f} (per rep {' '.join(f'{r:.2f}' for r in cpu_ratios)}); "
                    f"extra CPU {extra / args.tasks * 1e6:.0f} us per task, all processes")
        say(f"tracked runs: warm-up records stored {_pct(timer.warm_waits, .5):.2f} s (median; max "
            f"{max(timer.warm_waits, default=float('nan')):.2f} s) after the warm-up results, not in the wall times; "
            f"all records stored {_pct(timer.stored_after, .5):.2f} s (median; max "
            f"{max(timer.stored_after, default=float('nan')):.2f} s) after the last result")
        dfk = timer.samples
        say(f"dfk-side our code per task (n={len(dfk)}): p50 {_pct(dfk, .5) * 1e6:.0f} us, "
            f"p99 {_pct(dfk, .99) * 1e6:.0f} us")
        dfk_cpu = timer.cpu_samples
        say(f"dfk-side our code per task, thread CPU (n={len(dfk_cpu)}): p50 {_pct(dfk_cpu, .5) * 1e6:.1f} us, "
            f"p99 {_pct(dfk_cpu, .99) * 1e6:.0f} us, mean {statistics.fmean(dfk_cpu or [0.0]) * 1e6:.1f} us")
        for energy in ("1", "0"):
            os.environ["METATRAIL_ENERGY"] = energy
            try:
                cost = worker_side_cost(args.tasks, os.path.join(work, f"energy{energy}"))
            finally:
                del os.environ["METATRAIL_ENERGY"]
            onoff = "on" if energy == "1" else "off"
            say(f"worker-side wrapper per task (start+end calls on the task's thread, energy {onoff}, "
                f"n={len(cost.wall)}): p50 {_pct(cost.wall, .5) * 1e6:.0f} us, p99 {_pct(cost.wall, .99) * 1e6:.0f} us")
            ours = [c - r for c, r in zip(cost.cpu, cost.recorder_cpu, strict=True)]
            say(f"worker-side wrapper per task, thread CPU (energy {onoff}): p50 {_pct(cost.cpu, .5) * 1e6:.1f} us, "
                f"mean {statistics.fmean(cost.cpu) * 1e6:.1f} us; of it in Recorder.execution_started/finished "
                f"p50 {_pct(cost.recorder_cpu, .5) * 1e6:.1f} us, mean {statistics.fmean(cost.recorder_cpu) * 1e6:.1f} "
                f"us; the plugin's own p50 {_pct(ours, .5) * 1e6:.1f} us, mean {statistics.fmean(ours) * 1e6:.1f} us")
        build, ingest = recorder_event_cost(os.path.join(work, "events"))
        say(f"recorder writer thread per event (where the per-task CPU goes): build {build * 1e6:.0f} us, "
            f"store ingest in batches of 256 {ingest * 1e6:.0f} us; each task makes 2 events")
        say(f".pth hook line with METATRAIL_PARSL unset: {pth_line_cost() * 1e6:.2f} us per interpreter start")
        say(f"# load average at end {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
