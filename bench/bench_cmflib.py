"""Side-by-side: metatrail's Recorder against HPE's cmflib 0.1.0 on the same workload, in one run.

    python bench/bench_cmflib.py                        # 20 executions each
    python bench/bench_cmflib.py --executions 5 --cmflib-python /path/to/venv/bin/python

The workload (``bench/_cmflib_workload.py``): a pipeline of N executions over four stages; each execution
has two small generated input files (~1.5 KB: a fresh one and the previous execution's output), one output
file and a parameter dict, recorded through each tool's explicit API. Each tool runs in its own fresh
interpreter, which times itself and prints JSON back:

* cmflib (needs Python < 3.12, so its own virtual environment): ``Cmf(filepath=...,
  pipeline_name=...)``, then per execution ``create_context``, ``create_execution``, ``log_dataset`` (3
  times), ``finalize``, in a scratch git + DVC repository (git remote and local DVC remote, as ``cmf
  init local`` makes). Wall time per execution.
* metatrail, twice, each with a fresh store and hash cache (no hash is cached; every file is hashed
  once). *Durable per execution*: ``execution_started`` + ``execution_finished`` + ``flush`` after each
  execution, so the time runs until both events are committed to the SQLite store. *Pipelined*:
  ``execution_started`` + ``execution_finished`` per execution and one ``flush`` at the end (the total
  includes that flush). Both report the caller-side critical path (the two calls only).

The task's own work (writing its output file) is not timed for either tool. The cmflib environment is
created on first run when missing (``.nox/`` is git-ignored)::

    python3.11 -m venv .nox/bench-cmflib && .nox/bench-cmflib/bin/pip install cmflib==0.1.0

Prints a report and writes it to ``bench/results/cmflib.txt`` (``--out``). Target: metatrail at least
1,000x faster per execution; exit status 1 when that is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cmflib_workload import (  # the bench directory, put on sys.path above
    PIPELINE,
    RESULT_MARKER,
    STAGES,
    inputs_for,
    make_inputs,
    params_for,
    summarize,
    write_output,
)
from machine import cpu_model, memory_total, tree_state, usable_cpus

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cmflib.txt"
WORKLOAD = ROOT / "bench" / "_cmflib_workload.py"
DEFAULT_ENV = ROOT / ".nox" / "bench-cmflib"
CMFLIB_REQUIREMENT = "cmflib==0.1.0"
TARGET_RATIO = 1000.0
METATRAIL_MARKER = "METATRAIL_RESULT "


# -- metatrail's side (runs in a fresh interpreter: --worker metatrail) --------------------------------------
def run_metatrail(workdir: Path, n: int, mode: str, profile: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"executions": n, "mode": mode, "load_before": os.getloadavg()}
    t = time.perf_counter()
    import metatrail
    from metatrail.config import load_settings
    from metatrail.recorder import Recorder

    result["import_s"] = time.perf_counter() - t
    repo = workdir / "repo"
    repo.mkdir(parents=True)
    os.chdir(repo)
    make_inputs(repo / "data", n)
    settings = load_settings(store=f"sqlite:///{workdir / 'metatrail.db'}",
                             hash_cache=str(workdir / "hashcache.db"))

    # Setup, like cmflib's Cmf(...): the recorder, the pipeline run's START event, stored.
    t = time.perf_counter()
    rec = Recorder(settings)
    if profile:  # bench-only hook: the writer thread's work per batch (_build, _write) under its own cProfile
        import cProfile
        import threading

        caller_prof, writer_prof, profiling = cProfile.Profile(), cProfile.Profile(), threading.Event()

        def profiled(fn: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                return writer_prof.runcall(fn, *args, **kwargs) if profiling.is_set() else fn(*args, **kwargs)

            return call

        rec._build = profiled(rec._build)  # type: ignore[method-assign]
        rec._write = profiled(rec._write)  # type: ignore[method-assign]
    run = rec.pipeline_run_started(PIPELINE, params={"executions": n})
    ok = rec.flush(60)
    result["setup_s"] = time.perf_counter() - t

    caller: list[float] = []
    durable: list[float] = []
    flush_wait: list[float] = []
    task_s = 0.0
    if profile:
        profiling.set()
        caller_prof.enable()
    loop_start = time.perf_counter()
    for i in range(n):
        stage = STAGES[i % len(STAGES)]
        t0 = time.perf_counter()
        execution = rec.execution_started(PIPELINE, stage, pipeline_run=run, inputs=list(inputs_for(i)),
                                          params=params_for(i))
        t1 = time.perf_counter()
        write_output(repo / "data", i)  # the task itself: not timed
        t2 = time.perf_counter()
        rec.execution_finished(execution, outputs=[f"data/out_{i}.csv"])
        t3 = time.perf_counter()
        caller.append((t1 - t0) + (t3 - t2))
        task_s += t2 - t1
        if mode == "durable":
            ok = rec.flush(60) and ok
            t4 = time.perf_counter()
            flush_wait.append(t4 - t3)
            durable.append((t1 - t0) + (t4 - t2))
    if profile:
        caller_prof.disable()
    t = time.perf_counter()
    rec.pipeline_run_finished(run)
    ok = rec.flush(60) and ok
    end = time.perf_counter()
    result["final_flush_s"] = end - t
    result["loop_total_s"] = end - loop_start - task_s  # every execution, until all events are stored
    result["flush_ok"] = ok
    result["caller"] = summarize(caller)
    result["caller_s"] = caller
    if durable:
        result["durable"] = summarize(durable)
        result["durable_s"] = durable
        result["flush_wait"] = summarize(flush_wait)
    result["energy_monitor"] = type(rec._energy()).__name__
    result.update(written=rec.written, failed_writes=rec.failed_writes, dropped=rec.dropped)
    rec.close(30)
    if profile:
        from bench_recorder import profile_lines

        result["profile"] = [
            f"profile: writer thread, {n} executions after setup: Recorder._build (hashing + event building) "
            "and Recorder._write (store ingest), wall:", *profile_lines(writer_prof, "writer thread, wall", top=22),
            "", "profile: calling thread (execution_started + task + execution_finished + flush), wall:",
            *profile_lines(caller_prof, "calling thread, wall", top=12)]

    # Check that the store holds the workload, hashes included.
    from metatrail.store import open_store

    store = open_store(settings.store)
    try:
        stats = store.stats()
        runs = store.list_runs(kind="execution", limit=n + 10)
        edges = []
        for r in runs:
            detail = store.get_run(r["run_id"]) or {"inputs": [], "outputs": []}
            edges += detail["inputs"] + detail["outputs"]
    finally:
        store.close()
    result["stored"] = {"events": stats["events"], "executions": stats["executions"],
                        "states": stats["states"], "artifacts": stats["artifacts"], "edges": len(edges),
                        "edges_with_hash": sum(1 for e in edges if e.get("hash")),
                        "db_bytes": sum(p.stat().st_size for p in workdir.glob("metatrail.db*"))}
    result["versions"] = {"python": sys.version.split()[0], "metatrail": metatrail.__version__,
                          "openlineage-python": _version("openlineage-python"),
                          "sqlalchemy": _version("sqlalchemy"), "sqlite": sqlite3.sqlite_version,
                          "orjson": _version("orjson")}
    result["load_after"] = os.getloadavg()
    return result


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -- the driver -------------------------------------------------------------------------------------------
def ensure_cmflib_env(python: Path | None) -> Path:
    """The interpreter of cmflib's environment; the default (.nox/bench-cmflib) is created when missing."""
    if python is not None:
        if not python.exists():
            raise SystemExit(f"--cmflib-python {python} does not exist")
        return python
    py = DEFAULT_ENV / "bin" / "python"
    if py.exists():
        probe = subprocess.run([str(py), "-c", "import cmflib.cmf"], capture_output=True)
        if probe.returncode == 0:
            return py
    base = next((shutil.which(c) for c in ("python3.11", "python3.10", "python3.9") if shutil.which(c)), None)
    if base is None:
        raise SystemExit("cmflib 0.1.0 needs Python 3.9-3.11, none found on PATH; pass --cmflib-python")
    print(f"creating cmflib's environment in {DEFAULT_ENV} ({base} -m venv; pip install "
          f"{CMFLIB_REQUIREMENT}) ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run([base, "-m", "venv", "--clear", str(DEFAULT_ENV)], check=True)
    log = DEFAULT_ENV / "pip-install.log"
    with log.open("w") as fh:
        done = subprocess.run([str(py), "-m", "pip", "install", CMFLIB_REQUIREMENT], stdout=fh, stderr=fh)
    if done.returncode != 0:
        raise SystemExit(f"pip install {CMFLIB_REQUIREMENT} failed; see {log}")
    print(f"  done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return py


def _worker_result(cmd: list[str], marker: str, env: dict[str, str], log: Path,
                   timeout: float) -> dict[str, Any]:
    with log.open("w") as fh:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(marker)]
    if done.returncode != 0 or not lines:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{cmd[:3]} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len(marker):])
    return result


