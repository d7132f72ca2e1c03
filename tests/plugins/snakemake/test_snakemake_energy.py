"""Energy per Snakemake job, from real runs: local jobs of every kind (shell, script, run) carry the energy facet
with their process tree's CPU time; cluster jobs carry Slurm's ConsumedEnergy when ``sacct`` answers (a fake
``sacct`` printing Slurm's real ``--parsable2`` output: there is no Slurm here), else null with the reason."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from olspec import assert_valid
from smkrun import Snakemake, by_job, clean_run_events, read_events

BURN_S = 0.4  # CPU seconds each burn job spends (workflows/energy/Snakefile)

# Real `sacct -j ID --noheader --parsable2 --format=JobID,ConsumedEnergyRaw,Elapsed,State,NodeList` output shape:
# the allocation line, then its batch and extern steps.
FAKE_SACCT = """#!/bin/sh
# A stand-in for Slurm's sacct (no Slurm here): energy for any job id, in sacct's --parsable2 format.
[ "$1" = "-j" ] || exit 2
id="$2"
echo "$*" >> "$(dirname "$0")/sacct.calls"
case "$SACCT_MODE" in
  empty)
    printf '%s||00:00:02|COMPLETED|node01\\n%s.batch||00:00:02|COMPLETED|node01\\n' "$id" "$id" ;;
  *)
    printf '%s|%s|00:00:02|COMPLETED|node01\\n' "$id" "1${id}0"
    printf '%s.batch|%s|00:00:02|COMPLETED|node01\\n' "$id" "1${id}0"
    printf '%s.extern|%s|00:00:02|COMPLETED|node01\\n' "$id" "1${id}0" ;;
