"""Zero-code activation: the runner (``python -m metatrail.plugins.parsl script.py``) and the ``.pth`` hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from golden import assert_golden
from olspec import assert_valid
from parsl_helpers import EXPECTED_RESULTS, HERE, golden_view, outcome, run_pipeline, run_script, stored_events

from metatrail.hashing import hash_path
from metatrail.plugins.parsl import autoload

GOLDEN = Path(__file__).parent / "golden"
WORKER_ENV = HERE / "workflows" / "worker_env.py"
WITHOUT_METATRAIL = HERE / "workflows" / "without_metatrail"  # on the workers' PYTHONPATH: metatrail not found
RUNNER = ["-m", "metatrail.plugins.parsl"]

# How site.py processes a .pth in site-packages, applied to a temporary directory (the test must not install
# anything into the environment); the script then runs as `python pipeline.py` would run it.
RUN_WITH_SITE_DIR = ("import runpy, site, sys; site.addsitedir(sys.argv[1]); sys.argv = sys.argv[2:]; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_runner_records_an_unmodified_script(tmp_path: Path) -> None:
    results = run_pipeline(tmp_path / "work", "threads", "plain", prefix=["-m", "metatrail.plugins.parsl"])
    assert outcome(results) == EXPECTED_RESULTS
    # the same events as with track(config) in the script
    assert_golden(golden_view(stored_events(), tmp_path), GOLDEN / "threads.json")


def test_pth_hook_with_env_var_records(tmp_path: Path) -> None:
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / autoload.PTH_NAME).write_text(autoload.PTH_LINE)
    results = run_pipeline(tmp_path / "work", "threads", "plain", env={"METATRAIL_PARSL": "1"},
                           prefix=["-c", RUN_WITH_SITE_DIR, str(site_dir)])
    assert outcome(results) == EXPECTED_RESULTS
    assert_golden(golden_view(stored_events(), tmp_path), GOLDEN / "threads.json")


def test_pth_hook_costs_nothing_unless_enabled(tmp_path: Path) -> None:
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / autoload.PTH_NAME).write_text(autoload.PTH_LINE)
    probe = ("import site, sys; site.addsitedir(sys.argv[1]); "
             "print(sorted(m for m in ('metatrail', 'parsl') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "METATRAIL_PARSL"}
    off = subprocess.run([sys.executable, "-c", probe, str(site_dir)], env=env, capture_output=True, text=True)
    on = subprocess.run([sys.executable, "-c", probe, str(site_dir)], env={**env, "METATRAIL_PARSL": "1"},
                        capture_output=True, text=True)
    assert off.stdout.strip() == "[]", off.stderr
    assert on.stdout.strip() == "['metatrail']", on.stderr  # the hook waits for parsl; it does not import it



def test_runner_records_from_the_dfk_for_workers_without_metatrail_when_told(tmp_path: Path) -> None:
    work = tmp_path / "work"
    results = run_script(work, WORKER_ENV, [str(WITHOUT_METATRAIL)], env={"METATRAIL_PARSL_WORKER_SIDE": "0"},
                         prefix=RUNNER)
    assert outcome(results) == {"double": [0, 2, 4], "write": 5}  # nothing of ours travelled to the workers
    assert "metatrail:" not in results["_stderr"], results["_stderr"]
    events = stored_events()
    for event in events:
        assert_valid(event)
    facets = [(e, e["run"]["facets"]["metatrail_execution"]) for e in events]
    (dfk_pid,) = {f["pid"] for e, f in facets if e["job"]["name"] == "worker_env"}
    tries = [(e, f) for e, f in facets if f["kind"] == "execution"]
    assert sorted((e["job"]["name"], e["eventType"], f["extra"]["parsl_task_id"]) for e, f in tries) == sorted(
        [(f"worker_env.{app}", t, tid) for app, tid in [("double", 0), ("double", 1), ("double", 2), ("write", 3)]
         for t in ("START", "COMPLETE")])
    assert all(f["pid"] == dfk_pid for _, f in tries)  # recorded in the DFK, not on a worker
    (written,) = [d for e, _ in tries if e["eventType"] == "COMPLETE" for d in e["outputs"]]
    assert written["facets"]["metatrail_artifact"]["hash"] == hash_path(str(work / "out.txt")).hash.value


def test_runner_names_the_switch_when_workers_cannot_import_metatrail(tmp_path: Path) -> None:
    # Worker-side recording (the default) ships the task wrapper; these workers cannot unpickle it, and Parsl fails
    # the tasks as it would for any task its workers cannot load. The DFK says once how to fix it.
    results = run_script(tmp_path / "work", WORKER_ENV, [str(WITHOUT_METATRAIL)], prefix=RUNNER)
    assert outcome(results) == {"double": ["ModuleNotFoundError"] * 3, "write": "ModuleNotFoundError"}
    assert results["_stderr"].count("cannot import metatrail") == 1, results["_stderr"]
    assert "set METATRAIL_PARSL_WORKER_SIDE=0" in results["_stderr"]
    fails = [e["run"]["facets"]["metatrail_execution"] for e in stored_events() if e["eventType"] == "FAIL"]
    assert sorted(f["kind"] for f in fails) == ["execution"] * 4 + ["pipeline_run"]
    assert all(f["extra"]["recorded_by"] == "dfk" for f in fails if f["kind"] == "execution")