def run_metatrail_worker(tmp: Path, n: int, mode: str, profile: bool = False) -> dict[str, Any]:
    name = f"metatrail-{mode}{'-profile' if profile else ''}"
    workdir = tmp / name
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METATRAIL_")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "metatrail", "--mode", mode,
           "--workdir", str(workdir), "--executions", str(n)] + (["--profile-worker"] if profile else [])
    return _worker_result(cmd, METATRAIL_MARKER, env, tmp / f"{name}.log", timeout=600)


def run_cmflib_worker(tmp: Path, n: int, python: Path) -> dict[str, Any]:
    workdir = tmp / "cmflib"
    workdir.mkdir()
    env = dict(os.environ)
    # cmflib runs `pip freeze` and `dvc` by name: they must be those of its environment.
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("PYTHONPATH", None)
    env.pop("CONDA_PREFIX", None)  # else cmflib exports a conda environment instead of `pip freeze`
    cmd = [str(python), str(WORKLOAD), "--workdir", str(workdir), "--executions", str(n)]
    return _worker_result(cmd, RESULT_MARKER, env, tmp / "cmflib.log", timeout=max(600, 120 * n))


def machine_facts(cmflib_python: Path) -> list[str]:
    model, usable = cpu_model(), usable_cpus()
    mem = memory_total()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"cpu              {model}",
        f"cores            {os.cpu_count()} logical, {usable} usable by this process",
        f"memory           {mem}",
        f"os               {platform.platform()}",
        f"load average     {load} (1, 5, 15 min) at start",
        f"metatrail python {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        f"cmflib python    {cmflib_python}",
        f"tree measured    git {tree_state()}",
    ]


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f} ms"


