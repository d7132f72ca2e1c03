"""Snakemake plugin overhead: a workflow of N independent no-op jobs, ``--cores 2``, with and without the plugin.

    .nox/snakemake/bin/python bench/bench_snakemake.py [--jobs 1000] [--rounds 2] [--out bench/results/snakemake.txt]

Every figure comes from this one run, so ratios compare like with like on a shared machine:

* wall clock of ``snakemake`` (process start to exit, start-up and DAG building included) without the plugin and
  with ``--logger metatrail``, runs interleaved (off, on, off, on, ...), ratio of medians (target <= 1.03); and the
  CPU time of the same runs (Snakemake and its jobs), which a loaded machine disturbs less than the wall clock;
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

SNAKEFILE = """\
rule all:
    input: expand("out/{{i}}.txt", i=range({n}))

rule noop:
    output: "out/{{i}}.txt"
    shell: "touch {{output}}"
"""

DRIVER = r"""
import atexit, json, os, sys, time
timings = {"emit": [], "filter": [], "build": [], "write": [], "handoff": []}

def _dump():
    with open(os.environ["MT_BENCH_TIMINGS"], "w") as fh:
        json.dump(timings, fh)

atexit.register(_dump)  # registered first, so it runs after the Recorder's own exit flush

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
            timings[key].append((tag(args), clock() - started, cpu() - cpu_started))
    setattr(cls, name, timed)

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
    return site


def _run(work: Path, site: Path, index: int, recorded: bool, jobs: int) -> dict[str, Any]:
    wf = work / f"run{index}"
    wf.mkdir()
    (wf / "Snakefile").write_text(SNAKEFILE.format(n=jobs))
    store = wf / ".metatrail" / "metatrail.db"
    timings = wf / "timings.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METATRAIL_", "SNAKEMAKE_"))}
    env.update({"PYTHONPATH": str(site), "METATRAIL_STORE": f"sqlite:///{store}", "MT_BENCH_TIMINGS": str(timings)})
    args = ["--cores", "2", *(["--logger", "metatrail"] if recorded else [])]
    load = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=wf, env=env, capture_output=True, text=True,
                          timeout=7200, check=False)
    wall = time.perf_counter() - started
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
    return {"wall": wall, "cpu": cpu, "load": load, "events": events, "timings": json.loads(timings.read_text()),
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

    load_start = os.getloadavg()
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-snakemake-") as tmp:
        work = Path(tmp)
        site = _discovery_dir(work)
        index = 0
        for _ in range(args.rounds):
            for recorded in (False, True):
                index += 1
                result = _run(work, site, index, recorded, args.jobs)
                runs[recorded].append(result)
                print(f"  {'recorded' if recorded else 'baseline'} run {len(runs[recorded])}: {result['wall']:.1f} s "
                      f"(load {result['load']:.2f})", file=sys.stderr)

    on_walls = [r["wall"] for r in runs[True]]
    off_walls = [r["wall"] for r in runs[False]]
    ratio = statistics.median(on_walls) / statistics.median(off_walls)
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
    cpu_totals = {"emit": 0.0, "filter": 0.0, "build": 0.0, "write": 0.0, "handoff": 0.0}
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
        for key in cpu_totals:
            cpu_totals[key] += sum(c for _, _, c in r["timings"].get(key, []))

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
        f"  ratio of medians recorded/baseline: {ratio:.3f} (target <= 1.03); 1-min loads at run starts: "
        + ", ".join(f"{r['load']:.1f}" for rs in runs.values() for r in rs),
        "  CPU time (s, user+sys of Snakemake and its jobs): baseline "
        + ", ".join(f"{c:.1f}" for c in off_cpu) + "; recorded " + ", ".join(f"{c:.1f}" for c in on_cpu)
        + f"; ratio of medians {cpu_ratio:.3f}, {cpu_per_job:.2f} ms more per job",
        f"  events stored per recorded run: {', '.join(str(r['events']) for r in runs[True])} "
        f"(expected {2 * total_jobs + 2}); plugin messages on stderr: "
        f"{', '.join(str(r['plugin_messages']) for r in runs[True])}",
        "",
        "(b) time in our code (ms)                           p50      p90      p99       max     mean       n",
        row("per job: emit + filters of its records", per_job),
        row("  emit, per record (listener thread)", emits),
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
        "Only two logging filters run on Snakemake's own thread (the record clock numbers each record; the guard waits",
        "only before a temp() file is deleted: never in this workload); emit runs on Snakemake's log-listener",
        "thread and only queues work;",
        "hashing and store writes run on the Recorder's writer thread, then in its writer process.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