esac
"""

# A local "cluster" whose job ids look like Slurm's (sbatch --parsable prints "<id>" or "<id>;<cluster>").
SUBMIT_NUMERIC = """#!/bin/bash
jobscript="${@: -1}"
id=$(( 100 + $(ls -1 cluster_logs 2>/dev/null | wc -l) ))
mkdir -p cluster_logs
nohup bash "$jobscript" > "cluster_logs/$id.out" 2>&1 < /dev/null &
echo "$id;cluster1"
"""


def _energy(event: dict[str, Any]) -> dict[str, Any]:
    facet: dict[str, Any] = event["run"]["facets"]["metatrail_energy"]
    return facet


def _ends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["eventType"] in ("COMPLETE", "FAIL")
            and e["run"]["facets"]["metatrail_execution"]["kind"] == "execution"]


def test_local_jobs_of_every_kind_carry_their_cpu_time(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("energy")
    result = snakemake.run(wf, "--cores", "2")
    events = clean_run_events(result)
    ends = _ends(events)
    assert len(ends) == 5
    jobs = by_job(ends)
    for name in ("energy.shell_burn", "energy.script_burn", "energy.run_burn"):
        for end in jobs[name]:
            energy = _energy(end)
            # The job's own process tree burned BURN_S of CPU time (more with interpreter start-up); it is all
            # counted although the processes exited between two energy samples.
            assert energy["task_cpu_s"] is not None and energy["task_cpu_s"] >= 0.9 * BURN_S, (
                name, energy["task_cpu_s"], energy.get("errors"), {k: v for k, v in energy.items() if k != "carbon"})
            assert energy["end_task_cpu"] == "read-at-stop", energy
            assert energy["measured_j"] is not None or energy["estimated_j"], energy
            if energy["measured_j"] is None:
                assert energy["estimated"]["cpu"]["value_j"] > 0
    # Two shell jobs ran at once: each is told apart by its own process, none was split.
    for end in jobs["energy.shell_burn"]:
        energy = _energy(end)
        assert energy["task_cpu_s"] < 3 * BURN_S, energy
        assert not any("split equally" in e for e in energy["errors"]), energy["errors"]
    # The aggregate rule ran no process: nothing of the burns is charged to it.
    assert _energy(jobs["energy.all"][0])["task_cpu_s"] < 0.5 * BURN_S


def _cluster(snakemake: Snakemake, wf: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    result = snakemake.run(wf, "--jobs", "2", "--executor", "cluster-generic",
                           "--cluster-generic-submit-cmd", "./submit.sh", "--seconds-between-status-checks", "1",
                           env=env)
    assert result.returncode == 0, result.stderr
    events = read_events()
    for event in events:
        assert_valid(event)
    ends = _ends(events)
    # `all` is a local rule: run by the controller, measured here like any local job.
    local = [e for e in ends if e["job"]["name"] == "cluster.all"]
    assert len(local) == 1 and "node" not in _energy(local[0])["domains"]
    return [e for e in ends if e["job"]["name"] != "cluster.all"]


def _fake_sacct(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "sacct"
    exe.write_text(FAKE_SACCT)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize("mode", ["energy", "empty"])
def test_cluster_jobs_get_slurm_consumed_energy(snakemake: Snakemake, tmp_path: Path, mode: str) -> None:
    wf = snakemake.workflow("cluster")
    (wf / "submit.sh").write_text(SUBMIT_NUMERIC)
    path = _fake_sacct(tmp_path / "bin")
    ends = _cluster(snakemake, wf, {"PATH": path, "SACCT_MODE": mode})
    assert len(ends) == 3
    calls = (tmp_path / "bin" / "sacct.calls").read_text().splitlines()
    assert calls and all("--parsable2" in c and "ConsumedEnergyRaw" in c for c in calls)
    for end in ends:
        energy = _energy(end)
        node = energy["domains"]["node"]
        assert node["method"] == "slurm-sacct"
        jobid = node["sources"][0].split(":")[1].split()[0]
        if mode == "energy":
            assert node["value_j"] == float(f"1{jobid}0")
            assert energy["measured_j"] == node["value_j"]
            assert energy["wall_s"] == 2.0  # sacct's Elapsed
            assert energy["carbon"]["energy_basis"] == "measured"
        else:
            assert node["value_j"] is None and energy["measured_j"] is None
            assert "AcctGatherEnergyType" in node["reason"]


def test_cluster_jobs_without_accounting_are_null_with_a_reason(snakemake: Snakemake) -> None:
    wf = snakemake.workflow("cluster")  # job ids like "job123-456": no Slurm id, nothing to ask
    ends = _cluster(snakemake, wf, {})
    assert len(ends) == 3
    for end in ends:
        energy = _energy(end)
        node = energy["domains"]["node"]
        assert node["value_j"] is None and energy["measured_j"] is None and energy["estimated_j"] is None
        assert node["reason"].startswith("not measured here"), node


def test_under_quiet_a_finished_job_is_closed_when_the_next_one_starts(snakemake: Snakemake) -> None:
    """Under ``--quiet`` Snakemake logs no JOB_FINISHED. A job nothing read used to stay open until the run ended:
    its energy window ran on over the later jobs (and the energy monitor went through every such window at each
    sample, a cost growing with the square of the jobs). Snakemake's persistence record now tells it finished, and
    it is closed when the next job starts."""
    wf = snakemake.workflow("quiet")
    result = snakemake.run(wf, "--cores", "1", "--quiet")
    events = clean_run_events(result)
    jobs = by_job(events)
    first_end = next(e for e in jobs["quiet.first"] if e["eventType"] == "COMPLETE")
    second_end = next(e for e in jobs["quiet.second"] if e["eventType"] == "COMPLETE")
    energy = _energy(first_end)
    # "second" sleeps 2 s after "first" ended: a window closed at the run's end would span it.
    assert energy["wall_s"] < 1.5, {k: v for k, v in energy.items() if k != "carbon"}
    assert first_end["eventTime"] < second_end["eventTime"]
    assert _energy(second_end)["wall_s"] >= 1.5
