"""Test helper: realistic events built with the real event builder, for store and sync tests."""

from __future__ import annotations

import random
from typing import Any

from metatrail.model import ArtifactRef, HashInfo, uuid7, uuid7_from
from metatrail.openlineage.events import build_run_event
from metatrail.openlineage.facets import MetatrailExecutionRunFacet


def artifact(path: str, digest: str | None, size: int | None = 10) -> ArtifactRef:
    return ArtifactRef(uri=path, namespace="file", name=path, hash=HashInfo("md5", digest) if digest else None,
                       size=size, hash_error=None if digest else "missing")


def execution_events(pipeline: str, stage: str, *, t0: float, inputs: list[ArtifactRef],
                     outputs: list[ArtifactRef], status: str = "COMPLETE", parent: str | None = None,
                     run_id: str | None = None, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """START and a terminal event of one execution."""
    rid = run_id or uuid7(t0)
    facet = MetatrailExecutionRunFacet(pipeline=pipeline, kind="execution", site="test", integration="PYTHON",
                                       stage=stage, params=params or {})
    common: dict[str, Any] = {"run_id": rid, "namespace": "test", "job_name": f"{pipeline}.{stage}",
                              "integration": "PYTHON", "job_type": "TASK", "execution_facet": facet,
                              "parent": (parent, "test", pipeline) if parent else None}
    start = build_run_event("START", event_time=t0, inputs=inputs, **common)
    end = build_run_event(status, event_time=t0 + 1.5, inputs=inputs, outputs=outputs,
                          error="boom" if status == "FAIL" else None, **common)
    return [start, end]


def chain(pipeline: str, stages: int, *, t0: float = 1.8e9, seed: int = 0) -> list[dict[str, Any]]:
    """A linear pipeline: stage i reads artifact i and writes artifact i+1 (hashes h0, h1, ...)."""
    rng = random.Random(seed)
    tag = f"{rng.getrandbits(32):08x}"
    parent = uuid7(t0)
    events: list[dict[str, Any]] = []
    for i in range(stages):
        events += execution_events(pipeline, f"s{i}", t0=t0 + 10 * i,
                                   inputs=[artifact(f"/data/{pipeline}/a{i}", f"{tag}{i:024x}")],
                                   outputs=[artifact(f"/data/{pipeline}/a{i + 1}", f"{tag}{i + 1:024x}")],
                                   parent=parent)
    return events


def pipeline_batch(runs: int, seed: int) -> list[dict[str, Any]]:
    """START and COMPLETE of ``runs`` executions of one pipeline run, the same events for the same arguments."""
    t0, parent = 1.8e9, uuid7_from(1.8e9, f"parent-{seed}")
    out: list[dict[str, Any]] = []
    for i in range(runs):
        out += execution_events(f"p{seed}", f"s{i}", t0=t0 + 10 * i, parent=parent,
                                run_id=uuid7_from(t0 + 10 * i, f"{seed}-{i}"),
                                inputs=[artifact(f"/data/{seed}/a{i}", f"{seed:08x}{i:024x}")],
                                outputs=[artifact(f"/data/{seed}/a{i + 1}", f"{seed:08x}{i + 1:024x}")])
    return out
