"""Snakemake plugin overhead: a workflow of N independent no-op jobs, ``--cores 2``, with and without the plugin.

    .nox/snakemake/bin/python bench/bench_snakemake.py [--jobs 1000] [--rounds 2] [--out bench/results/snakemake.txt]

Every figure comes from this one run, so ratios compare like with like on a shared machine:

* wall clock of ``snakemake`` (process start to exit, start-up and DAG building included) without the plugin and
  with ``--logger metatrail``, runs interleaved (off, do-nothing, on, off, ...), ratio of medians (target <= 1.03); and
  the CPU time of the same runs (Snakemake and its jobs), which a loaded machine disturbs less than the wall clock;
* the same for a logger plugin whose handler does nothing (``--logger benchnull``, written for the run): what
  Snakemake's plugin machinery costs by itself, the floor under any logger plugin's ratio;
* time in our code, from the recorded runs: per job, the plugin's ``emit`` on Snakemake's log-listener thread for
  the job's records (JOB_INFO, JOB_FINISHED) plus the record clock's and temp-file guard's filters on the thread
  that logs them (the only part on Snakemake's own path), p50/p99; records of no job (progress, job batches)
  amortised per job; and off Snakemake's threads, the Recorder's writer thread per event (build: hashing, event)
  and per batch (store);
* the same four functions' thread CPU time per job, which the machine's load does not inflate.

Each run goes through a small driver (``python -c``) that wraps those four functions with ``perf_counter`` and dumps
the timings at exit, then calls Snakemake's own ``main``; the baseline uses the same driver, without ``--logger``.
Nothing in the plugin is changed for the bench. Each job is ``touch {output}``: a no-op shell job.
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
SHIM = "snakemake_logger_plugin_metatrail"
NULL_PLUGIN = "snakemake_logger_plugin_benchnull"

# A logger plugin whose handler does nothing: what Snakemake's plugin machinery alone costs (it formats and copies
# every record onto a queue on its own thread, and a listener thread hands each to the plugin's handler).
NULL_PLUGIN_SOURCE = """\
import logging
from dataclasses import dataclass

from snakemake_interface_logger_plugins.base import LogHandlerBase
from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase


@dataclass
class LogHandlerSettings(LogHandlerSettingsBase):
    pass


class LogHandler(LogHandlerBase):
    def __post_init__(self):
        if not hasattr(self, "filters"):
            logging.Handler.__init__(self)

    def emit(self, record):
        pass

    @property
    def writes_to_stream(self):
        return False

    @property
    def writes_to_file(self):
        return False

    @property
    def has_filter(self):
        return True

    @property
    def has_formatter(self):
        return True

    @property
    def needs_rulegraph(self):
        return False
"""

SNAKEFILE = """\
rule all:
    input: expand("out/{{i}}.txt", i=range({n}))

rule noop:
    output: "out/{{i}}.txt"
    shell: "touch {{output}}"
"""

DRIVER = r"""
import atexit, json, logging.handlers, os, resource, sys, time
timings = {"emit": [], "rest": [], "filter": [], "build": [], "write": [], "handoff": []}
cpu = {"listener": 0.0}

def _dump():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.update(main=time.thread_time(), process=own.ru_utime + own.ru_stime,
               children=children.ru_utime + children.ru_stime)
    with open(os.environ["MT_BENCH_TIMINGS"], "w") as fh:
        json.dump({**timings, "cpu": cpu}, fh)

atexit.register(_dump)  # registered first, so it runs after the Recorder's own exit flush

def _monitor(self, inner=logging.handlers.QueueListener._monitor):
    # Snakemake's log-listener thread: it runs every logger plugin's handler (here: only ours)
    try:
        inner(self)
    finally:
        cpu["listener"] += time.thread_time()

logging.handlers.QueueListener._monitor = _monitor

from metatrail.plugins.snakemake.guard import RecordClock, TempFileGuard
from metatrail.plugins.snakemake.handler import LogHandler
from metatrail.recorder import Recorder

def _job(args):
    record = args[0] if args else None
    jobid = getattr(record, "jobid", None)
    return jobid if jobid is not None else getattr(record, "job_id", None)

def _wrap(cls, name, key, tag):
    inner = getattr(cls, name)
    clock, cpu = time.perf_counter, time.thread_time
    def timed(self, *args):
        started, cpu_started = clock(), cpu()
        try:
            return inner(self, *args)
        finally:
            wall, used = clock() - started, cpu() - cpu_started
            if key == "emit":  # the listener's rest at the end of emit is counted apart (LISTENER_REST_S)
                timings["rest"].append((tag(args), *resting))
                wall, used = wall - resting[0], used - resting[1]
                resting[:] = [0.0, 0.0]
            timings[key].append((tag(args), wall, used))
    setattr(cls, name, timed)

