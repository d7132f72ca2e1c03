"""Runs that nothing will finish: a recording process killed with SIGKILL leaves its runs open; ``metatrail runs`` and
``show`` call them abandoned only once the process (and, for an execution, its pipeline run's process) has ended,
and ``metatrail abort`` records their end as ABORT events. Real processes, real kills, the real command."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from olspec import assert_valid

from metatrail.abandoned import find_abandoned, recorder_gone
from metatrail.store import open_store
from metatrail.store.projection import parse_event_time

RECORDING = textwrap.dedent("""
    import json, os, sys, time
    from metatrail.model import PipelineRun
    from metatrail.recorder import Recorder

    rec = Recorder()
    if sys.argv[1] == "controller":  # a pipeline run, one execution finished and one started; then it waits
        run = rec.pipeline_run_started("crashy", params={"seed": 1})
        done = rec.execution_started("crashy", "prepare", pipeline_run=run)
        rec.execution_finished(done)
        ex = rec.execution_started("crashy", "train", pipeline_run=run)
        assert rec.flush(60)
        print(json.dumps({"run": run.id, "done": done.id, "open": ex.id}), flush=True)
        time.sleep(600)
    else:  # a worker: starts an execution of the controller's run and ends without finishing it
        parent = PipelineRun(id=sys.argv[2], pipeline="crashy", namespace=rec.settings.namespace,
                             integration="PYTHON")
        ex = rec.execution_started("crashy", "worker-step", pipeline_run=parent)
        assert rec.flush(60)
        print(json.dumps({"open": ex.id}), flush=True)
        os._exit(0)
