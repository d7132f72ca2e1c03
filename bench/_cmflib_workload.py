"""The workload of ``bench_cmflib.py``, shared by both sides; run as a script, it is HPE cmflib's side.

``bench_cmflib.py`` (metatrail's interpreter) imports the shared workload definition from here; run as
``<cmflib venv>/bin/python bench/_cmflib_workload.py --workdir DIR --executions N`` it runs in cmflib's
own interpreter (cmflib 0.1.0 needs Python < 3.12 and pins its own dependencies). Standard library only,
apart from cmflib itself.

The workload (the same for both tools): a pipeline ``bench`` of N executions over four stages; execution
``i`` reads two small generated files (a fresh ``raw_i.csv`` and the previous execution's output, or
``seed.csv`` for the first), writes one output ``out_i.csv`` and has a parameter dict.

cmflib's side goes through its explicit API, as its docs show: ``Cmf(filepath=..., pipeline_name=...)``,
then per execution ``create_context``, ``create_execution``, ``log_dataset(input)`` twice, (the task
writes its output), ``log_dataset(output)``, ``finalize`` (git commit of the ``.dvc`` files). cmflib needs
a git work tree with a git remote and a DVC repository with a default remote, so the script first builds
one in ``--workdir``: ``git init``, an empty commit, a bare repository as remote ``cmf_origin``, ``dvc
init``, a local directory as the default DVC remote (what ``cmf init local`` sets up). Timing is done in
this process; the result is printed as one line ``CMFLIB_RESULT <json>``.
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
from collections import Counter
from pathlib import Path
from typing import Any

PIPELINE = "bench"
STAGES = ("prepare", "featurize", "train", "evaluate")
RESULT_MARKER = "CMFLIB_RESULT "


# -- the shared workload ----------------------------------------------------------------------------------
def params_for(i: int) -> dict[str, Any]:
    """The parameter dict of execution ``i``."""
    return {"seed": i, "learning_rate": 0.01, "model": "random_forest", "n_estimators": 100 + i, "split": 0.2}


def _csv(tag: str, i: int, rows: int = 64) -> bytes:
    lines = ["id,feature_a,feature_b,label"]
    lines += [f"{r},{(r * 7 + i) % 101 / 10:.1f},{(r * 13 + i) % 97},{tag}{(r + i) % 3}" for r in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def make_inputs(data_dir: Path, n: int) -> None:
    """Generate the workload's inputs (``seed.csv`` and ``raw_<i>.csv``, ~1.5 KB each) in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "seed.csv").write_bytes(_csv("s", -1))
    for i in range(n):
        (data_dir / f"raw_{i}.csv").write_bytes(_csv("r", i))


def write_output(data_dir: Path, i: int) -> Path:
    """What execution ``i``'s task does: write its output file."""
    path = data_dir / f"out_{i}.csv"
    path.write_bytes(_csv("o", i, rows=32))
    return path


def inputs_for(i: int) -> tuple[str, str]:
    """Execution ``i``'s two inputs, relative to the working directory."""
    return f"data/raw_{i}.csv", ("data/seed.csv" if i == 0 else f"data/out_{i - 1}.csv")


def summarize(values: list[float]) -> dict[str, float]:
    """median, p90, mean, min, max and sum of a list of seconds."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p90": quantile(ordered, 0.90),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "sum": sum(ordered),
    }


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank, so p99 of 5,000 is a measured value)."""
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))
    return ordered[k]


