"""The ``metatrail`` command, run as a user runs it: a real subprocess, real files, a real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
