"""Real Snakemake runs of two things that change where or how often a job runs: the Snakefile's ``workdir:``
directive (every path is relative to that directory, not to where Snakemake was started) and ``--retries`` (a
failed try followed by a successful one: the run succeeded), also where a try fails only in Snakemake's check after
its command (outputs missing, an ``ensure`` not met), for which Snakemake logs no ``JOB_ERROR``."""

from __future__ import annotations

import subprocess

import pytest
from olspec import assert_valid
from smkrun import Snakemake, by_job, clean_run_events, dataset_versions, execution_facet, md5, read_events


@pytest.mark.parametrize("quiet", [False, True], ids=["progress", "quiet"])
def test_paths_hashes_and_params_follow_the_workdir_directive(snakemake: Snakemake, quiet: bool) -> None:
    wf = snakemake.workflow("workdir")
    (wf / "results").mkdir()
    (wf / "a.txt").write_text("stale, in the launch directory\n")  # what the run must not be confused with
    result = snakemake.run(wf, "--cores", "1", *(["--quiet"] if quiet else []))
    events = clean_run_events(result)
    jobs = by_job(events)
    # Under --quiet Snakemake logs no JOB_FINISHED: job ends are inferred from outputs, which must be looked for in
    # the right directory, or every job of a successful run is ABORTed.
    assert {name: sorted(e["eventType"] for e in evs) for name, evs in jobs.items()} == {
        "workdir": ["COMPLETE", "START"],
        "workdir.a": ["COMPLETE", "START"],
        "workdir.b": ["COMPLETE", "START"],
        "workdir.all": ["COMPLETE", "START"],
    }
    results = wf / "results"
    pipeline_start = next(e for e in jobs["workdir"] if e["eventType"] == "START")
    assert execution_facet(pipeline_start)["extra"]["workdir"] == str(results)
    a_end = next(e for e in jobs["workdir.a"] if e["eventType"] == "COMPLETE")
    assert dataset_versions(a_end["outputs"]) == {str(results / "a.txt"): md5(results / "a.txt")}
    assert execution_facet(a_end)["params"]["params"] == ["7"]  # from the persistence record under results/
    b_start = next(e for e in jobs["workdir.b"] if e["eventType"] == "START")
    assert dataset_versions(b_start["inputs"]) == {str(results / "a.txt"): md5(results / "a.txt")}
    b_end = next(e for e in jobs["workdir.b"] if e["eventType"] == "COMPLETE")
    assert dataset_versions(b_end["outputs"]) == {str(results / "b.txt"): md5(results / "b.txt")}


def _tries(events: list[dict], job: str) -> list[str]:
    """The end event type of each execution of ``job``, in start order."""
    ends = {e["run"]["runId"]: e["eventType"] for e in events if e["job"]["name"] == job and e["eventType"] != "START"}
    starts = sorted((e["eventTime"], e["run"]["runId"]) for e in events
                    if e["job"]["name"] == job and e["eventType"] == "START")
    return [ends.get(run_id, "none") for _, run_id in starts]


def test_a_job_that_succeeds_on_retry_leaves_the_run_complete(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("retry")
    result = snakemake.run(wf, "--cores", "1", "--retries", "1")
    assert result.returncode == 0, result.stderr
    assert "Trying to restart job" in result.stderr
    events = read_events()
    for event in events:
        assert_valid(event)
    assert _tries(events, "retry.flaky") == ["FAIL", "COMPLETE"]  # one execution per try; the failed one stays
    assert [number for _, number, _ in _try_events(events, "retry.flaky")] == [1, 2]  # Snakemake's attempt
    failed = next(e for e in events if e["job"]["name"] == "retry.flaky" and e["eventType"] == "FAIL")
    assert execution_facet(failed)["exitCode"] == 3
    assert [e["eventType"] for e in by_job(events)["retry"]] == ["START", "COMPLETE"]
    pipeline_end = by_job(events)["retry"][1]
    assert "errorMessage" not in pipeline_end["run"]["facets"]


def test_a_job_that_fails_every_retry_fails_the_run(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("retry")
    result = snakemake.run(wf, "--cores", "1", "--retries", "1", "--config", "fails=5")
    assert result.returncode != 0
    events = read_events()
    assert _tries(events, "retry.flaky") == ["FAIL", "FAIL"]
    pipeline_end = by_job(events)["retry"][1]
    assert pipeline_end["eventType"] == "FAIL"
    assert pipeline_end["run"]["facets"]["errorMessage"]["message"]  # Snakemake's last error


def _try_events(events: list[dict], job: str) -> list[tuple[str, int, str]]:
    """(end event type, tryNumber, error message) of each execution of ``job``, in start order; every try has its
    own run id."""
    starts = sorted((e["eventTime"], e["run"]["runId"]) for e in events
                    if e["job"]["name"] == job and e["eventType"] == "START")
    assert len({run_id for _, run_id in starts}) == len(starts)
    ends = {e["run"]["runId"]: e for e in events if e["job"]["name"] == job and e["eventType"] != "START"}
    assert set(ends) == {run_id for _, run_id in starts}  # every try ended
    return [(ends[run_id]["eventType"], execution_facet(ends[run_id])["tryNumber"],
             ends[run_id]["run"]["facets"].get("errorMessage", {}).get("message", "")) for _, run_id in starts]


def _failed_run_events(result: subprocess.CompletedProcess[str]) -> list[dict]:
    """The stored events of a run that Snakemake ended with exit code 1, each checked against the schemas."""
    assert result.returncode == 1, result.stderr
    events = read_events()
    for event in events:
        assert_valid(event)
    return events


def test_a_try_whose_outputs_are_missing_fails_and_its_retry_completes_the_run(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("checks")
    result = snakemake.run(wf, "lazy.txt", "--cores", "1", "--retries", "1", "--latency-wait", "0")
    assert result.returncode == 0, result.stderr
    assert "MissingOutputException" in result.stderr
    events = clean_run_events(result)
    (first, first_try, error), (second, second_try, _) = _try_events(events, "checks.lazy")
    assert (first, first_try, second, second_try) == ("FAIL", 1, "COMPLETE", 2)
    assert "some output files are missing" in error
    pipeline_end = by_job(events)["checks"][-1]
    assert pipeline_end["eventType"] == "COMPLETE" and "errorMessage" not in pipeline_end["run"]["facets"]


def test_a_job_whose_outputs_stay_missing_fails_and_fails_the_run(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("checks")
    events = _failed_run_events(snakemake.run(wf, "lazy.txt", "--cores", "1", "--latency-wait", "0"))
    [(end, try_number, error)] = _try_events(events, "checks.lazy")
    assert (end, try_number) == ("FAIL", 1)
    assert "some output files are missing" in error
    assert by_job(events)["checks"][-1]["eventType"] == "FAIL"


def test_an_ensure_not_met_fails_every_try_and_none_is_left_running(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("checks")
    events = _failed_run_events(snakemake.run(wf, "empty.txt", "--cores", "1", "--retries", "1"))
    tries = _try_events(events, "checks.empty")
    assert [(end, number) for end, number, _ in tries] == [("FAIL", 1), ("FAIL", 2)]  # the last try is no ABORT
    assert all("empty output" in error for _, _, error in tries)
    assert by_job(events)["checks"][-1]["eventType"] == "FAIL"