def _s(s: float) -> str:
    return f"{s:,.2f} s"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def report(n: int, facts: list[str], mt_a: dict[str, Any], mt_b: dict[str, Any], cmf: dict[str, Any],
           wall_s: float) -> tuple[list[str], bool]:
    c = cmf["per_execution"]
    a_d, a_c, b_c = mt_a["durable"], mt_a["caller"], mt_b["caller"]
    b_per = mt_b["loop_total_s"] / n
    lines = [f"metatrail vs cmflib 0.1.0, {n} executions each, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", ""]
    lines += facts
    lines += [
        "",
        "versions",
        "  metatrail {metatrail}, openlineage-python {openlineage-python}, SQLAlchemy {sqlalchemy}, "
        "SQLite {sqlite}, orjson {orjson}, Python {python}".format(**mt_a["versions"]),
        "  cmflib {cmflib}, dvc {dvc}, ml-metadata {ml-metadata}, protobuf {protobuf}, pip {pip}, "
        "Python {python}, {git};".format(**cmf["versions"]),
        "  cmflib's `pip freeze` (run by each create_execution) lists "
        f"{cmf['versions']['pip_freeze_packages']} packages",
        "",
        "workload: per execution 2 input files + 1 output file (~1.5 KB each, generated; one input is",
        "the previous execution's output), a 5-key params dict, 4 stages round-robin, one pipeline run.",
        "The task's work (writing the output) is untimed. metatrail: fresh store and hash cache per run",
        f"(every file hashed once), energy monitor {mt_a['energy_monitor']}, SQLite WAL with",
        "synchronous=NORMAL. cmflib: local MLMD SQLite, git + DVC scratch repo with a local DVC remote,",
        "no server, no neo4j.",
        "",
        "per execution                               median        p90           max           sum",
    ]

    def row(name: str, st: dict[str, float]) -> str:
        return (f"  {name:<40}{_ms(st['median']):>14}{_ms(st['p90']):>14}{_ms(st['max']):>14}"
                f"{_ms(st['sum']):>14}")

    lines += [
        row("cmflib wall (all API calls)", c),
        row("cmflib CPU incl. child processes", cmf["per_execution_cpu"]),
        row("  create_execution", cmf["phases"]["create_execution"]),
        row("  log_dataset (per call, 3 per exec.)", cmf["phases"]["log_dataset"]),
        row("  create_context", cmf["phases"]["create_context"]),
        row("  finalize (git commit)", cmf["phases"]["finalize"]),
        row("metatrail durable (start+finish+flush)", a_d),
        row("  of which flush wait", mt_a["flush_wait"]),
        row("metatrail caller side, durable run", a_c),
        row("metatrail caller side, pipelined run", b_c),
        f"  metatrail pipelined, until stored        {_ms(b_per):>14} per execution "
        f"(total incl. final flush / {n})",
        "",
        "totals",
        f"  cmflib: import {_s(cmf['import_s'])}, Cmf() {_s(cmf['construct_s'])}, {n} executions "
        f"{_s(c['sum'])}  (scratch repo setup {_s(cmf['repo_setup_s'])}, not counted)",
        f"  metatrail durable: import {_ms(mt_a['import_s'])}, setup {_ms(mt_a['setup_s'])}, {n} executions "
        f"{_ms(a_d['sum'])} (execution 1: {_ms(mt_a['durable_s'][0])}, its caller side "
        f"{_ms(mt_a['caller_s'][0])}: energy monitor start-up)",
        f"  metatrail pipelined: import {_ms(mt_b['import_s'])}, setup {_ms(mt_b['setup_s'])}, "
        f"{n} executions until stored {_ms(mt_b['loop_total_s'])} (final flush {_ms(mt_b['final_flush_s'])})",
        "",
    ]
    ratios = [
        ("per-execution median, cmflib / metatrail durable", _ratio(c["median"], a_d["median"]), True),
        ("per-execution p90, cmflib / metatrail durable", _ratio(c["p90"], a_d["p90"]), True),
        ("all executions, cmflib / metatrail durable", _ratio(c["sum"], a_d["sum"]), True),
        ("all executions, cmflib / metatrail pipelined (incl. flush)",
         _ratio(c["sum"], mt_b["loop_total_s"]), True),
        ("executions 2..N (no start-up), cmflib / metatrail durable",
         _ratio(sum(cmf["per_execution_s"][1:]), sum(mt_a["durable_s"][1:])), False),
        ("per-execution median, cmflib / metatrail caller side", _ratio(c["median"], b_c["median"]), False),
        ("end to end incl. import + setup, cmflib / metatrail pipelined",
         _ratio(cmf["import_s"] + cmf["construct_s"] + c["sum"],
                mt_b["import_s"] + mt_b["setup_s"] + mt_b["loop_total_s"]), False),
    ]
    lines.append(f"ratios (target: metatrail >= {TARGET_RATIO:,.0f}x faster)")
    ok = True
    for name, value, judged in ratios:
        verdict = ("PASS" if value >= TARGET_RATIO else "MISS") if judged else ""
        ok = ok and (value >= TARGET_RATIO or not judged)
        lines.append(f"  {name:<63}{value:>12,.0f}x  {verdict}")
    sa, sc = mt_a["stored"], cmf["stored"]
    lines += [
        "",
        "what was stored (checked after each run)",
        f"  metatrail durable: {sa['events']} events, {sa['executions']} executions {sa['states']}, "
        f"{sa['artifacts']} artifacts, {sa['edges_with_hash']}/{sa['edges']} edges with a content hash, "
        f"{sa['db_bytes']:,} bytes; failed writes {mt_a['failed_writes']}, dropped {mt_a['dropped']}",
        f"  metatrail pipelined: {mt_b['stored']['events']} events, {mt_b['stored']['executions']} "
        f"executions, {mt_b['stored']['edges_with_hash']}/{mt_b['stored']['edges']} edges with a hash",
        f"  cmflib: {sc['executions']} executions, {sc['artifacts']} artifacts {sc['artifact_types']} "
        f"(Environment = its pip freeze), {sc['events']} events, MLMD {sc['mlmd_bytes']:,} bytes, "
        f"{sc['git_commits']} git commits",
        "",
        "load average (1 min) during the runs: "
        f"metatrail durable {mt_a['load_before'][0]:.2f}->{mt_a['load_after'][0]:.2f}, "
        f"pipelined {mt_b['load_before'][0]:.2f}->{mt_b['load_after'][0]:.2f}, cmflib median "
        f"{cmf['load_during']['median']:.2f} (min {cmf['load_during']['min']:.2f}, "
        f"max {cmf['load_during']['max']:.2f}), at end {os.getloadavg()[0]:.2f}",
        f"bench wall time {wall_s:,.0f} s; command: python bench/bench_cmflib.py --executions {n}",
    ]
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executions", type=int, default=20)
    parser.add_argument("--cmflib-python", type=Path, default=None,
                        help=f"python of an environment with {CMFLIB_REQUIREMENT} (default: {DEFAULT_ENV}, "
                        "created when missing)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tmp", type=Path, default=None, help="where the scratch directories go")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    parser.add_argument("--worker", choices=["metatrail"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["durable", "pipelined"], default="durable", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="profile metatrail's durable path even when the target is met")
    parser.add_argument("--profile-executions", type=int, default=200,
                        help="executions of the profiled metatrail run (default 200)")
    args = parser.parse_args(argv)
    if args.executions < 1:
        parser.error("--executions must be at least 1")

    if args.worker == "metatrail":
        result = run_metatrail(args.workdir.resolve(), args.executions, args.mode, args.profile_worker)
        print(METATRAIL_MARKER + json.dumps(result), flush=True)
        return 0

    started = time.perf_counter()
    python = ensure_cmflib_env(args.cmflib_python)
    facts = machine_facts(python)
    tmp = Path(tempfile.mkdtemp(prefix="metatrail-bench-cmflib-", dir=args.tmp))
    try:
        print(f"metatrail, durable per execution ({args.executions} executions) ...", file=sys.stderr,
              flush=True)
        mt_a = run_metatrail_worker(tmp, args.executions, "durable")
        print(f"metatrail, pipelined ({args.executions} executions) ...", file=sys.stderr, flush=True)
        mt_b = run_metatrail_worker(tmp, args.executions, "pipelined")
        print(f"cmflib ({args.executions} executions; seconds each) ...", file=sys.stderr, flush=True)
        cmf = run_cmflib_worker(tmp, args.executions, python)
        lines, ok = report(args.executions, facts, mt_a, mt_b, cmf, time.perf_counter() - started)
        if not ok or args.profile:
            n_prof = max(args.executions, args.profile_executions)
            print(f"profiling metatrail's durable path ({n_prof} executions) ...", file=sys.stderr, flush=True)
            prof = run_metatrail_worker(tmp, n_prof, "durable", profile=True)
            d = prof["durable"]
            lines += ["", f"where metatrail's durable time goes ({n_prof} executions under cProfile, "
                      f"load {prof['load_before'][0]:.2f}; durable median {_ms(d['median'])}, "
                      f"flush wait median {_ms(prof['flush_wait']['median'])}, profiler overhead included)",
                      *prof["profile"]]
    finally:
        if args.keep:
            print(f"scratch directories kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    with args.out.open("a") as fh:  # the raw numbers, so the summary can be re-derived
        fh.write("\nraw per-execution seconds\n")
        fh.write(f"  cmflib wall      {json.dumps([round(x, 3) for x in cmf['per_execution_s']])}\n")
        fh.write(f"  metatrail durable {json.dumps([round(x, 5) for x in mt_a['durable_s']])}\n")
        fh.write(f"  metatrail caller (pipelined) {json.dumps([round(x, 6) for x in mt_b['caller_s']])}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
