"""Aggregation of recorded energy facets and the PNG/HTML plots."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from metatrail.energy.facet import TaskAccount, build_payload
from metatrail.energy.report import aggregate, plot, render_html, table
from metatrail.errors import ConfigError


def _facet(cpu: float | None, dram: float | None, gpu: float | None, estimated: float | None = None) -> dict[str, Any]:
    def dom(v: float | None) -> dict[str, Any]:
        return {"value_j": v, "reason": None if v is not None else "unreadable", "method": "rapl-counter"}

    measured = [v for v in (cpu, dram, gpu) if v is not None]
    return {
        "domains": {"cpu": dom(cpu), "dram": dom(dram), "gpu": dom(gpu)},
        "measured_j": sum(measured) if measured else None,
        "estimated_j": estimated,
        "wall_s": 10.0,
        "carbon": {"co2e_g": 0.5},
    }


RECORDS = [
    {
        "pipeline": "exatrkx",
        "stage": "embedding",
        "execution": "e1",
        "energy": _facet(100, 10, 400),
        "metrics": {"accuracy": 0.80},
    },
    {
        "pipeline": "exatrkx",
        "stage": "embedding",
        "execution": "e2",
        "energy": _facet(120, 12, 380),
        "metrics": {"accuracy": 0.84},
    },
    {
        "pipeline": "exatrkx",
        "stage": "gnn",
        "execution": "g1",
        "energy": _facet(300, 30, 2000),
        "metrics": {"accuracy": 0.93},
    },
    {"pipeline": "exatrkx", "stage": "filter", "execution": "f1", "energy": _facet(None, None, None, 55.0)},
]


def test_aggregate_by_stage() -> None:
    rows = {r.key: r for r in aggregate(RECORDS, by="stage")}
    emb = rows["exatrkx.embedding"]
    assert emb.runs == 2 and emb.cpu_j == 220 and emb.dram_j == 22 and emb.gpu_j == 780
    assert emb.measured_j == 1022 and emb.total_j == 1022 and emb.co2e_g == 1.0 and emb.wall_s == 20.0
    assert emb.metrics["accuracy"] == pytest.approx(0.82) and emb.incomplete == 0
    filt = rows["exatrkx.filter"]
    assert filt.cpu_j is None and filt.measured_j is None and filt.estimated_j == 55.0 and filt.incomplete == 1
    assert aggregate(RECORDS)[0].key == "exatrkx.gnn"  # largest first


def test_aggregate_by_execution_and_pipeline() -> None:
    assert len(aggregate(RECORDS, by="execution")) == 4
    (pipeline,) = aggregate(RECORDS, by="pipeline")
    assert pipeline.runs == 4 and pipeline.total_j == pytest.approx(1022 + 2330 + 55)
    assert table(aggregate(RECORDS))[0]["key"] == "exatrkx.gnn"
    with pytest.raises(ConfigError):
        aggregate(RECORDS, by="host")  # type: ignore[arg-type]


def test_real_payloads_aggregate() -> None:
    payload = build_payload(
        TaskAccount("x", 0.0, 0.0),
        end_mono=1.0,
        policy="busy-share",
        interval_s=1.0,
        meter={"name": "m", "version": "0"},
        missing={"cpu": "no RAPL", "dram": "no RAPL", "gpu": "no NVML"},
    )
    (row,) = aggregate([{"pipeline": "p", "stage": "s", "execution": "e", "energy": payload}])
    assert row.total_j is None and row.incomplete == 1


def test_html_is_self_contained(tmp_path: pathlib.Path) -> None:
    out = plot(aggregate(RECORDS), tmp_path / "energy.html", metric="accuracy")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 3
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "<script" not in text and "exatrkx.gnn" in text and "accuracy vs energy" in text
    assert "No metric recorded" in render_html(aggregate(RECORDS[3:]))


def test_png(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot(aggregate(RECORDS), tmp_path / "energy.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_unknown_format(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"\.png or \.html"):
        plot([], tmp_path / "energy.pdf")


def test_tradeoff_is_one_point_per_pipeline_run(tmp_path: pathlib.Path) -> None:
    """Three training runs: the trade-off compares each run's energy with the accuracy it reached, not a stage's
    average over runs."""
    records = [
        {"pipeline": "train", "stage": stage, "execution": f"{run}-{stage}", "run": run,
         "energy": _facet(10.0 * (i + 1) * (2 if stage == "fit" else 1), None, None),
         "metrics": {"accuracy": 0.7 + 0.1 * i} if stage == "eval" else {}}
        for i, run in enumerate(("r1", "r2", "r3")) for stage in ("fit", "eval")
    ]
    runs = {r.key: r for r in aggregate(records, by="run")}
    assert set(runs) == {"r1", "r2", "r3"}
    assert runs["r3"].total_j == pytest.approx(60 + 30) and runs["r3"].metrics == {"accuracy": pytest.approx(0.9)}
    (eval_stage,) = [r for r in aggregate(records) if r.stage == "eval"]
    assert eval_stage.metrics["accuracy"] == pytest.approx(0.8)  # by stage, the runs' accuracies are averaged
    page = plot(aggregate(records), tmp_path / "t.html", tradeoff=aggregate(records, by="run")).read_text()
    scatter = page[page.index("Trade-off"):page.index("<h2>Table")]
    assert scatter.count("<circle") == 3 and "accuracy = 0.9" in scatter
