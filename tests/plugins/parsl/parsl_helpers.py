"""Helpers for the Parsl plugin tests: run the real workflow script in a subprocess, read what it recorded.

Workflows run as subprocesses because that is how users run them (apps defined in ``__main__`` are shipped to HTEX
workers by value) and because each run must start with a fresh DataFlowKernel, recorder and environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from golden import normalise

HERE = Path(__file__).parent
PIPELINE = HERE / "workflows" / "pipeline.py"
RUN_TIMEOUT = 300  # HTEX start-up alone takes 5-15 s on a loaded 2-core machine

# What the workflow's apps return, with or without the plugin (tests compare every run with this).
EXPECTED_RESULTS = {"bad": "ValueError", "cached_again": 101, "cached_executions": 1, "cached_first": 101,
                    "downstream": "DependencyError", "final": 30, "flaky": "recovered", "join": 5,
                    "squares": [0, 1, 4], "total": 5}


def store_url() -> str:
    """The store the autouse fixture in tests/conftest.py set for this test."""
    return os.environ["METATRAIL_STORE"]


def run_pipeline(workdir: Path, executor: str, mode: str, phases: str = "all", *,
                 env: Mapping[str, str] | None = None, prefix: list[str] | None = None) -> dict[str, Any]:
    """Run workflows/pipeline.py in ``workdir``; return its RESULTS (the process must exit 0)."""
    return run_script(workdir, PIPELINE, [executor, mode, phases], env=env, prefix=prefix)


def run_script(workdir: Path, script: Path, args: list[str], *, env: Mapping[str, str] | None = None,
               prefix: list[str] | None = None) -> dict[str, Any]:
    """Run a workflow script in ``workdir``; return its RESULTS (the process must exit 0)."""
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    # HTEX starts `interchange.py` and `process_worker_pool.py` by name: they are scripts of this environment.
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    cmd = [sys.executable, *(prefix or []), str(script), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"workflow failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"no RESULTS line:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results: dict[str, Any] = json.loads(lines[-1][len("RESULTS "):])
    results["_stderr"] = proc.stderr
    return results


def outcome(results: dict[str, Any]) -> dict[str, Any]:
    """The apps' results without the captured stderr."""
    return {k: v for k, v in results.items() if not k.startswith("_")}


def stored_events(url: str | None = None) -> list[dict[str, Any]]:
    """Every event in the store, in log order."""
    from metatrail.store import open_store

    with open_store(url or store_url()) as store:
        return [e.body for e in store.iter_events()]


_TYPE_ORDER = {"START": 0, "RUNNING": 1, "COMPLETE": 2, "FAIL": 2, "ABORT": 2}


def golden_view(events: list[dict[str, Any]], tmp: Path) -> list[Any]:
    """Events normalised for a golden file, in an order that does not depend on timing.

    ``golden.normalise`` orders events of one job by eventTime, and concurrent tasks of one app finish in any order;
    so events are first put in Parsl's own order (task id, try) and given one common eventTime (which normalise
    replaces by ``<time>`` anyway), making run-id numbering the same in every run.
    """
    def key(e: dict[str, Any]) -> tuple[Any, ...]:
        facet = e["run"]["facets"]["metatrail_execution"]
        extra = facet.get("extra") or {}
        return (e["job"]["name"], _TYPE_ORDER.get(e["eventType"], 3), extra.get("parsl_task_id", -1),
                facet.get("tryNumber") or 0, str(extra.get("run_dir", "")))

    ordered = [dict(e, eventTime="2000-01-01T00:00:00+00:00") for e in sorted(events, key=key)]
    return normalise(ordered, paths={str(tmp): "<tmp>"})
