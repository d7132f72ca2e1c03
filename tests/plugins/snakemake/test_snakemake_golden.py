"""Golden events: a real Snakemake run of workflows/demo (shell and script rules, expand() fan-out, a job that fails
under --keep-going), then a rerun that completes it. Every event must be valid OpenLineage, and the normalised events
must equal the reviewed file golden/demo.json (golden/demo.snakemake-9.0.json on Snakemake 9.0, which sends no
config hash and computes fewer resources)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from golden import assert_golden, normalise
from olspec import assert_valid
from smkrun import (
    GOLDEN,
    Snakemake,
    by_job,
    dataset_versions,
    execution_facet,
    golden_name,
    md5,
    read_events,
    stable_order,
)


def test_fanout_failure_and_rerun_match_golden_events(snakemake: Snakemake, tmp_path: Path) -> None:
    wf = snakemake.workflow("demo")
    (wf / "FAIL_b").write_text("")
    first = snakemake.run(wf, "--cores", "1", "--keep-going")
    assert first.returncode == 1, first.stderr
    (wf / "FAIL_b").unlink()
    second = snakemake.run(wf, "--cores", "1")
    assert second.returncode == 0, second.stderr
    for result in (first, second):
        assert "metatrail:" not in result.stderr, result.stderr  # the plugin logged no problem

    events = read_events()
    for event in events:
        assert_valid(event)
    jobs = by_job(events)

    # Run 1: both samples made, a checked, b failed with its shell's exit status; nothing downstream of b ran.
    # Run 2: only the failed job and what depends on it ran; up-to-date jobs are not recorded again.
    assert [e["eventType"] for e in jobs["demo"]] == ["START", "FAIL", "START", "COMPLETE"]
    assert sorted(e["eventType"] for e in jobs["demo.make"]) == ["COMPLETE", "COMPLETE", "START", "START"]
    assert sorted(e["eventType"] for e in jobs["demo.check"]) == ["COMPLETE", "COMPLETE", "FAIL", "START", "START",
                                                                  "START"]
    assert [e["eventType"] for e in jobs["demo.summarize"]] == ["START", "COMPLETE"]
    failed = next(e for e in jobs["demo.check"] if e["eventType"] == "FAIL")
    assert execution_facet(failed)["exitCode"] == 3
    assert "exit status 3" in failed["run"]["facets"]["errorMessage"]["message"]
    assert execution_facet(failed)["params"]["wildcards"] == {"sample": "b"}

    # Every execution is a child of its own pipeline run.
    runs = [e["run"]["runId"] for e in jobs["demo"] if e["eventType"] == "START"]
    for name, evs in jobs.items():
        for e in evs:
            if name != "demo":
                assert e["run"]["facets"]["parent"]["run"]["runId"] in runs

    # Hashes are the files' DVC md5s; params include the rule's params from Snakemake's metadata.
    report = next(e for e in jobs["demo.summarize"] if e["eventType"] == "COMPLETE")
    assert dataset_versions(report["outputs"]) == {str(wf / "report.txt"): md5(wf / "report.txt")}
    assert dataset_versions(report["inputs"]) == {str(wf / f"checked/{s}.txt"): md5(wf / f"checked/{s}.txt")
                                                  for s in "ab"}
    assert execution_facet(report)["params"]["params"] == ["'demo report'"]
    make = next(e for e in jobs["demo.make"] if e["eventType"] == "COMPLETE")
    assert execution_facet(make)["params"]["resources"]["mem_mb"] == 50
    assert execution_facet(make)["extra"]["shellcmd"].startswith("printf")

    actual = normalise(stable_order(events), paths={str(tmp_path): "<tmp>", tempfile.gettempdir(): "<systmp>"})
    assert_golden(actual, GOLDEN / golden_name("demo"))
