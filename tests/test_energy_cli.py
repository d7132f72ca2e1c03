"""``metatrail energy`` and the energy facet on executions recorded through ``metatrail run`` and the API.

This machine (and CI) exposes no RAPL or NVML, so the meters report null with a reason and the estimate fills in,
labelled as such; the fake-hardware tests in tests/energy/ cover the measured paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from olspec import assert_valid

from metatrail.store import open_store

METATRAIL = [sys.executable, "-m", "metatrail.cli"]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {secs}: pass\n"


def mt(*args: str, cwd: Path) -> str:
    out = subprocess.run([*METATRAIL, *args], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_run_measures_the_commands_process_tree(tmp_path: Path) -> None:
    # Long enough for several 1 s samples to see the grandchild alive: a process tree that exits between two
    # samples is not seen by the sampler (its coverage says so).
    (tmp_path / "burn.py").write_text(BURN.format(secs=2.5))
    (tmp_path / "m.json").write_text('{"accuracy": 0.91, "loss": "n/a"}')
    # The work happens in a grandchild: the shell's child, reaped before the command ends.
    mt("run", "--pipeline", "e", "--stage", "burn", "--metrics-file", "m.json", "--", "sh", "-c",
       f"{sys.executable} burn.py", cwd=tmp_path)
    with open_store(os.environ["METATRAIL_STORE"]) as store:
        run = store.list_runs(kind="execution")[0]
        events = [e.body for e in store.iter_events()]
    energy = run["energy"]
    assert energy is not None
    assert energy["estimated"]["cpu"]["value_j"] > 0  # the grandchild's CPU time was counted
    assert energy["domains"]["cpu"]["value_j"] is None and energy["domains"]["cpu"]["reason"]
    assert run["metrics"] == {"accuracy": 0.91, "loss": None}
    for event in events:
        assert_valid(event)


def test_energy_report_table_json_and_plots(tmp_path: Path) -> None:
    script = ("import metatrail, time\n"
              "with metatrail.pipeline_run('tradeoff'):\n"
              "    for lr, acc, secs in ((0.1, 0.8, 0.1), (0.01, 0.9, 0.8)):\n"
              "        with metatrail.execution(stage='train', params={'lr': lr}) as ex:\n"
              "            t = time.process_time()\n"
              "            while time.process_time() - t < secs: pass\n"
              "            ex.log_metric('accuracy', acc)\n"
              "    with metatrail.execution(stage='prep'):\n"
              "        time.sleep(0.05)\n")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=120)
    by_stage = json.loads(mt("energy", "--json", cwd=tmp_path))
    assert sorted((r["key"], r["runs"]) for r in by_stage) == [("tradeoff.prep", 1), ("tradeoff.train", 2)]
    train = next(r for r in by_stage if r["stage"] == "train")
    assert train["estimated_j"] > 0 and train["measured_j"] is None and train["co2e_g"] > 0
    by_execution = json.loads(mt("energy", "--by", "execution", "--pipeline", "tradeoff", "--json", cwd=tmp_path))
    accuracy = sorted(r["metrics"].get("accuracy", 0) for r in by_execution)
    assert accuracy == [0, 0.8, 0.9]
    heavier = max((r for r in by_execution if r["metrics"]), key=lambda r: r["estimated_j"])
    # The longer burn cost more energy (by far: a sampler starved on a loaded node may miss the start of a window).
    assert heavier["metrics"]["accuracy"] == 0.9
    assert "tradeoff.train" in mt("energy", cwd=tmp_path)
    mt("energy", "--plot", "e.png", "--by", "execution", cwd=tmp_path)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mt("energy", "--plot", "e.html", cwd=tmp_path)
    html = (tmp_path / "e.html").read_text()
    assert "<svg" in html and "tradeoff.train" in html


def test_energy_can_be_switched_off(tmp_path: Path) -> None:
    env = {**os.environ, "METATRAIL_ENERGY": "0"}
    subprocess.run([*METATRAIL, "run", "--pipeline", "e", "--stage", "s", "--", "true"], cwd=tmp_path, env=env,
                   check=True, timeout=60)
    with open_store(os.environ["METATRAIL_STORE"]) as store:
        assert store.list_runs()[0]["energy"] is None
