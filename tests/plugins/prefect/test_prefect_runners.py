"""Task runners and call styles: ``.map()`` / ``.submit()`` on the thread pool, the process pool (spawned children
record their own task runs), async flows and tasks, subflows, and the plugin really loaded by Prefect."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from olspec import assert_valid
from prefect import flow, task
from prefect_flows import async_sum, fanout_processes, fanout_threads

Events = Callable[[], list[dict[str, Any]]]


def _final(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in evs if e["eventType"] != "START"]


def _facet(event: dict[str, Any]) -> dict[str, Any]:
    facet: dict[str, Any] = event["run"]["facets"]["metatrail_execution"]
    return facet


def test_loaded_through_prefects_plugin_system() -> None:
    # Nothing in the tests installs the plugin: ``import prefect`` did, through our ``prefect.plugins`` entry point.
    from importlib.metadata import entry_points

    from prefect.telemetry import run_telemetry

    assert [ep.value for ep in entry_points(group="prefect.plugins") if ep.name == "metatrail"] == [
        "metatrail.plugins.prefect.hook"]
    assert getattr(run_telemetry.get_tracer, "_metatrail_wrapped", False)


def _check_fanout(evs: list[dict[str, Any]], state: Any, n: int, *, upstream_known: bool = True) \
        -> list[dict[str, Any]]:
    for event in evs:
        assert_valid(event)
    flow_run_id = str(state.state_details.flow_run_id)
    final = _final(evs)
    squares = sorted((e for e in final if e["job"]["name"].endswith(".square")), key=lambda e: _facet(e)["params"]["x"])
    totals = [e for e in final if e["job"]["name"].endswith(".total")]
    assert [_facet(e)["params"] for e in squares] == [{"x": i} for i in range(n)]
    assert [_facet(e)["extra"]["return_value"] for e in squares] == [i * i for i in range(n)]
    assert all(e["eventType"] == "COMPLETE" for e in squares + totals) and len(totals) == 1
    # The futures passed to total were resolved to their values, and each one's task run is named upstream.
    assert _facet(totals[0])["params"] == {"values": [i * i for i in range(n)]}
    if upstream_known:
        assert _facet(totals[0])["extra"]["upstream"] == {"values": sorted(e["run"]["runId"] for e in squares)}
    for event in squares + totals:
        assert event["run"]["facets"]["parent"]["run"]["runId"] == flow_run_id
    return squares + totals


def test_thread_pool_map_and_submit(events: Events) -> None:
    state = fanout_threads(4, return_state=True)
    assert state.result() == 14
    tasks = _check_fanout(events(), state, 4)
    assert {_facet(e)["pid"] for e in tasks} == {os.getpid()}


def test_process_pool(events: Events) -> None:
    state = fanout_processes(3, return_state=True)
    assert state.result() == 5
    evs = events()
    # The process pool resolves futures before the child creates its task run, so Prefect itself keeps no
    # upstream task runs for it (nor do we: we record what Prefect knows).
    tasks = _check_fanout(evs, state, 3, upstream_known=False)
    # Each task run was recorded by the spawned child that ran it (and measured there).
    assert os.getpid() not in {_facet(e)["pid"] for e in tasks}
    assert all("metatrail_energy" in e["run"]["facets"] for e in tasks)
    pipeline = [e for e in evs if e["job"]["name"] == "fanout-processes"]
    assert [e["eventType"] for e in pipeline] == ["START", "COMPLETE"]
    assert {_facet(e)["pid"] for e in pipeline} == {os.getpid()}


def test_async_flow_and_tasks(events: Events) -> None:
    assert asyncio.run(async_sum(1)) == 12
    final = _final(events())
    adds = sorted((e for e in final if e["job"]["name"] == "async-sum.add_async"),
                  key=lambda e: _facet(e)["params"]["x"])
    assert [(_facet(e)["params"], _facet(e)["extra"]["return_value"]) for e in adds] == [
        ({"x": 1, "y": 1}, 2), ({"x": 2, "y": 10}, 12)]
    assert [e["eventType"] for e in final if e["job"]["name"] == "async-sum"] == ["COMPLETE"]


@task
def child_step(x: int) -> int:
    return x + 1


@flow
def child(x: int) -> int:
    return child_step(x)


@flow
def parent(x: int = 1) -> int:
    return child(x) * 10


def test_subflow_is_its_own_pipeline_run(events: Events) -> None:
    state = parent(1, return_state=True)
    assert state.result() == 20
    final = {e["job"]["name"]: e for e in _final(events())}
    assert set(final) == {"parent", "child", "child.child_step"}
    parent_id = final["parent"]["run"]["runId"]
    assert parent_id == str(state.state_details.flow_run_id)
    assert _facet(final["child"])["extra"]["parent_flow_run_id"] == parent_id
    assert final["child.child_step"]["run"]["facets"]["parent"]["run"]["runId"] == final["child"]["run"]["runId"]


def test_task_called_outside_a_flow(events: Events) -> None:
    assert child_step(41) == 42
    evs = events()
    assert [(e["job"]["name"], e["eventType"]) for e in evs] == [("child_step.child_step", "START"),
                                                                  ("child_step.child_step", "COMPLETE")]
    assert "parent" not in evs[1]["run"]["facets"] and _facet(evs[1])["extra"]["return_value"] == 42
