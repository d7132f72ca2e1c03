"""The plugin as a user meets it, in fresh interpreters: on with ``PREFECT_PLUGINS_ENABLED=1`` and nothing else,
off without it, silent under ``METATRAIL_DISABLED=1``, and invisible to the user's own OpenTelemetry setup."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from olspec import assert_valid
from prefect_support import HERE, run_python

from metatrail.store import open_store


def _last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _store_events(store_path: Path) -> list[dict[str, Any]]:
    with open_store(f"sqlite:///{store_path}") as store:
        return [e.body for e in store.iter_events()]


def test_users_without_a_tracer_provider_are_recorded_and_get_none(tmp_path: Path) -> None:
    store = tmp_path / ".metatrail" / "metatrail.db"
    out = _last_json(run_python(HERE / "otel_user.py", "none", str(tmp_path)))
    assert out["result"] == f"{tmp_path}/tagged.txt"
    assert out["provider"] == "ProxyTracerProvider"  # we installed no global provider
    evs = _store_events(store)
    for event in evs:
        assert_valid(event)
    assert sorted((e["job"]["name"], e["eventType"]) for e in evs) == [
        ("otel-flow", "COMPLETE"), ("otel-flow", "START"), ("otel-flow.tagged", "COMPLETE"),
        ("otel-flow.tagged", "START")]


@pytest.mark.parametrize("mode", ["after", "before"])
def test_users_tracer_provider_still_gets_every_span(tmp_path: Path, mode: str) -> None:
    out = _last_json(run_python(HERE / "otel_user.py", mode, str(tmp_path)))
    assert out["result"] == f"{tmp_path}/tagged.txt"
    assert out["provider"] == "TracerProvider"
    spans = {s["name"]: s for s in out["spans"]}
    assert set(spans) == {"user-root", "otel-run", "tagged"}
    # The trace tree, the attributes set from user code, state events and statuses are what Prefect alone gives.
    assert spans["otel-run"]["parent_id"] == spans["user-root"]["span_id"]
    assert spans["tagged"]["parent_id"] == spans["otel-run"]["span_id"]
    assert spans["tagged"]["note"] == "set inside the task"
    assert spans["tagged"]["events"] == ["Running", "Completed"]
    assert spans["otel-run"]["events"] == ["Running", "Completed"]
    assert spans["otel-run"]["status"] == spans["tagged"]["status"] == "OK"
    # And metatrail recorded the same runs, under Prefect's run ids.
    evs = _store_events(tmp_path / ".metatrail" / "metatrail.db")
    ids = {e["job"]["name"]: e["run"]["runId"] for e in evs if e["eventType"] == "COMPLETE"}
    assert ids == {"otel-flow": spans["otel-run"]["run_id"], "otel-flow.tagged": spans["tagged"]["run_id"]}


def test_off_without_the_prefect_setting_and_under_the_kill_switch(tmp_path: Path) -> None:
    results = {}
    for case, env in {"off": {"PREFECT_PLUGINS_ENABLED": "0"}, "disabled": {"METATRAIL_DISABLED": "1"}}.items():
        work = tmp_path / case
        work.mkdir()
        store_dir = tmp_path / f"store-{case}"
        env = {**env, "METATRAIL_STORE": f"sqlite:///{store_dir / 'metatrail.db'}",
               "METATRAIL_HASH_CACHE": str(store_dir / "hashcache.db")}
        results[case] = _last_json(run_python(HERE / "prefect_flows.py", "etl", str(work), env=env))
        assert results[case] == {"report": str(work / "report.json"), "rows": 3}
        assert not store_dir.exists()  # no store, no hash cache: nothing written