resting = [0.0, 0.0]  # wall and CPU seconds of the rest inside the emit now running (one listener thread)

def _rest(self, inner=getattr(LogHandler, "_rest", lambda self: None)):
    started, cpu_started = time.perf_counter(), time.thread_time()
    try:
        return inner(self)
    finally:
        resting[0] += time.perf_counter() - started
        resting[1] += time.thread_time() - cpu_started

LogHandler._rest = _rest
_wrap(LogHandler, "emit", "emit", _job)
_wrap(RecordClock, "filter", "filter", _job)
_wrap(TempFileGuard, "filter", "filter", _job)
_wrap(Recorder, "_build", "build", lambda args: None)
_wrap(Recorder, "_write", "write", lambda args: len(args[0]))
_wrap(Recorder, "_to_process", "handoff", lambda args: len(args[0]))
sys.argv = ["snakemake", *sys.argv[1:]]
from snakemake.cli import main
main()
"""


# In the discovery directory (on PYTHONPATH): the Recorder's writer process (``python -m metatrail.writerproc``)
# notes its own CPU time at exit. It may outlive Snakemake, so Snakemake's reaped-children time can miss it.
SITECUSTOMIZE = """\
import atexit, os, resource, sys

if os.environ.get("MT_BENCH_WRITER_CPU"):
    def _note():
        # sys.argv[0] names the module only once runpy has run it (at start-up it is "-m")
        if not sys.argv or "writerproc" not in sys.argv[0]:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(os.environ["MT_BENCH_WRITER_CPU"], "a") as fh:
            fh.write(f"{usage.ru_utime + usage.ru_stime}\\n")
    atexit.register(_note)
