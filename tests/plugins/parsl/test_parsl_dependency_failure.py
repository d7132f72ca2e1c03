"""Real Parsl runs of tasks that a failed dependency stopped: each argument is recorded under its own name.

Parsl's DFK drops a failed dependency from a task's positional arguments before it fails the task, so the task
record's arguments, described by position, would name ``f(ok, failed, c)``'s ``c`` as ``failed``.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from olspec import assert_valid
from parsl.dataflow.dependency_resolvers import SHALLOW_DEPENDENCY_RESOLVER
from parsl_helpers import HERE, outcome, run_script, stored_events

from metatrail.plugins.parsl.submitted import POSITIONAL_UNKNOWN, call_as_submitted

DEPENDENCY_FAILURE = HERE / "workflows" / "dependency_failure.py"


@pytest.mark.parametrize("resolver", ["shallow", "deep"])
def test_a_failed_dependency_among_the_arguments_keeps_each_argument_under_its_name(tmp_path: Path,
                                                                                    resolver: str) -> None:
    results = run_script(tmp_path / "work", DEPENDENCY_FAILURE, [resolver])
    calls = ["after", "pending", "keyword"] + (["nested"] if resolver == "deep" else [])
    assert outcome(results) == dict.fromkeys(calls, "DependencyError")
    tasks = results["_tasks"]

    def expected(call: str) -> dict[str, Any]:
        mark = f"<failed dependency: task {tasks[call]['failed']}>"  # in its own place, not a future's repr
        if call == "nested":
            return {"a": mark, "b": 2, "c": 3}  # combine([ok, bad], 2, 3): the DFK dropped the whole list
        return {"a": 1, "b": mark, "c": 3}

    events = stored_events()
    for event in events:
        assert_valid(event)
    by_task: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        facet = event["run"]["facets"]["metatrail_execution"]
        if event["job"]["name"] == "dependency_failure.combine":
            by_task.setdefault(facet["extra"]["parsl_task_id"], []).append(facet | {"type": event["eventType"]})
    assert sorted(by_task) == sorted(tasks[call]["task"] for call in calls)
    for call in calls:
        recorded = by_task[tasks[call]["task"]]
        assert [f["type"] for f in recorded] == ["START", "FAIL"], call
        for facet in recorded:
            assert facet["params"] == expected(call), call
            assert facet["warnings"] == [], call
            assert facet["extra"]["dependency_failed"] is True
            assert facet["extra"]["depends_on"] == [tasks[call]["ok"], tasks[call]["failed"]], call


def test_arguments_whose_places_cannot_be_told_are_left_out_saying_why() -> None:
    done: Future[int] = Future()
    done.set_result(1)
    failed: Future[int] = Future()
    failed.set_exception(ValueError("no value"))
    # As submitted, each argument in its place (what the DFK left of the others, in order)
    assert call_as_submitted((done, failed, 3), (1, 3), {"k": failed, "n": 4}, SHALLOW_DEPENDENCY_RESOLVER) == (
        (1, "<failed dependency>", 3), {"k": "<failed dependency>", "n": 4}, [])
    # Not known as submitted: keyword arguments by their names, positional ones left out, and why
    assert call_as_submitted(None, (1, 3), {"n": 4}, SHALLOW_DEPENDENCY_RESOLVER) == (
        (), {"n": 4}, [POSITIONAL_UNKNOWN])
    # More arguments dropped than failed futures among them (a staged File whose staging failed): left out
    assert call_as_submitted(("in.txt", failed, 3), (3,), {}, SHALLOW_DEPENDENCY_RESOLVER) == (
        (), {}, [POSITIONAL_UNKNOWN])
