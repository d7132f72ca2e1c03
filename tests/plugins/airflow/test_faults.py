"""The plugin never harms a task: with metatrail switched off, raising, hanging, or writing to a store that hangs or
cannot be written, ``airflow dags test mt_faults`` ends with the same task states, XComs and files, in bounded time,
and each problem is logged once.

Faults are injected inside the real Airflow process by the test DAG itself (``dags/mt_faults.py``), see there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import DAGS, AirflowHome, DagRun, dags_test

# Far below the ten minutes an injected fault blocks for, far above a normal run (15-40 s on this machine).
BOUND_S = 300


def _run(home: AirflowHome, tmp_path: Path, day: int, env: dict[str, str | None]) -> DagRun:
    return dags_test(home, tmp_path, "mt_faults", f"2024-02-{day:02d}T00:00:00+00:00", dagfile=DAGS / "mt_faults.py",
                     env=env)


def assert_tasks_unaffected(home: AirflowHome, run: DagRun) -> None:
    """Same outcome as a run without metatrail: exit 0, every task succeeded, same XCom, same files."""
    assert run.proc.returncode == 0, run.output[-5000:]
    assert home.task_states("mt_faults", run.run_id) == {
        ("write", -1): "success", ("measure", -1): "success", ("shell", -1): "success"}
    assert home.xcom("mt_faults", run.run_id, "measure") == 48
    assert (run.data / "copied.txt").read_text() == "payload\n"
    assert run.seconds < BOUND_S


def _lines(run: DagRun, text: str) -> int:
    return sum(text in line for line in run.output.splitlines())


def test_kill_switch_does_no_io_and_changes_nothing(airflow_home: AirflowHome, tmp_path: Path) -> None:
    run = _run(airflow_home, tmp_path, 1, {"METATRAIL_DISABLED": "1"})
    assert_tasks_unaffected(airflow_home, run)
    assert list(run.store.parent.iterdir()) == []  # no store, no hash cache: nothing was opened
    assert "metatrail:" not in run.output


def test_metatrail_section_of_airflow_cfg_disables_recording(airflow_home: AirflowHome, tmp_path: Path) -> None:
    config = tmp_path / "airflow.cfg"
    config.write_text((airflow_home.path / "airflow.cfg").read_text() + "\n[metatrail]\ndisabled = True\n")
    run = _run(airflow_home, tmp_path, 2, {"AIRFLOW_CONFIG": str(config)})
    assert_tasks_unaffected(airflow_home, run)
    assert list(run.store.parent.iterdir()) == []


def _collector_type(home: AirflowHome, env: dict[str, str]) -> str:
    """The class of the hook-lineage collector Airflow gives a fresh process (it loads the plugins to decide)."""
    code = "from airflow.sdk.lineage import get_hook_lineage_collector as g; print(type(g()).__name__)"
    done = subprocess.run([sys.executable, "-c", code], env={**home.env, **env}, cwd=home.path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_kill_switch_leaves_airflow_hook_lineage_off(airflow_home: AirflowHome) -> None:
    assert _collector_type(airflow_home, {}) == "HookLineageCollector"  # our reader switches it on
    assert _collector_type(airflow_home, {"METATRAIL_DISABLED": "1"}) == "NoOpCollector"
    assert _collector_type(airflow_home, {"AIRFLOW__METATRAIL__DISABLED": "True"}) == "NoOpCollector"


def test_plugin_code_raising_is_logged_once_per_hook_and_harmless(airflow_home: AirflowHome, tmp_path: Path) -> None:
    run = _run(airflow_home, tmp_path, 3, {"MT_TEST_FAULT": "raise"})
    assert_tasks_unaffected(airflow_home, run)
    # three tasks, yet each hook's failure is reported once
    for hook in ("on_task_instance_running", "on_task_instance_success", "on_dag_run_success"):
        assert _lines(run, f"metatrail: {hook} failed (RuntimeError: injected fault)") == 1, hook
    assert run.events() == []


def test_a_hanging_hook_is_cut_off_by_the_time_cap(airflow_home: AirflowHome, tmp_path: Path) -> None:
    run = _run(airflow_home, tmp_path, 4, {"MT_TEST_FAULT": "hang", "AIRFLOW__METATRAIL__HOOK_TIMEOUT": "1"})
    assert_tasks_unaffected(airflow_home, run)
    assert _lines(run, "metatrail: on_task_instance_running took longer than 1.0s") == 1
    # the stuck call keeps its thread; later hooks return at once instead of each waiting out the cap: start hooks
    # are skipped, end hooks wait in a queue behind it (they run if it ever ends)
    assert _lines(run, "metatrail: skipping on_task_instance_running") == 1
    assert _lines(run, "metatrail: on_task_instance_success queued behind on_task_instance_running") == 1
    assert "skipping on_task_instance_success" not in run.output


def test_a_hanging_store_costs_bounded_waits(airflow_home: AirflowHome, tmp_path: Path) -> None:
    run = _run(airflow_home, tmp_path, 5, {"MT_TEST_FAULT": "slow_store", "METATRAIL_TIMEOUT": "1",
                                           "METATRAIL_FLUSH_TIMEOUT": "2"})
    assert_tasks_unaffected(airflow_home, run)
    # `dags test` runs every task in its one process, which flushes once, at exit (bounded by flush_timeout);
    # the per-task wait of a task-runner process is covered in test_units.
    assert _lines(run, "events were not stored before exit (flush timeout 2s)") == 1
    assert run.events() == []


def test_an_unwritable_store_is_reported_and_harmless(airflow_home: AirflowHome, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    run = _run(airflow_home, tmp_path, 6, {"METATRAIL_STORE": f"sqlite:///{blocker}/metatrail.db",
                                           "METATRAIL_HASH_CACHE": str(blocker / "hashcache.db")})
    assert_tasks_unaffected(airflow_home, run)
    assert _lines(run, "metatrail: cannot write to the store (") == 1
    assert "could not be stored and were dropped" in run.output
    assert blocker.read_text() == ""
