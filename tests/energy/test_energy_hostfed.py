"""Host-fed processes and accounted energy: ``metatrail run`` counts a command that ends between two samples
(its exact CPU time from ``os.wait4``), and Slurm's ``sacct`` figures (a fake ``sacct`` printing Slurm's real
``--parsable2`` output; there is no Slurm here) become the facet, or null with the reason."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from olspec import assert_valid

from metatrail.cli import main
from metatrail.energy.accounting import ClusterJobEnergy, parse_sacct, slurm_job_id
from metatrail.store import open_store

BURN = "import time\ne = time.process_time() + 0.3\nwhile time.process_time() < e: pass\nprint(time.process_time())"


def _facets(url: str) -> list[dict[str, Any]]:
    with open_store(url) as store:
        events = [e.body for e in store.iter_events()]
    for event in events:
        assert_valid(event)
    return [e["run"]["facets"]["metatrail_energy"] for e in events if e["eventType"] == "COMPLETE"]


def test_run_counts_a_command_shorter_than_a_sample(capfd: pytest.CaptureFixture[str]) -> None:
    # 0.3 s of CPU in a child that exits long before the 1 s sample after its start: without the reaped
    # figure its tail (or all of it) would be lost.
    assert main(["run", "--pipeline", "p", "--stage", "burn", "--", sys.executable, "-c", BURN]) == 0
    child_cpu = float(capfd.readouterr().out.strip().splitlines()[-1])
    (energy,) = _facets(os.environ["METATRAIL_STORE"])
    assert energy["end_task_cpu"] == "read-at-stop", energy
    assert energy["task_cpu_s"] is not None
    # At least the burn itself (clock ticks are 10 ms), at most the child's whole CPU time plus a tick.
    assert 0.3 - 0.02 <= energy["task_cpu_s"] <= child_cpu + 0.02, (energy["task_cpu_s"], child_cpu)
    assert energy["measured_j"] is not None or energy["estimated"]["cpu"]["value_j"] > 0


SACCT_OUT = "4242|98765|00:01:05|COMPLETED|node[01-02]\n4242.batch|98000|00:01:05|COMPLETED|node01\n" \
            "4242.extern|98765|00:01:05|COMPLETED|node[01-02]\n"


def test_parse_sacct_lines() -> None:
    assert parse_sacct("4242", SACCT_OUT)[0] == 98765.0
    only_steps = "7||00:00:10|COMPLETED|n1\n7.batch||00:00:10|COMPLETED|n1\n7.0|30|00:00:04|COMPLETED|n1\n" \
                 "7.1|12|00:00:05|COMPLETED|n1\n"
    assert parse_sacct("7", only_steps)[0] == 42.0
    value, reason, _ = parse_sacct("8", "8|0|00:00:03|COMPLETED|n1\n")
    assert value is None and reason is not None and "AcctGatherEnergyType" in reason
    value, reason, _ = parse_sacct("9", "9||00:00:03|RUNNING|n1\n")
    assert value is None and reason is not None and "RUNNING" in reason
    assert parse_sacct("10", "")[0] is None
    assert slurm_job_id("4242;cluster") == "4242" and slurm_job_id("job12-3") is None


def _fake_sacct(folder: Path, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "sacct"
    exe.write_text(f"#!/bin/sh\ncat <<'OUT'\n{body}OUT\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_cluster_job_energy_from_fake_sacct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_sacct(tmp_path / "bin", SACCT_OUT)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    payload = ClusterJobEnergy("slurm", "4242").report(wall_s=70.0, interval_s=1.0, meter={"name": "m",
                                                       "version": "0"}, region=None, pue=None)
    node = payload["domains"]["node"]
    assert node["value_j"] == 98765.0 and node["method"] == "slurm-sacct" and payload["measured_j"] == 98765.0
    assert payload["wall_s"] == 65.0
    missing = ClusterJobEnergy("cluster-generic", "job1-2").report(wall_s=1.0, interval_s=1.0, meter={},
                                                                    region=None, pue=None)
    assert missing["domains"]["node"]["value_j"] is None
    assert missing["domains"]["node"]["reason"].startswith("not measured here")


def test_no_sacct_on_path_is_null_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    payload = ClusterJobEnergy("slurm", "4242").report(wall_s=1.0, interval_s=1.0, meter={}, region=None,
                                                        pue=None)
    assert payload["measured_j"] is None
    assert "sacct is not on PATH" in payload["domains"]["node"]["reason"]
