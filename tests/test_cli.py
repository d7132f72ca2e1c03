"""The ``metatrail`` command, run as a user runs it: a real subprocess, real files, a real store."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from olspec import assert_valid

from metatrail.hashing import md5_file

METATRAIL = [sys.executable, "-m", "metatrail.cli"]


def mt(*args: str, cwd: Path, check: bool = True,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*METATRAIL, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"metatrail {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def pipeline(tmp_path: Path) -> dict[str, str]:
    """A real three-stage pipeline recorded through `metatrail run` under one pipeline run."""
    (tmp_path / "raw.txt").write_text("3\n1\n2\n")
    run_id = mt("pipeline", "start", "numbers", "-p", "seed=1", cwd=tmp_path).stdout.strip()
    env = {"METATRAIL_PIPELINE_RUN": run_id}
    py = sys.executable
    mt("run", "--pipeline", "numbers", "--stage", "sort", "-i", "raw.txt", "-o", "sorted.txt", "-p", "reverse=false",
       "--", py, "-c", "open('sorted.txt','w').write(''.join(sorted(open('raw.txt'))))", cwd=tmp_path, env=env)
    mt("run", "--pipeline", "numbers", "--stage", "sum", "-i", "sorted.txt", "-o", "total.txt",
       "--", py, "-c", "open('total.txt','w').write(str(sum(map(int, open('sorted.txt')))))", cwd=tmp_path, env=env)
    (tmp_path / "report").mkdir()
    mt("run", "--pipeline", "numbers", "--stage", "report", "-i", "total.txt", "-o", "report",
       "--", py, "-c", "open('report/r.md','w').write('total ' + open('total.txt').read())", cwd=tmp_path, env=env)
    mt("pipeline", "finish", run_id, cwd=tmp_path)
    return {"run_id": run_id}


def test_run_returns_the_commands_exit_code_and_output_untouched(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('out\\n'); sys.stderr.write('err\\n'); sys.exit(3)"
    direct = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wrapped = mt("run", "--pipeline", "p", "--stage", "s", "--", sys.executable, "-c", code, cwd=tmp_path,
                 check=False)
    assert (wrapped.returncode, wrapped.stdout, wrapped.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    runs = json.loads(mt("runs", "--json", cwd=tmp_path).stdout)
    assert [(r["stage"], r["state"]) for r in runs] == [("s", "failed")]
    detail = json.loads(mt("show", runs[0]["run_id"], "--json", cwd=tmp_path).stdout)
    assert detail["facets"]["metatrail_execution"]["exitCode"] == 3
    assert detail["error"] == "command exited with status 3"


def test_run_of_a_missing_command_is_recorded(tmp_path: Path) -> None:
    result = mt("run", "--pipeline", "p", "--stage", "s", "--", "no-such-command-xyz", cwd=tmp_path, check=False)
    assert result.returncode == 127
    assert "no-such-command-xyz" in result.stderr
    runs = json.loads(mt("runs", "--json", cwd=tmp_path).stdout)
    assert runs[0]["state"] == "failed"


def test_missing_input_is_recorded_and_the_command_still_runs(tmp_path: Path) -> None:
    mt("run", "--pipeline", "p", "--stage", "s", "-i", "absent.csv", "-o", "made.txt", "--",
       sys.executable, "-c", "open('made.txt','w').write('x')", cwd=tmp_path)
    assert (tmp_path / "made.txt").read_text() == "x"
    run_id = json.loads(mt("runs", "--json", cwd=tmp_path).stdout)[0]["run_id"]
    detail = json.loads(mt("show", run_id, "--json", cwd=tmp_path).stdout)
    assert detail["inputs"][0]["hash"] is None and detail["inputs"][0]["hash_error"] == "missing"
    assert detail["outputs"][0]["hash"] == md5_file(tmp_path / "made.txt")


def test_lineage_of_the_final_output_reaches_the_raw_input(tmp_path: Path, pipeline: dict[str, str]) -> None:
    graph = json.loads(mt("lineage", "report", "--upstream", "--json", cwd=tmp_path).stdout)
    runs = {n["stage"] for n in graph["nodes"] if n["type"] == "run"}
    hashes = {n["hash"] for n in graph["nodes"] if n["type"] == "artifact"}
    assert runs == {"sort", "sum", "report"}
    assert {md5_file(tmp_path / f) for f in ("raw.txt", "sorted.txt", "total.txt")} <= hashes
    by_hash = json.loads(mt("lineage", md5_file(tmp_path / "sorted.txt"), "--downstream", "--json",
                            cwd=tmp_path).stdout)
    assert {n["stage"] for n in by_hash["nodes"] if n["type"] == "run"} == {"sum", "report"}
    assert {n["stage"] for n in json.loads(mt("lineage", "report", "--depth", "1", "--json", cwd=tmp_path).stdout)
            ["nodes"] if n["type"] == "run"} == {"report"}
    human = mt("lineage", "report", cwd=tmp_path).stdout
    assert "numbers.sort" in human and "raw.txt" in human


def test_runs_show_status_and_export(tmp_path: Path, pipeline: dict[str, str]) -> None:
    runs = json.loads(mt("runs", "--pipeline", "numbers", "--json", cwd=tmp_path).stdout)
    assert sorted(r["stage"] or r["kind"] for r in runs) == ["pipeline_run", "report", "sort", "sum"]
    assert {r["parent_run_id"] for r in runs if r["kind"] == "execution"} == {pipeline["run_id"]}
    parent = json.loads(mt("show", pipeline["run_id"], "--json", cwd=tmp_path).stdout)
    assert parent["state"] == "completed" and [c["stage"] for c in parent["children"]] == ["sort", "sum", "report"]
    assert parent["params"] == {"seed": 1}
    status = json.loads(mt("status", "--json", cwd=tmp_path).stdout)
    assert status["events"] == 8 and status["executions"] == 3
    lines = mt("export", "openlineage", "--pipeline", "numbers", cwd=tmp_path).stdout.splitlines()
    assert len(lines) == 8
    for line in lines:
        assert_valid(json.loads(line))
    assert mt("export", "openlineage", "--since", "2h", "--pipeline", "nope", cwd=tmp_path).stdout == ""
    table = mt("runs", cwd=tmp_path).stdout
    assert "numbers" in table and "completed" in table


def test_show_says_once_why_an_energy_meter_is_unavailable(tmp_path: Path) -> None:
    env = {"METATRAIL_POWERCAP_ROOT": str(tmp_path / "no-powercap")}
    mt("run", "--pipeline", "p", "--stage", "s", "--", sys.executable, "-c", "sum(range(10**6))", cwd=tmp_path,
       env=env)
    run_id = json.loads(mt("runs", "--json", cwd=tmp_path).stdout)[0]["run_id"]
    energy = json.loads(mt("show", run_id, "--json", cwd=tmp_path).stdout)["facets"]["metatrail_energy"]
    rapl = next(b for b in energy["meter"]["backends"] if b["name"] == "rapl")
    assert rapl["available"] is False and "no-powercap" in rapl["reason"]
    assert "rapl meter is unavailable" in energy["domains"]["cpu"]["reason"]
    shown = mt("show", run_id, cwd=tmp_path).stdout
    assert "rapl unavailable: no powercap tree" in shown and shown.count("no-powercap") == 1


def test_hash_command_matches_md5(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(os.urandom(5000))
    out = json.loads(mt("hash", "a.bin", "--json", cwd=tmp_path).stdout)
    assert out[0]["hash"] == md5_file(tmp_path / "a.bin") and out[0]["algorithm"] == "md5"
    missing = mt("hash", "nope.bin", cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "null" in missing.stdout


@pytest.mark.parametrize("args,message", [
    (["--store", "ftp://x/y", "status"], None),
    (["status", "--store", "ftp://x/y"], "valid schemes: sqlite, postgresql, http, https"),
    (["show", "01234567-0000-7000-8000-000000000000"], "no run"),
    (["lineage", "nothing-here.txt"], "no artifact"),
    (["runs", "--since", "last tuesday"], "cannot read time"),
    (["run", "--pipeline", "p", "--stage", "s"], "no command given"),
])
def test_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str | None) -> None:
    result = mt(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    if message:
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith("metatrail: error:") and message in result.stderr


def test_corrupt_store_is_named_and_left_alone(tmp_path: Path) -> None:
    store = tmp_path / "bad.db"
    store.write_bytes(b"garbage" * 50)
    result = mt("status", "--store", f"sqlite:///{store}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and str(store) in result.stderr
    assert store.read_bytes() == b"garbage" * 50


def test_init_creates_a_store_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("METATRAIL_STORE", "METATRAIL_HASH_CACHE")}
    result = subprocess.run([*METATRAIL, "init"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert (tmp_path / ".metatrail" / "metatrail.db").exists()
    sub = tmp_path / "deep" / "er"
    sub.mkdir(parents=True)
    subprocess.run([*METATRAIL, "run", "--pipeline", "p", "--stage", "s", "--", "true"], cwd=sub, env=env,
                   check=True, timeout=60)
    status = subprocess.run([*METATRAIL, "status", "--json"], cwd=sub, env=env, capture_output=True, text=True)
    assert json.loads(status.stdout)["executions"] == 1  # found by walking up from deep/er
    assert not (sub / ".metatrail").exists()


# -- `metatrail run`: signals, settings, the kill switch ---------------------------------------------------------
def _runs(cwd: Path) -> list[dict[str, object]]:
    result: list[dict[str, object]] = json.loads(mt("runs", "--json", cwd=cwd).stdout)
    return result


def test_a_command_killed_by_a_realtime_signal_gets_the_shells_exit_code(tmp_path: Path) -> None:
    signum = signal.SIGRTMIN + 1  # no name in Python's signal.Signals
    shell = subprocess.run(["sh", "-c", f"sh -c 'kill -{signum} $$'; echo $?"], capture_output=True, text=True)
    result = mt("run", "--pipeline", "p", "--stage", "s", "--", "sh", "-c", f"kill -{signum} $$", cwd=tmp_path,
                check=False, env={"METATRAIL_ENERGY": "0"})
    assert (result.returncode, result.stderr) == (int(shell.stdout), "")
    detail = json.loads(mt("show", str(_runs(tmp_path)[0]["run_id"]), "--json", cwd=tmp_path).stdout)
    assert detail["state"] == "failed" and detail["error"] == f"command killed by signal {signum}"
    assert detail["facets"]["metatrail_execution"]["exitCode"] == 128 + signum


COUNT_SIGINTS = """
import signal, sys, time
count = 0
def count_it(signum, frame):
    global count
    count += 1
