"""Real Parsl runs of what happens at a DFK's edges: events still pending at cleanup, one DFK after another in a
process, arguments the plugin cannot inspect, and HTEX tries that fail outside the app body (a lost worker, a result
that cannot be sent back)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from olspec import assert_valid
from parsl_helpers import HERE, outcome, run_script, stored_events

LIFECYCLE = HERE / "workflows" / "threads_lifecycle.py"
OUTSIDE_APP = HERE / "workflows" / "outside_app.py"


def _facet(event: dict[str, Any]) -> dict[str, Any]:
    facet: dict[str, Any] = event["run"]["facets"]["metatrail_execution"]
    return facet


def test_events_pending_at_cleanup_are_stored_before_exit(tmp_path: Path) -> None:
    # Hashing the inputs takes far longer than the call cap: the events are still pending when the DFK cleans up,
    # and must be stored within METATRAIL_FLUSH_TIMEOUT, as at any exit, not dropped at the call cap.
    results = run_script(tmp_path / "work", LIFECYCLE, ["slow-hash"], env={"METATRAIL_TIMEOUT": "0.01"})
    assert outcome(results) == {"sizes": [48, 48, 48]}
    assert "not stored before exit" not in results["_stderr"], results["_stderr"]
    events = stored_events()
    for event in events:
        assert_valid(event)
    assert Counter((e["job"]["name"], e["eventType"]) for e in events) == {
        ("threads_lifecycle", "START"): 1, ("threads_lifecycle", "COMPLETE"): 1,
        ("threads_lifecycle.size", "START"): 3, ("threads_lifecycle.size", "COMPLETE"): 3}
    hashed = [d for e in events if e["eventType"] == "START" for d in e["inputs"]]
    assert len(hashed) == 3 and all(d["facets"]["metatrail_artifact"]["hash"] for d in hashed)


def test_each_dfk_releases_its_recorder(tmp_path: Path) -> None:
    results = run_script(tmp_path / "work", LIFECYCLE, ["cycles"])
    assert outcome(results) == {"registered": 0, "open": 0}
    runs = [e for e in stored_events() if e["job"]["name"] == "threads_lifecycle"]
    assert [e["eventType"] for e in runs] == ["START", "COMPLETE"] * 5


def test_an_argument_whose_getattr_raises_keyerror_is_recorded(tmp_path: Path) -> None:
    results = run_script(tmp_path / "work", LIFECYCLE, ["odd-args"])
    assert outcome(results) == {"lr": 0.5}
    assert "metatrail:" not in results["_stderr"], results["_stderr"]
    task = [e for e in stored_events() if e["job"]["name"] == "threads_lifecycle.learning_rate"]
    assert [e["eventType"] for e in task] == ["START", "COMPLETE"]
    assert all(_facet(e)["params"] == {"cfg": {"lr": 0.5}} for e in task)


def test_tries_failing_outside_the_app_end_failed_with_their_arguments(tmp_path: Path) -> None:
    results = run_script(tmp_path / "work", OUTSIDE_APP, [])
    assert outcome(results) == {"die": "survived", "generator": "TypeError"}
    events = stored_events()
    for event in events:
        assert_valid(event)
    tries: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for event in events:
        if _facet(event)["kind"] == "execution":
            tries.setdefault((event["job"]["name"], _facet(event)["tryNumber"]), []).append(event)

    # The lost worker took its try's START with it; the DFK's FAIL still names the call's arguments.
    (lost,) = [e for e in tries["outside_app.die", 1] if e["eventType"] != "START"]
    assert lost["eventType"] == "FAIL" and _facet(lost)["extra"]["recorded_by"] == "dfk"
    assert _facet(lost)["params"] == {"marker": str(tmp_path / "work" / "died.marker"), "x": 42}
    assert [e["eventType"] for e in tries["outside_app.die", 2]] == ["START", "COMPLETE"]

    # Each try of the generator app: the worker saw its body succeed (COMPLETE), Parsl failed the try when the result
    # could not be sent back; the DFK's FAIL comes later, so it is the try's outcome.
    for attempt in (1, 2):
        ends = sorted((e for e in tries["outside_app.generator", attempt] if e["eventType"] != "START"),
                      key=lambda e: e["eventTime"])
        # (the worker's COMPLETE may still be on its way when cleanup ends: HTEX stops workers with SIGTERM)
        assert [e["eventType"] for e in ends] in (["COMPLETE", "FAIL"], ["FAIL"])
        assert _facet(ends[-1])["extra"]["recorded_by"] == "dfk"
        assert "generator" in ends[-1]["run"]["facets"]["errorMessage"]["message"]
        assert _facet(ends[-1])["params"] == {"n": 3}