""")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "METATRAIL_STORE": f"sqlite:///{tmp_path / 'store.db'}",
           "METATRAIL_HASH_CACHE": str(tmp_path / "hc.db"), "METATRAIL_ENERGY": "0", "COLUMNS": "200"}
    for name in ("METATRAIL_DISABLED", "METATRAIL_SERVER"):
        env.pop(name, None)
    return env


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    script = tmp_path / "recording.py"
    script.write_text(RECORDING)
    proc = subprocess.Popen([sys.executable, str(script), *args], env=_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=120):
            proc.kill()
            raise AssertionError(f"the recording process said nothing: {proc.communicate()[1][-2000:]}")
    line = proc.stdout.readline()
    assert line, proc.communicate()[1][-2000:]
    ids: dict[str, str] = json.loads(line)
    return proc, ids


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def mt(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "metatrail.cli", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"metatrail {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def _runs(tmp_path: Path, *args: str) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in json.loads(mt(tmp_path, "runs", "--json", *args).stdout)}


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        return [e.body for e in store.iter_events()]


def _status(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads(mt(tmp_path, "status", "--json").stdout))


def test_a_killed_controllers_runs_are_abandoned_and_abort_ends_them(tmp_path: Path) -> None:
    controller, ids = _start(tmp_path, "controller")
    try:
        runs = _runs(tmp_path)
        assert {r["state"] for r in runs.values()} == {"running", "completed"}
        assert all(r["abandoned"] is None for r in runs.values())  # its process is alive
        assert _status(tmp_path)["abandoned"] == 0
        refused = mt(tmp_path, "abort", ids["open"], check=False)
        assert refused.returncode == 2 and f"process {controller.pid} on this host" in refused.stderr
    finally:
        _kill(controller)
    assert len(_events(tmp_path)) == 4  # the refused abort wrote nothing

    runs = _runs(tmp_path)
    assert runs[ids["done"]]["abandoned"] is None and runs[ids["done"]]["state"] == "completed"
    assert f"pid {controller.pid} on {socket.gethostname()}) has ended" in runs[ids["run"]]["abandoned"]
    assert "its pipeline run is abandoned too" in runs[ids["open"]]["abandoned"]
    assert set(_runs(tmp_path, "--state", "abandoned")) == {ids["run"], ids["open"]}
    shown = json.loads(mt(tmp_path, "show", ids["open"], "--json").stdout)
    assert shown["abandoned"] == runs[ids["open"]]["abandoned"]
    assert "abandoned" in mt(tmp_path, "runs").stdout
    status = _status(tmp_path)
    assert (status["states"]["running"], status["abandoned"]) == (2, 2)
    assert "running: 2 (2 abandoned: metatrail runs --state abandoned)" in mt(tmp_path, "status").stdout

    planned = json.loads(mt(tmp_path, "abort", "--abandoned", "--dry-run", "--json").stdout)
    assert {p["run_id"] for p in planned} == {ids["run"], ids["open"]}
    assert len(_events(tmp_path)) == 4  # a dry run records nothing

    before = _events(tmp_path)
    aborted = json.loads(mt(tmp_path, "abort", "--abandoned", "--json").stdout)
    assert {a["run_id"] for a in aborted} == {ids["run"], ids["open"]}
    runs = _runs(tmp_path)
    for run_id in (ids["run"], ids["open"]):
        assert runs[run_id]["state"] == "aborted" and runs[run_id]["abandoned"] is None
        assert runs[run_id]["duration_s"] is None  # it ended at an unknown moment: no duration is made up
    # Each ends at its last known moment: the pipeline run at its children's latest event, the execution at its START.
    times = {e["run"]["runId"]: [] for e in before}
    for e in before:
        times[e["run"]["runId"]].append(parse_event_time(e["eventTime"]))
    assert runs[ids["run"]]["ended_at"] == pytest.approx(max(t for ts in times.values() for t in ts), abs=1e-3)
    assert runs[ids["open"]]["ended_at"] == pytest.approx(runs[ids["open"]]["started_at"], abs=1e-3)
    aborts = [e for e in _events(tmp_path) if e["eventType"] == "ABORT"]
    assert len(aborts) == 2
    for event in aborts:
        assert_valid(event)
        ours = event["run"]["facets"]["metatrail_execution"]
        assert ours["durationSeconds"] is None and ours["extra"]["abandoned"]["by"] == "metatrail abort"
        assert event["run"]["facets"]["errorMessage"]["message"].startswith("abandoned: the process that recorded")
    execution = next(e for e in aborts if e["run"]["runId"] == ids["open"])
    assert execution["job"]["name"] == "crashy.train"
    assert execution["run"]["facets"]["parent"]["run"]["runId"] == ids["run"]  # still under its pipeline run
    assert mt(tmp_path, "abort", "--abandoned").stdout.strip() == "no run to abort"
    status = _status(tmp_path)
    assert (status["states"].get("running", 0), status["states"]["aborted"], status["abandoned"]) == (0, 2, 0)
    assert "ended at an unknown moment after" in mt(tmp_path, "show", ids["run"]).stdout


def test_an_execution_whose_worker_ended_waits_for_its_pipeline_runs_process(tmp_path: Path) -> None:
    """A job process that ends before its controller recorded the end (Snakemake's --quiet defers it) is not
    abandoned while the controller lives: the controller is the one that finishes it."""
    controller, ids = _start(tmp_path, "controller")
    try:
        worker, worker_ids = _start(tmp_path, "worker", ids["run"])
        worker.communicate(timeout=60)
        runs = _runs(tmp_path)
        assert runs[worker_ids["open"]]["state"] == "running" and runs[worker_ids["open"]]["pid"] == worker.pid
        assert runs[worker_ids["open"]]["abandoned"] is None
    finally:
        _kill(controller)
    reason = _runs(tmp_path)[worker_ids["open"]]["abandoned"]
    assert f"pid {worker.pid} " in reason and "its pipeline run is abandoned too" in reason


def test_a_shell_pipeline_run_lasts_as_long_as_the_script_that_started_it(tmp_path: Path) -> None:
    """``metatrail pipeline start`` ends at once; the run is the calling script's, and abandoned only when that ends
    without ``pipeline finish``."""
    script = (f'RUN=$("{sys.executable}" -m metatrail.cli pipeline start shellpipe) || exit 1\n'
              'echo "$RUN"\nsleep 600\n')
    shell = subprocess.Popen(["bash", "-c", script], env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert shell.stdout is not None
        run_id = shell.stdout.readline().strip()
        run = _runs(tmp_path)[run_id]
        assert (run["state"], run["pid"], run["abandoned"]) == ("running", shell.pid, None)
    finally:
        _kill(shell)
    assert f"pid {shell.pid} " in _runs(tmp_path)[run_id]["abandoned"]


def test_when_a_recording_process_counts_as_ended() -> None:
    here, me = socket.gethostname(), os.getpid()
    created = psutil.Process(me).create_time()
    assert recorder_gone(here, me, time.time()) is None  # alive
    assert "started later" in str(recorder_gone(here, me, created - 100))  # the pid was reused since the run began
    assert recorder_gone("another-host", me, created - 100) is None  # not ours to tell
    assert recorder_gone(here, None, None) is None and recorder_gone(here, True, None) is None
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert "has ended" in str(recorder_gone(here, int(ended.stdout), time.time() - 5))
    # A parent run that is unknown, or recorded elsewhere, leaves the question open.
    gone = {"run_id": "e", "state": "running", "host": here, "pid": int(ended.stdout), "started_at": time.time() - 5}
    assert find_abandoned([{**gone, "parent_run_id": "p"}], lambda run_id: None) == {}
    elsewhere = {"run_id": "p", "state": "running", "host": "another-host", "pid": 1, "started_at": 0.0}
    assert find_abandoned([{**gone, "parent_run_id": "p"}, elsewhere], lambda run_id: None) == {}
    assert set(find_abandoned([{**gone, "parent_run_id": "p"}, {**elsewhere, "state": "completed"}],
                              lambda run_id: None)) == {"e"}
    # An Airflow DAG run outlives the scheduler that started it (restarts, hand-overs): never judged by its pid.
    dag_run = {**gone, "kind": "pipeline_run", "integration": "AIRFLOW"}
    assert find_abandoned([dag_run], lambda run_id: None) == {}
    assert find_abandoned([{**gone, "run_id": "t", "parent_run_id": "e"}, dag_run], lambda run_id: None) == {}
    assert set(find_abandoned([{**dag_run, "kind": "execution"}], lambda run_id: None)) == {"e"}
    # A run pulled from another site is not this machine's to judge, whatever its host is called there.
    assert find_abandoned([{**gone, "site": "lab2"}], lambda run_id: None, site="local") == {}
    assert set(find_abandoned([{**gone, "site": "local"}], lambda run_id: None, site="local")) == {"e"}


def test_a_pid_started_after_the_run_is_judged_by_the_runs_latest_event_that_names_it() -> None:
    """A deferred Airflow task resumes in a new process: its run began before that process did, yet the process is
    the run's own. A pid is taken as reused only when its process started after the run's latest event naming it."""
    from types import SimpleNamespace

    from metatrail.openlineage.events import iso_time

    here, me = socket.gethostname(), os.getpid()
    created = psutil.Process(me).create_time()
    run = {"run_id": "r", "state": "running", "host": here, "pid": me, "started_at": created - 100}

    def event(at: float) -> Any:
        return SimpleNamespace(body={"eventTime": iso_time(at), "run": {
            "runId": "r", "facets": {"metatrail_execution": {"pid": me, "host": here}}}})

    resumed = [event(created - 100), event(created + 1)]
    assert find_abandoned([run], lambda run_id: None, events_of=lambda run_id: resumed) == {}
    reused = [event(created - 100)]
    assert "started later" in find_abandoned([run], lambda run_id: None, events_of=lambda run_id: reused)["r"]
    assert find_abandoned([run], lambda run_id: None) == {}  # without the events it cannot tell


def test_another_producers_run_is_never_called_abandoned_but_can_be_aborted_by_name(tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    start = {"eventType": "START", "eventTime": "2026-11-01T10:00:00Z", "producer": "https://example.com/etl",
             "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
             "run": {"runId": run_id}, "job": {"namespace": "etl", "name": "nightly.load"},
             "inputs": [], "outputs": []}
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.ingest([start])
    assert _runs(tmp_path)[run_id]["abandoned"] is None
    assert mt(tmp_path, "abort", "--abandoned").stdout.strip() == "no run to abort"
    aborted = json.loads(mt(tmp_path, "abort", run_id, "--reason", "node lost", "--json").stdout)
    assert aborted == [{"run_id": run_id, "job": "nightly.load", "last_seen": "2026-11-01T10:00:00.000000+00:00",
                        "reason": "node lost (ended by hand)"}]
    run = _runs(tmp_path)[run_id]
    assert (run["state"], run["job_name"], run["error"]) == ("aborted", "nightly.load",
                                                              "abandoned: node lost (ended by hand)")
    abort = [e for e in _events(tmp_path) if e["eventType"] == "ABORT"]
    assert len(abort) == 1
    assert_valid(abort[0])
    missing = mt(tmp_path, "abort", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and "no run" in missing.stderr
    assert mt(tmp_path, "abort", check=False).returncode == 2