signal.signal(signal.SIGINT, count_it)
print("ready", flush=True)
deadline = time.time() + 1.5
while time.time() < deadline:
    time.sleep(0.05)
print(count, flush=True)
"""


def _as_terminal_job(args: list[str], cwd: Path, signum: int) -> tuple[int, str]:
    """Run ``args`` in a process group of its own, as a shell runs a foreground job, and send ``signum`` to the
    whole group once the command says it is ready, as the terminal does on Ctrl-C or Ctrl-\\."""
    env = {**os.environ, "METATRAIL_ENERGY": "0"}

    def as_foreground_job() -> None:
        # A shell starts a foreground job with the terminal's signals at their defaults, even where the shell itself
        # ignores them (a test run started as a background job of a script inherits SIGINT and SIGQUIT ignored).
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)

    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=as_foreground_job)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signum)
    out = proc.stdout.read()
    return proc.wait(timeout=60), out


def test_one_ctrl_c_reaches_the_command_once_and_the_run_is_recorded(tmp_path: Path) -> None:
    code, out = _as_terminal_job([*METATRAIL, "run", "--pipeline", "p", "--stage", "s", "--",
                                  sys.executable, "-c", COUNT_SIGINTS], tmp_path, signal.SIGINT)
    assert (code, out.strip()) == (0, "1")  # the command's own SIGINT only: none forwarded on top
    assert [r["state"] for r in _runs(tmp_path)] == ["completed"]


def test_ctrl_backslash_kills_the_command_and_metatrail_records_it(tmp_path: Path) -> None:
    wait = "import time; print('ready', flush=True); time.sleep(60)"
    code, _ = _as_terminal_job([*METATRAIL, "run", "--pipeline", "p", "--stage", "s", "--",
                                sys.executable, "-c", wait], tmp_path, signal.SIGQUIT)
    assert code == 128 + signal.SIGQUIT
    detail = json.loads(mt("show", str(_runs(tmp_path)[0]["run_id"]), "--json", cwd=tmp_path).stdout)
    assert detail["error"] == "command killed by signal SIGQUIT"


@pytest.mark.parametrize("parent", [None, "0190a5c4-0000-7000-8000-000000000000"])
def test_a_bad_setting_runs_the_command_unrecorded_with_its_exit_code(tmp_path: Path, parent: str | None) -> None:
    env = {"METATRAIL_TIMEOUT": "abc", **({"METATRAIL_PIPELINE_RUN": parent} if parent else {})}
    result = mt("run", "--pipeline", "p", "--stage", "s", "--", sys.executable, "-c",
                "open('ran', 'w').close(); raise SystemExit(3)", cwd=tmp_path, check=False, env=env)
    assert result.returncode == 3 and (tmp_path / "ran").exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("metatrail: warning: setting 'timeout'")
    assert not (tmp_path / ".metatrail" / "metatrail.db").exists()


def test_the_kill_switch_covers_pipeline_start_and_finish(tmp_path: Path) -> None:
    (tmp_path / ".metatrail").mkdir()
    (tmp_path / ".metatrail" / "config.toml").write_text("[metatrail\nnot toml")  # never read when disabled
    env = {"METATRAIL_DISABLED": "1"}
    run_id = mt("pipeline", "start", "P", cwd=tmp_path, env=env).stdout.strip()
    assert uuid.UUID(run_id).version == 7
    finish = mt("pipeline", "finish", run_id, cwd=tmp_path, env=env)
    assert (finish.stdout, finish.stderr) == ("", "")
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".metatrail", "config.toml"]


def test_the_kill_switch_maps_a_command_that_cannot_run_as_the_shell_does(tmp_path: Path) -> None:
    (tmp_path / "not-executable").write_text("echo hi\n")
    for command, code in (("/nonexistent/cmd", 127), (str(tmp_path / "not-executable"), 126)):
        enabled = mt("run", "--pipeline", "p", "--stage", "s", "--", command, cwd=tmp_path, check=False)
        disabled = mt("run", "--pipeline", "p", "--stage", "s", "--", command, cwd=tmp_path, check=False,
                      env={"METATRAIL_DISABLED": "1"})
        assert enabled.returncode == disabled.returncode == code
        assert disabled.stderr == enabled.stderr and disabled.stderr.startswith("metatrail: cannot run")
    assert [r["error"] for r in _runs(tmp_path)] == [
        f"cannot run {str(tmp_path / 'not-executable')!r}: Permission denied",
        "cannot run '/nonexistent/cmd': No such file or directory"]


def test_a_shell_pipeline_goes_on_when_its_records_cannot_be_stored(tmp_path: Path) -> None:
    """``pipeline start|finish`` say on stderr what was not stored but never stop a ``set -e`` script."""
    (tmp_path / "blocker").write_text("a regular file where the store's directory should be")
    mtc = " ".join(shlex.quote(a) for a in METATRAIL)
    script = (f"set -e\nRUN=$({mtc} pipeline start P)\n{mtc} run --pipeline P --stage s -- true\n"
              f"{mtc} pipeline finish \"$RUN\"\necho \"reached the end with $RUN\"\n")
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "METATRAIL_STORE": f"sqlite:///{tmp_path / 'blocker' / 'm.db'}",
                                 "METATRAIL_ENERGY": "0", "METATRAIL_FLUSH_TIMEOUT": "5"})
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split()[-1]
    assert uuid.UUID(run_id)
    assert f"the start of pipeline run {run_id} was not stored" in result.stderr
    assert f"the end of pipeline run {run_id} is not recorded" in result.stderr
    assert "Traceback" not in result.stderr


def test_finishing_an_unknown_pipeline_run_is_a_warning(tmp_path: Path) -> None:
    run_id = "0190a5c4-0000-7000-8000-000000000000"
    result = mt("pipeline", "finish", run_id, cwd=tmp_path, check=False)
    assert result.returncode == 0
    assert result.stderr == (f"metatrail: warning: no pipeline run {run_id!r} in the store (was its start stored?); "
                             "its end is not recorded\n")


def test_a_malformed_run_id_is_a_usage_error(tmp_path: Path) -> None:
    result = mt("pipeline", "finish", "not-a-run", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.startswith("metatrail: error: 'not-a-run' is not a run id")


# -- queries: bad input ------------------------------------------------------------------------------------------
def test_a_store_path_below_a_regular_file_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = mt("runs", "--store", f"sqlite:///{tmp_path / 'file' / 'x.db'}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"metatrail: error: cannot create the directory of store file {tmp_path}")


@pytest.mark.parametrize("args", [["runs", "--limit", "-1"], ["lineage", "x", "--depth", "-3"]])
def test_negative_counts_are_refused(tmp_path: Path, args: list[str]) -> None:
    result = mt(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "must be 0 or more" in result.stderr


def test_lineage_of_a_malformed_or_unknown_hash(tmp_path: Path, pipeline: dict[str, str]) -> None:
    malformed = mt("lineage", "md5:zz", cwd=tmp_path, check=False)
    assert malformed.returncode == 2 and malformed.stderr.startswith("metatrail: error: malformed hash 'md5:zz'")
    unknown = "0" * 32
    for target in (unknown, f"md5:{unknown}"):
        result = mt("lineage", target, cwd=tmp_path, check=False)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == f"metatrail: error: no artifact with hash md5:{unknown} in the store\n"
    known = mt("lineage", f"MD5:{md5_file(tmp_path / 'sorted.txt').upper()}", "--json", cwd=tmp_path)
    assert {n["stage"] for n in json.loads(known.stdout)["nodes"] if n["type"] == "run"} == {"sort"}


def test_human_lineage_of_a_long_chain(tmp_path: Path) -> None:
    """A chain deeper than Python's recursion limit prints as a tree, as ``--json`` gives it."""
    from metatrail.recorder import Recorder

    length = 1100
    rec = Recorder()
    (tmp_path / "f0").write_text("0")
    for i in range(length):
        ex = rec.execution_started("chain", f"s{i}", inputs=[str(tmp_path / f"f{i}")])
        (tmp_path / f"f{i + 1}").write_text(str(i + 1))
        rec.execution_finished(ex, outputs=[str(tmp_path / f"f{i + 1}")])
    assert rec.flush(120)
    rec.close()
    result = mt("lineage", f"f{length}", "--depth", str(length + 5), cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-500:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(tmp_path / f"f{length}")) and "produced by chain.s1099 " in lines[1]
    assert "produced by chain.s1090 " in result.stdout and result.stderr == ""