def cpu_seconds() -> float:
    """CPU of this process and of its waited-for children (cmflib's git / dvc / pip subprocesses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- cmflib's side ----------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def setup_repo(workdir: Path) -> None:
    """What cmflib's pre-checks demand: git work tree + git remote, DVC repo + default DVC remote."""
    repo = workdir / "repo"
    repo.mkdir(parents=True)
    _run(["git", "init", "-q", "-b", "master"], repo)
    _run(["git", "config", "user.email", "bench@example.invalid"], repo)
    _run(["git", "config", "user.name", "bench"], repo)
    _run(["git", "config", "commit.gpgsign", "false"], repo)
    _run(["git", "commit", "-q", "--allow-empty", "-m", "init"], repo)
    _run(["git", "init", "-q", "--bare", str(workdir / "origin.git")], repo)
    _run(["git", "remote", "add", "cmf_origin", str(workdir / "origin.git")], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)
    _run(["dvc", "remote", "add", "-d", "local-storage", str(workdir / "dvc-remote")], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "dvc init"], repo)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_cmflib(workdir: Path, n: int) -> dict[str, Any]:
    result: dict[str, Any] = {"executions": n, "load_before": os.getloadavg()}
    t = time.perf_counter()
    setup_repo(workdir)
    result["repo_setup_s"] = time.perf_counter() - t
    repo = workdir / "repo"
    os.chdir(repo)
    make_inputs(repo / "data", n)

    t = time.perf_counter()
    from cmflib.cmf import Cmf

    result["import_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cmf = Cmf(filepath=str(repo / "mlmd"), pipeline_name=PIPELINE)
    result["construct_s"] = time.perf_counter() - t

    phases: dict[str, list[float]] = {k: [] for k in
                                      ("create_context", "create_execution", "log_dataset", "finalize")}
    per_exec: list[float] = []
    per_exec_cpu: list[float] = []
    loads: list[float] = []
    for i in range(n):
        stage = STAGES[i % len(STAGES)]
        in_a, in_b = inputs_for(i)
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        cmf.create_context(pipeline_stage=stage)
        t1 = time.perf_counter()
        cmf.create_execution(execution_type=stage, custom_properties=params_for(i))
        t2 = time.perf_counter()
        cmf.log_dataset(in_a, "input")
        t3 = time.perf_counter()
        cmf.log_dataset(in_b, "input")
        t4 = time.perf_counter()
        c_task = cpu_seconds()
        out = write_output(repo / "data", i)  # the task itself: not timed
        c_task = cpu_seconds() - c_task
        t5 = time.perf_counter()
        cmf.log_dataset(str(out.relative_to(repo)), "output")
        t6 = time.perf_counter()
        cmf.finalize()
        t7 = time.perf_counter()
        per_exec_cpu.append(cpu_seconds() - c0 - c_task)
        phases["create_context"].append(t1 - t0)
        phases["create_execution"].append(t2 - t1)
        phases["log_dataset"] += [t3 - t2, t4 - t3, t6 - t5]
        phases["finalize"].append(t7 - t6)
        per_exec.append((t4 - t0) + (t7 - t5))
        loads.append(os.getloadavg()[0])
        print(f"cmflib execution {i + 1}/{n}: {per_exec[-1]:.2f} s", file=sys.stderr, flush=True)

    # Check that cmflib really recorded the workload.
    store = cmf.store
    executions = store.get_executions()
    artifacts = store.get_artifacts()
    events = store.get_events_by_execution_ids([e.id for e in executions])
    type_names = {t.id: t.name for t in store.get_artifact_types()}
    result.update({
        "per_execution_s": per_exec,
        "per_execution_cpu_s": per_exec_cpu,
        "per_execution": summarize(per_exec),
        "per_execution_cpu": summarize(per_exec_cpu),
        "phases": {k: summarize(v) for k, v in phases.items()},
        "load_during": summarize(loads),
        "load_after": os.getloadavg(),
        "stored": {
            "executions": len(executions),
            "artifacts": len(artifacts),
            "artifact_types": dict(Counter(type_names.get(a.type_id, str(a.type_id)) for a in artifacts)),
            "events": len(events),
            "mlmd_bytes": (repo / "mlmd").stat().st_size,
            "git_commits": int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=repo, check=True,
                                              capture_output=True, text=True).stdout),
        },
        "versions": {
            "python": sys.version.split()[0],
            "python_implementation": platform.python_implementation(),
            "cmflib": _version("cmflib"),
            "dvc": _version("dvc"),
            "ml-metadata": _version("ml-metadata"),
            "protobuf": _version("protobuf"),
            "pip": _version("pip"),
            "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
            "pip_freeze_packages": sum(1 for _ in subprocess.run(
                ["pip", "freeze"], capture_output=True, text=True).stdout.splitlines()),
        },
    })
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="an empty scratch directory")
    parser.add_argument("--executions", type=int, default=20)
    args = parser.parse_args(argv)
    result = run_cmflib(args.workdir.resolve(), args.executions)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