"""


def _become_subreaper() -> bool:
    """Make this process inherit its orphaned descendants (Linux), so that a writer process that outlives Snakemake
    is reaped here and its CPU time counted in this process's children's."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_orphans(timeout: float = 120.0) -> None:
    """Wait (bounded) for descendants left behind by the last run, reaping them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _discovery_dir(work: Path) -> Path:
    # Snakemake discovers plugins with pkgutil.iter_modules(), which an editable install hides the module from.
    site = work / "site"
    site.mkdir()
    (site / SHIM).symlink_to(ROOT / "plugins" / SHIM, target_is_directory=True)
    (site / NULL_PLUGIN).mkdir()
    (site / NULL_PLUGIN / "__init__.py").write_text(NULL_PLUGIN_SOURCE)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return site


def _run(work: Path, site: Path, index: int, recorded: bool, jobs: int, *, null: bool = False) -> dict[str, Any]:
    wf = work / f"run{index}"
    wf.mkdir()
    (wf / "Snakefile").write_text(SNAKEFILE.format(n=jobs))
    store = wf / ".metatrail" / "metatrail.db"
    timings = wf / "timings.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METATRAIL_", "SNAKEMAKE_"))}
    writer_cpu = wf / "writer_cpu.txt"
    # MT_BENCH_PYTHONPATH: a directory holding another ``metatrail`` package (a copy of an earlier version), put
    # before this checkout's editable install, to measure before and after a change on the same machine and load.
    path = [p for p in (os.environ.get("MT_BENCH_PYTHONPATH"), str(site)) if p]
    env.update({"PYTHONPATH": os.pathsep.join(path), "METATRAIL_STORE": f"sqlite:///{store}",
                "MT_BENCH_TIMINGS": str(timings), "MT_BENCH_WRITER_CPU": str(writer_cpu)})
    logger = ["--logger", "metatrail"] if recorded else ["--logger", "benchnull"] if null else []
    args = ["--cores", "2", *logger]
    load = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=wf, env=env, capture_output=True, text=True,
                          timeout=7200, check=False)
    wall = time.perf_counter() - started
    _reap_orphans()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    elapsed = re.search(r"Elapsed time: (\d+):(\d+):([\d.]+)", done.stderr)
    events = 0
    if recorded:
        from metatrail.store import open_store

        with open_store(f"sqlite:///{store}") as s:
            events = s.stats()["events"]
    measured = json.loads(timings.read_text())
    measured["cpu"]["writer_process"] = sum(float(line) for line in writer_cpu.read_text().split()) \
        if writer_cpu.exists() else 0.0
    return {"wall": wall, "cpu": cpu, "load": load, "events": events, "timings": measured,
            "elapsed": (int(elapsed.group(1)) * 3600 + int(elapsed.group(2)) * 60 + float(elapsed.group(3)))
            if elapsed else float("nan"), "plugin_messages": done.stderr.count("metatrail:")}


def _per_job(timings: dict[str, list[list[Any]]]) -> tuple[list[float], float, int]:
    """Seconds in emit + logging filters per job; seconds of records of no job; number of jobs."""
    per_job: dict[Any, float] = {}
    unattributed = 0.0
    for key in ("emit", "filter"):
        for job, seconds, _ in timings[key]:
            if job is None:
                unattributed += seconds
            else:
                per_job[job] = per_job.get(job, 0.0) + seconds
    return list(per_job.values()), unattributed, len(per_job)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="no-op jobs in the workflow (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "snakemake.txt")
    args = parser.parse_args()
    from machine import use_bytecode

    bytecode = use_bytecode()

    from importlib.metadata import version

    subreaper = _become_subreaper()
    load_start = os.getloadavg()
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    null_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-snakemake-") as tmp:
        work = Path(tmp)
        site = _discovery_dir(work)
        index = 0
        for _ in range(args.rounds):
            for variant in ("baseline", "null", "recorded"):
                index += 1
                recorded = variant == "recorded"
                result = _run(work, site, index, recorded, args.jobs, null=variant == "null")
                (null_runs if variant == "null" else runs[recorded]).append(result)
                print(f"  {variant} run {index}: {result['wall']:.1f} s (load {result['load']:.2f})", file=sys.stderr)

    on_walls = [r["wall"] for r in runs[True]]
    off_walls = [r["wall"] for r in runs[False]]
    ratio = statistics.median(on_walls) / statistics.median(off_walls)
    null_walls = [r["wall"] for r in null_runs]
    null_ratio = statistics.median(null_walls) / statistics.median(off_walls)
    null_cpu = [r["cpu"] for r in null_runs]
    on_cpu = [r["cpu"] for r in runs[True]]
    off_cpu = [r["cpu"] for r in runs[False]]
    cpu_ratio = statistics.median(on_cpu) / statistics.median(off_cpu)
    cpu_per_job = (statistics.median(on_cpu) - statistics.median(off_cpu)) * 1000 / (args.jobs + 1)
    per_job: list[float] = []
    unattributed = 0.0
    n_jobs = 0
    emits: list[float] = []
    filters: list[float] = []
    builds: list[float] = []
    writes: list[float] = []
    batch_sizes: list[int] = []
    handoffs: list[float] = []
    rests: list[float] = []
    cpu_totals = {"emit": 0.0, "rest": 0.0, "filter": 0.0, "build": 0.0, "write": 0.0, "handoff": 0.0}
    for r in runs[True]:
        jobs, other, n = _per_job(r["timings"])
        per_job += jobs
        unattributed += other
        n_jobs += n
        emits += [s for _, s, _ in r["timings"]["emit"]]
        filters += [s for _, s, _ in r["timings"]["filter"]]
        builds += [s for _, s, _ in r["timings"]["build"]]
        writes += [s for _, s, _ in r["timings"]["write"]]
        batch_sizes += [n for n, _, _ in r["timings"]["write"]]
        handoffs += [s for _, s, _ in r["timings"].get("handoff", [])]
        rests += [s for _, s, _ in r["timings"].get("rest", [])]
        for key in cpu_totals:
            cpu_totals[key] += sum(c for _, _, c in r["timings"].get(key, []))

    def extra_ms(part: Any) -> str:
        """Median over recorded runs minus median over baseline runs of ``part(cpu figures, whole run's cpu)``, in ms
        per job."""
        on = statistics.median(part(r["timings"]["cpu"], r["cpu"]) for r in runs[True])
        off = statistics.median(part(r["timings"]["cpu"], r["cpu"]) for r in runs[False])
        return f"{(on - off) * 1000 / (args.jobs + 1):.2f}"

    breakdown = [
        ("Snakemake's main thread", lambda c, _: c["main"]),
        ("log-listener thread (our emit, Snakemake's queue)", lambda c, _: c["listener"]),
        ("other threads of Snakemake's process (metatrail's, Snakemake's timers)",
         lambda c, _: c["process"] - c["main"] - c["listener"]),
        ("writer process", lambda c, _: c["writer_process"]),
        ("other processes (jobs)", lambda c, whole: whole - c["process"] - c["writer_process"]),
    ]

    def row(label: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values] or [float("nan")]
        return (f"  {label:<44} {_percentile(ms, 0.5):8.3f} {_percentile(ms, 0.9):8.3f} {_percentile(ms, 0.99):8.3f} "
                f"{max(ms):9.3f} {statistics.fmean(ms):8.3f} {len(values):7d}")

    total_jobs = args.jobs + 1  # the no-op jobs and `all`
    recorded_jobs = max(total_jobs * len(runs[True]), 1)
    lines = [
        f"metatrail Snakemake plugin benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        "",
        f"machine       {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, shared VM",
        f"load average  {load_start[0]:.2f}, {load_start[1]:.2f}, {load_start[2]:.2f} (1, 5, 15 min) at start; "
        f"{os.getloadavg()[0]:.2f} at end",
        f"versions      snakemake {version('snakemake')}, metatrail {version('metatrail')}, "
        f"CPython {platform.python_version()}",
        f"bytecode      {bytecode}",
        f"workload      {args.jobs} independent no-op shell jobs (`touch {{output}}`) + `all`, --cores 2, "
        f"{args.rounds} runs each way, interleaved",
        "",
        "(a) wall clock of `snakemake` (s), start-up and DAG included; in brackets Snakemake's own 'Elapsed time'",
        "  baseline (no plugin)  " + ", ".join(f"{r['wall']:.1f} [{r['elapsed']:.1f}]" for r in runs[False]),
        "  --logger metatrail    " + ", ".join(f"{r['wall']:.1f} [{r['elapsed']:.1f}]" for r in runs[True]),
        "  --logger benchnull    " + ", ".join(f"{r['wall']:.1f} [{r['elapsed']:.1f}]" for r in null_runs)
        + "   (a logger plugin whose handler does nothing: Snakemake's plugin machinery alone)",
        f"  ratio of medians recorded/baseline: {ratio:.3f} (target <= 1.03); do-nothing plugin/baseline: "
        f"{null_ratio:.3f}; recorded/do-nothing plugin: {ratio / null_ratio:.3f}",
        "  1-min loads at run starts: "
        + ", ".join(f"{r['load']:.1f}" for rs in (*runs.values(), null_runs) for r in rs),
        "  CPU time (s, user+sys of Snakemake, its jobs and the writer process"
        + ("" if subreaper else ", which is missed when it outlives Snakemake: no subreaper here") + "): baseline "
        + ", ".join(f"{c:.1f}" for c in off_cpu) + "; recorded " + ", ".join(f"{c:.1f}" for c in on_cpu)
        + f"; ratio of medians {cpu_ratio:.3f}, {cpu_per_job:.2f} ms more per job; do-nothing plugin "
        + ", ".join(f"{c:.1f}" for c in null_cpu)
        + f" ({(statistics.median(null_cpu) - statistics.median(off_cpu)) * 1000 / total_jobs:.2f} ms more per job)",
        f"  events stored per recorded run: {', '.join(str(r['events']) for r in runs[True])} "
        f"(expected {2 * total_jobs + 2}); plugin messages on stderr: "
        f"{', '.join(str(r['plugin_messages']) for r in runs[True])}",
        "",
        "(b) time in our code (ms)                           p50      p90      p99       max     mean       n",
        row("per job: emit + filters of its records", per_job),
        row("  emit, per record (listener thread)", emits),
        row("  then resting, per record (listener thread, idle)", rests),
        row("  clock + guard filters, per call (logging thread)", filters),
        f"  records of no job (job batches, progress, messages): {unattributed * 1000 / max(n_jobs, 1):.3f} ms "
        "per job, amortised",
        row("writer thread, build per event", builds),
        row("writer thread, store write per batch", writes),
        row("writer thread, hand-off to the writer process per batch", handoffs),
        f"  batches: {len(batch_sizes)}, events per batch p50 {_percentile([float(b) for b in batch_sizes], 0.5):.0f}, "
        f"max {max(batch_sizes, default=0)}",
        "",
        "(c) CPU time of our code per job (thread CPU, so the machine's load does not inflate it), ms:",
        "  " + ", ".join(f"{key} {cpu_totals[key] * 1000 / recorded_jobs:.3f}" for key in cpu_totals)
        + f"; total {sum(cpu_totals.values()) * 1000 / recorded_jobs:.3f}"
        " (emit and filter per job's share of all records; build, write and handoff: the Recorder's writer thread;",
        "  once a process has recorded 32 events, batches go to the Recorder's writer process: they are built and",
        "  written there, outside Snakemake's interpreter, and only the handoff (pickling a batch) runs here)",
        "",
        "(d) where the recorded runs' extra CPU time goes, ms per job (median of recorded runs minus median of",
        "  baseline runs, each part measured in every run: thread CPU at Snakemake's exit, the writer process's own at",
        "  its exit):",
        *(f"  {label:<72} {extra_ms(part):>6}" for label, part in breakdown),
        f"  {'whole run (Snakemake, its jobs, the writer process)':<72} {cpu_per_job:6.2f}",
        "",
        "Only two logging filters run on Snakemake's own thread (the record clock numbers each record; the guard waits",
        "only before a temp() file is deleted: never in this workload); emit runs on Snakemake's log-listener",
        "thread and only queues work, then rests once the listener has delivered every record (LISTENER_REST_S),",
        "rather than have the listener woken for every record Snakemake logs;",
        "hashing and store writes run on the Recorder's writer thread, then in its writer process.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
