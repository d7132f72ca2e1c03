"""Hook-level lineage end to end: ``airflow dags test`` of ``mt_hook_lineage``, whose tasks touch files only through
``ObjectStoragePath`` (no inlets, outlets, path arguments or returned paths), so every dataset recorded here came
from Airflow's hook-lineage collector. Also: the collector under ``dags test`` is one for the whole run, it merges
repeated accesses into one entry, and it stops at its limit."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("airflow", reason="Airflow tests run in the Airflow environment: nox -s airflow")

from airflow_support import DAGS, AirflowHome, DagRun, by_job, dags_test

from metatrail.hashing import hash_path

FULL = "metatrail: Airflow's hook-lineage collector holds its limit of 100 inputs or outputs"


@pytest.fixture(scope="module")
def hook_run(airflow_home: AirflowHome, tmp_path_factory: pytest.TempPathFactory) -> DagRun:
    run = dags_test(airflow_home, tmp_path_factory.mktemp("hook_lineage"), "mt_hook_lineage",
                    "2024-02-01T00:00:00+00:00", dagfile=DAGS / "mt_hook_lineage.py")
    assert run.proc.returncode == 0, run.output[-5000:]
    return run


def _end(run: DagRun, task_id: str) -> dict[str, Any]:
    events = by_job(run.events())[f"mt_hook_lineage.{task_id}"]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"], task_id
    return events[-1]


def _datasets(event: dict[str, Any], side: str) -> dict[str, str | None]:
    return {d["name"]: d["facets"]["metatrail_artifact"]["hash"] for d in event.get(side, [])}


def _md5(path: Any) -> str:
    ref = hash_path(path)
    assert ref.hash is not None
    return ref.hash.value


def test_files_read_and_written_through_object_storage_path_are_the_tasks_inputs_and_outputs(
        hook_run: DagRun) -> None:
    data = hook_run.data
    assert (data / "copied.txt").read_text() == "READ THROUGH A HOOK\n"  # the task did its work unchanged
    copy = _end(hook_run, "copy_through_hooks")
    assert copy["run"]["facets"]["metatrail_execution"]["params"] == {}  # nothing but the hooks names a file
    assert _datasets(copy, "inputs") == {str(data / "source.txt"): _md5(data / "source.txt")}
    assert _datasets(copy, "outputs") == {str(data / "copied.txt"): _md5(data / "copied.txt")}
    # The task before wrote source.txt with plain open(): no dataset of its own, and none of the next task's.
    seed = _end(hook_run, "seed")
    assert (seed.get("inputs", []), seed.get("outputs", [])) == ([], [])


def test_a_repeated_read_that_the_collector_merged_into_an_earlier_tasks_entry_is_still_this_tasks_input(
        hook_run: DagRun) -> None:
    data = hook_run.data
    reread = _end(hook_run, "reread")
    assert _datasets(reread, "inputs") == {str(data / "source.txt"): _md5(data / "source.txt")}
    assert reread.get("outputs", []) == []


def test_lineage_the_full_collector_drops_is_missing_and_said_once(hook_run: DagRun) -> None:
    data = hook_run.data
    # copy_through_hooks's output took one of the 100 places of the run's one collector: 99 fillers got in.
    fill = _end(hook_run, "fill")
    written = _datasets(fill, "outputs")
    assert len(written) == 99
    assert set(written) == {str(data / f"filler-{i:03d}.txt") for i in range(99)}
    assert written[str(data / "filler-042.txt")] == _md5(data / "filler-042.txt")
    late = _end(hook_run, "after_full")
    assert (data / "late.txt").exists()
    assert late.get("outputs", []) == []  # dropped by Airflow's collector, not by the plugin
    assert hook_run.output.count(FULL) == 1, hook_run.output[-3000:]
    assert hook_run.output.count("metatrail:") == 1  # no other warning
