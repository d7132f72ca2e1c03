"""Real Snakemake runs of the features the plugin must handle: checkpoints with directory() outputs, temp()
intermediates (hashed before Snakemake deletes them), benchmark files, --quiet (no JOB_FINISHED records), dry runs,
the kill switch, a run interrupted with Ctrl-C and then rerun, and jobs submitted through a cluster executor."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from olspec import assert_valid
from smkrun import (
    Snakemake,
    by_job,
    clean_run_events,
    dataset_versions,
    execution_facet,
    md5,
    read_events,
    store_url,
)

PARTS = {f"parts/p{i}.txt": f"part {i}\n" for i in (1, 2, 3)}


@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_checkpoint_directory_temp_and_benchmark(snakemake: Snakemake, quiet: bool) -> None:
    wf = snakemake.workflow("features")
    # The temp-file guard may hold a deletion up to METATRAIL_TIMEOUT (default 2 s) for the store to catch up; on a
    # loaded 2-core machine the store can be further behind, and this test is about the hashes, not the cap.
    result = snakemake.run(wf, "--cores", "2", *(["--quiet", "progress"] if quiet else []),
                           env={"METATRAIL_TIMEOUT": "30"})
    events = clean_run_events(result)
    jobs = by_job(events)
    assert {name: sorted(e["eventType"] for e in evs) for name, evs in jobs.items()} == {
        "features": ["COMPLETE", "START"],
        "features.split": ["COMPLETE", "START"],
        "features.double": ["COMPLETE"] * 3 + ["START"] * 3,
        "features.merge": ["COMPLETE", "START"],
        "features.all": ["COMPLETE", "START"],
    }

    # The checkpoint's directory() output is hashed as a DVC .dir manifest.
    split_end = next(e for e in jobs["features.split"] if e["eventType"] == "COMPLETE")
    assert execution_facet(split_end)["extra"]["is_checkpoint"] is True
    assert dataset_versions(split_end["outputs"]) == {str(wf / "parts"): md5(wf / "parts")}
    # three parts and the empty .snakemake_timestamp Snakemake puts in every directory() output
    assert split_end["outputs"][0]["facets"]["metatrail_artifact"]["nfiles"] == 4

    # temp() files are gone now, yet both their producer and their consumer recorded the right hash.
    expected_temp = {}
    for i in (1, 2, 3):
        assert not (wf / f"doubled/p{i}.txt").exists()
        expected_temp[str(wf / f"doubled/p{i}.txt")] = hashlib.md5((PARTS[f"parts/p{i}.txt"] * 2).encode()).hexdigest()
    produced = {}
    for e in jobs["features.double"]:
        if e["eventType"] == "COMPLETE":
            produced.update(dataset_versions(e["outputs"]))
    assert produced == expected_temp
    merge_start = next(e for e in jobs["features.merge"] if e["eventType"] == "START")
    assert dataset_versions(merge_start["inputs"]) == expected_temp
    pipeline_end = next(e for e in jobs["features"] if e["eventType"] == "COMPLETE")
    assert sorted(execution_facet(pipeline_end)["extra"]["temp_removed"]) == sorted(expected_temp)

    # The benchmark file is recorded as an output, next to the rule's output.
    merge_end = next(e for e in jobs["features.merge"] if e["eventType"] == "COMPLETE")
    assert dataset_versions(merge_end["outputs"]) == {
        str(wf / "merged.txt"): md5(wf / "merged.txt"),
        str(wf / "benchmarks/merge.tsv"): md5(wf / "benchmarks/merge.tsv"),
    }
    # A job ends when its last product was written (not when Snakemake noticed), and never before it started.
    for evs in jobs.values():
        start = next(e for e in evs if e["eventType"] == "START")
        for end in (e for e in evs if e["eventType"] == "COMPLETE" and e["run"]["runId"] == start["run"]["runId"]):
            assert end["eventTime"] >= start["eventTime"]
    written = max(os.stat(wf / "merged.txt").st_mtime, os.stat(wf / "benchmarks/merge.tsv").st_mtime)
    assert merge_end["eventTime"] == _iso(max(written, _ts(merge_start["eventTime"])))


def _iso(ts: float) -> str:
    from metatrail.openlineage.events import iso_time

    return iso_time(ts)


def test_dry_run_and_kill_switch_record_nothing(snakemake: Snakemake) -> None:
    store_file = Path(store_url().removeprefix("sqlite:///"))
    wf = snakemake.workflow("features")
    dry = snakemake.run(wf, "--cores", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not store_file.exists()
    off = snakemake.run(wf, "--cores", "1", env={"METATRAIL_DISABLED": "1"})
    assert off.returncode == 0, off.stderr
    assert (wf / "merged.txt").exists()
    assert not store_file.parent.exists()  # not even the store's directory: no I/O at all


def test_interrupted_run_then_rerun(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("chain")
    (wf / "data").mkdir()
    (wf / "data/source.txt").write_text("# header\nalpha\nbeta\n")
    (wf / "Snakefile").write_text((wf / "Snakefile").read_text().replace(
        '"grep -v \'^#\' {input} > {output}"',
        '"grep -v \'^#\' {input} > {output}; touch started.flag; sleep {config[delay]}"'))
    proc = snakemake.popen(wf, "--cores", "1", "--until", "extract", "--config", "delay=60")
    try:
        deadline = time.monotonic() + 120
        while not (wf / "started.flag").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, output

    rerun = snakemake.run(wf, "--cores", "1", "--until", "extract", "--rerun-incomplete", "--config", "delay=0")
    assert rerun.returncode == 0, rerun.stderr

    events = read_events()
    for event in events:
        assert_valid(event)
    jobs = by_job(events)
    pipeline_ends = [e for e in jobs["chain"] if e["eventType"] != "START"]
    assert [e["eventType"] for e in pipeline_ends] == ["ABORT", "COMPLETE"]
    assert pipeline_ends[0]["run"]["facets"]["errorMessage"]["message"] == "Snakemake was interrupted"
    extract_ends = [e for e in jobs["chain.extract"] if e["eventType"] != "START"]
    assert [e["eventType"] for e in extract_ends] in (["FAIL", "COMPLETE"], ["ABORT", "COMPLETE"])
    assert dataset_versions(extract_ends[1]["outputs"]) == {str(wf / "stage1.txt"): md5(wf / "stage1.txt")}
    # Two pipeline runs, each execution under its own.
    assert extract_ends[0]["run"]["facets"]["parent"]["run"]["runId"] == pipeline_ends[0]["run"]["runId"]
    assert extract_ends[1]["run"]["facets"]["parent"]["run"]["runId"] == pipeline_ends[1]["run"]["runId"]


def test_cluster_executor_group_jobs(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("cluster")
    # Options both ways: a command-line option (pipeline name) and an environment variable (namespace).
    result = snakemake.run(wf, "--jobs", "2", "--executor", "cluster-generic",
                           "--cluster-generic-submit-cmd", "./submit.sh", "--seconds-between-status-checks", "1",
                           "--logger-metatrail-pipeline", "clustered",
                           env={"SNAKEMAKE_LOGGER_METATRAIL_NAMESPACE": "hpc"})
    events = clean_run_events(result)
    jobs = by_job(events)
    for rule, group in (("a", "g1"), ("b", "g1"), ("c", None)):
        evs = jobs[f"clustered.{rule}"]
        assert sorted(e["eventType"] for e in evs) == ["COMPLETE", "START"]
        start, end = sorted(evs, key=lambda e: e["eventType"] != "START")
        extra = execution_facet(end)["extra"]
        assert extra["local"] is False and extra["group_id"] == group
        # Jobs ran outside the controller: the end is the output's mtime, not Snakemake's next status check.
        out = wf / f"{rule}.txt"
        assert dataset_versions(end["outputs"]) == {str(out): md5(out)}
        assert end["eventTime"] == _iso(max(os.stat(out).st_mtime, _ts(start["eventTime"])))
    assert [e["eventType"] for e in jobs["clustered"]] == ["START", "COMPLETE"]
    assert {e["job"]["namespace"] for e in events} == {"hpc"}


def _ts(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()
