"""Golden-event tests: real flows run by real Prefect, the events the plugin stored, compared with reviewed expected
files (ids, times and temporary paths normalised); every event must be valid OpenLineage that Marquez accepts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from golden import assert_golden, normalise
from olspec import assert_valid
from prefect import flow
from prefect.assets import materialize
from prefect_flows import etl, failing

from metatrail.hashing import hash_path

GOLDEN = Path(__file__).parent / "golden"
Events = Callable[[], list[dict[str, Any]]]


def _facet(event: dict[str, Any]) -> dict[str, Any]:
    facet: dict[str, Any] = event["run"]["facets"]["metatrail_execution"]
    return facet


def _check_golden(evs: list[dict[str, Any]], tmp_path: Path, name: str) -> None:
    for event in evs:
        assert_valid(event)
    assert_golden(normalise(evs, paths={str(tmp_path): "<tmp>"}), GOLDEN / f"{name}.json")


def test_etl_with_retry(tmp_path: Path, events: Events) -> None:
    work = tmp_path / "work"
    work.mkdir()
    state = etl(str(work), return_state=True)
    assert state.is_completed()
    assert state.result() == {"report": str(work / "report.json"), "rows": 3}
    evs = events()
    _check_golden(evs, tmp_path, "etl")

    flow_run_id = str(state.state_details.flow_run_id)
    pipeline = [e for e in evs if e["job"]["name"] == "etl"]
    assert {e["run"]["runId"] for e in pipeline} == {flow_run_id}  # Prefect's own id
    assert [e["eventType"] for e in pipeline] == ["START", "COMPLETE"]
    assert all(e["job"]["namespace"] == "prefect" for e in evs)

    loads = [e for e in evs if e["job"]["name"] == "etl.load"]
    tries = {_facet(e)["tryNumber"]: e for e in loads if e["eventType"] != "START"}
    assert tries[1]["eventType"] == "FAIL" and tries[2]["eventType"] == "COMPLETE"
    assert tries[1]["run"]["facets"]["errorMessage"]["message"] == "ConnectionError: warehouse not reachable"
    first, second = tries[1]["run"]["runId"], tries[2]["run"]["runId"]
    assert first == _facet(tries[1])["extra"]["prefect_task_run_id"] == _facet(tries[2])["extra"]["prefect_task_run_id"]
    assert uuid.UUID(second).version == 7 and second != first
    for event in evs:
        if event["job"]["name"] != "etl":
            assert event["run"]["facets"]["parent"]["run"]["runId"] == flow_run_id

    completes = {e["job"]["name"]: e for e in evs if e["eventType"] == "COMPLETE"}
    raw = hash_path(work / "raw.txt")
    assert raw.hash is not None
    assert completes["etl.extract"]["outputs"][0]["facets"]["version"]["datasetVersion"] == raw.hash.value
    assert completes["etl.transform"]["inputs"][0]["facets"]["version"]["datasetVersion"] == raw.hash.value
    assert _facet(completes["etl.transform"])["params"]["options"] == "<prefect_flows.Opaque object>"
    assert _facet(completes["etl.load"])["extra"]["return_value"] == {"report": str(work / "report.json"),
                                                                       "rows": 3}
    extract_id = completes["etl.extract"]["run"]["runId"]
    assert _facet(completes["etl.transform"])["extra"]["upstream"] == {"raw": [extract_id]}


def test_failing_flow(tmp_path: Path, events: Events) -> None:
    state = failing(7, return_state=True)
    assert state.is_failed()
    evs = events()
    _check_golden(evs, tmp_path, "failing")
    final = {e["job"]["name"]: e for e in evs if e["eventType"] != "START"}
    assert final["failing.explode"]["eventType"] == "FAIL" and final["failing"]["eventType"] == "FAIL"
    assert final["failing.explode"]["run"]["facets"]["errorMessage"]["message"] == "RuntimeError: bad input 7"
    assert "RuntimeError: bad input 7" in final["failing"]["run"]["facets"]["errorMessage"]["message"]
    assert _facet(final["failing.explode"])["extra"]["state"] == "Failed"


def test_assets(tmp_path: Path, events: Events) -> None:
    orders = tmp_path / "orders.csv"
    summary = tmp_path / "summary.csv"

    @materialize(f"file://{orders}", asset_deps=["s3://landing/raw/orders.json"], task_run_name="ingest")
    def ingest() -> int:
        orders.write_text("id,amount\n1,10\n2,32\n")
        return 2

    @materialize(f"file://{summary}", task_run_name="summarise")
    def summarise(count: int) -> None:
        summary.write_text(f"orders,{count}\n")

    @flow(flow_run_name="assets-run")
    def assets() -> None:
        # Prefect links a downstream task to an upstream one through a future (or a tracked result object).
        summarise.submit(ingest.submit()).result()

    assets()
    evs = events()
    _check_golden(evs, tmp_path, "assets")
    final = {e["job"]["name"]: e for e in evs if e["eventType"] == "COMPLETE"}
    ingest_ev, summarise_ev = final["assets.ingest"], final["assets.summarise"]
    orders_ref = hash_path(orders)
    assert orders_ref.hash is not None
    assert [(o["namespace"], o["name"]) for o in ingest_ev["outputs"]] == [("file", str(orders))]
    assert ingest_ev["outputs"][0]["facets"]["version"]["datasetVersion"] == orders_ref.hash.value
    assert [(i["namespace"], i["name"]) for i in ingest_ev["inputs"]] == [("s3://landing", "raw/orders.json")]
    # The upstream task's asset is an input of the downstream one, with the same content hash.
    assert [i["name"] for i in summarise_ev["inputs"]] == [str(orders)]
    assert summarise_ev["inputs"][0]["facets"]["version"]["datasetVersion"] == orders_ref.hash.value
    assert [o["name"] for o in summarise_ev["outputs"]] == [str(summary)]
