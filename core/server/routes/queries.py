"""Queries: pipelines, runs (by pipeline/state/kind/time), one run with its inputs, outputs and parameters, the
lineage graph around artifacts or a run, artifacts by key or content hash, and store statistics.

A token restricted to some pipelines sees only the runs whose every event names one of those pipelines: other runs
are absent (404 for one run), and lineage graphs are cut where they would cross such a run. A run's pipeline follows
its latest event, so a run under a readable pipeline may still hold another pipeline's events (a writer that planted
a far-future event in a run id it could predict): the rule on every event keeps those out of its reach.
"""

from __future__ import annotations

import heapq
from typing import Any

from fastapi import Path, Query
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from metatrail.server.auth import READ, Principal, current, policy
from metatrail.server.errors import ApiError
from metatrail.server.routes import make_router
from metatrail.server.routes.common import HASH_PATTERN, KEY_PATTERN, UUID_PATTERN, services

router = make_router()
STATES = r"^(running|completed|failed|aborted|unknown)$"
KINDS = r"^(execution|pipeline_run|run)$"
T_MIN, T_MAX = -1e11, 1e11  # Unix seconds; anything beyond is a mistake, not a time


@router.get("/api/v1/pipelines", tags=["queries"])
@policy(READ)
async def list_pipelines(request: Request) -> dict[str, Any]:
    """Pipelines with their stages, run counts and last run time."""
    principal = current(request)
    store = services(request).store
    if principal.pipelines is None:
        return {"pipelines": await run_in_threadpool(store.list_pipelines)}
    # Counted from the runs this token may read: a run under one of its pipelines that holds another pipeline's
    # events (a planted event) is neither counted nor gives its stage.
    return {"pipelines": await run_in_threadpool(store.list_readable_pipelines, principal.pipelines)}


@router.get("/api/v1/runs", tags=["queries"])
@policy(READ)
async def list_runs(request: Request, pipeline: str | None = Query(None, max_length=1024),
                    state: str | None = Query(None, pattern=STATES), kind: str | None = Query(None, pattern=KINDS),
                    since: float | None = Query(None, ge=T_MIN, le=T_MAX),
                    until: float | None = Query(None, ge=T_MIN, le=T_MAX),
                    limit: int = Query(100, ge=1, le=10000)) -> dict[str, Any]:
    """Runs, newest first, filtered by pipeline, state, kind and start time (``since`` ≤ start < ``until``)."""
    principal = current(request)
    store = services(request).store

    allowed = principal.pipelines

    def query(p: str | None) -> list[dict[str, Any]]:
        if allowed is None:
            return store.list_runs(pipeline=p, state=state, kind=kind, since=since, until=until, limit=limit)
        return store.list_readable_runs(allowed, pipeline=p, state=state, kind=kind, since=since, until=until,
                                        limit=limit)

    if allowed is None:
        runs = await run_in_threadpool(query, pipeline)
    elif pipeline is not None:
        runs = await run_in_threadpool(query, pipeline) if principal.may_read(pipeline) else []
    else:
        per = [await run_in_threadpool(query, p) for p in sorted(allowed)]
        runs = list(heapq.merge(*per, key=lambda r: (-(r["started_at"] or 0), r["run_id"])))[:limit]
    return {"runs": runs}


async def _readable_run(request: Request, run_id: str) -> dict[str, Any]:
    """The run with its details, or 404 when there is none or the token may not read it (the same answer, so a
    restricted token cannot tell a hidden run from an absent one). Its child runs the token may not read are left
    out: their ids, stages and states are not its business either."""
    store = services(request).store
    run = await run_in_threadpool(store.get_run, run_id)
    principal = current(request)
    if run is None or not principal.may_read(run.get("pipeline")):
        raise ApiError(404, "not_found", f"no run {run_id}")
    if principal.pipelines is not None:
        children = run.get("children", [])
        ids = [run_id] + [c["run_id"] for c in children if isinstance(c.get("run_id"), str)]
        readable = await run_in_threadpool(store.readable_runs, ids, principal.pipelines)
        if run_id not in readable:
            raise ApiError(404, "not_found", f"no run {run_id}")
        run["children"] = [c for c in children if c.get("run_id") in readable]
    return run


@router.get("/api/v1/runs/{run_id}", tags=["queries"], responses={404: {"description": "no such run"}})
@policy(READ)
async def get_run(request: Request, run_id: str = Path(pattern=UUID_PATTERN)) -> dict[str, Any]:
    """One run with its inputs, outputs, parameters, facets and child runs."""
    return await _readable_run(request, run_id)


def _cut(graph: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.pipelines is None:
        return graph
    # ``readable`` is the store's verdict on every node: on every event of a run, and on an artifact whether a run the
    # token may read touches it (absent: hidden, deny by default).
    hidden = {n["id"] for n in graph["nodes"] if not n.pop("readable", False)}
    edges = [e for e in graph["edges"] if e["from"] not in hidden and e["to"] not in hidden]
    linked = {e["from"] for e in edges} | {e["to"] for e in edges}
    roots = {f"artifact:{k}" for k in graph.get("roots", [])}
    nodes = [n for n in graph["nodes"] if n["id"] not in hidden and (n["type"] == "run" or n["id"] in linked
                                                                     or n["id"] in roots)]
    return {**graph, "nodes": nodes, "edges": edges}


@router.get("/api/v1/lineage", tags=["queries"])
@policy(READ)
async def lineage(request: Request, key: list[str] | None = Query(None, max_length=100),  # noqa: B008
                  run_id: str | None = Query(None, pattern=UUID_PATTERN),
                  direction: str = Query("upstream", pattern=r"^(upstream|downstream|both)$"),
                  depth: int = Query(10, ge=0, le=100)) -> dict[str, Any]:
    """The lineage graph around artifacts (``key=md5:<hash>``, repeatable) or around a run (``run_id``: upstream
    from its inputs, downstream from its outputs)."""
    import re

    svc = services(request)
    keys = list(key or [])
    if any(not re.match(KEY_PATTERN, k) for k in keys):
        raise ApiError(422, "invalid_key", "artifact keys look like md5:<hash> or <namespace>:<name>")
    if run_id is not None:
        run = await _readable_run(request, run_id)
        side = "inputs" if direction == "upstream" else "outputs" if direction == "downstream" else None
        for edge in (run[side] if side else run["inputs"] + run["outputs"]):
            keys.append(edge["artifact_key"])
        if not keys:
            return {"roots": [], "nodes": [], "edges": []}
    if not keys:
        raise ApiError(422, "no_node", "give key=<artifact key> (repeatable) or run_id=<uuid>")
    principal = current(request)
    allowed = principal.pipelines
    if allowed is None:
        graph = await run_in_threadpool(lambda: svc.store.lineage(keys, direction=direction, depth=depth))
    else:
        graph = await run_in_threadpool(lambda: svc.store.readable_lineage(keys, allowed, direction=direction,
                                                                           depth=depth))
    return _cut(graph, principal)


@router.get("/api/v1/artifacts", tags=["queries"])
@policy(READ)
async def find_artifacts(request: Request, key: str | None = Query(None, max_length=2100),
                         hash: str | None = Query(None, pattern=HASH_PATTERN),
                         namespace: str | None = Query(None, max_length=1024),
                         name: str | None = Query(None, max_length=4096)) -> dict[str, Any]:
    """Where artifacts occur (inputs and outputs of runs), by key, content hash or dataset identity."""
    if key is None and hash is None and namespace is None and name is None:
        raise ApiError(422, "no_filter", "give key, hash, namespace or name")
    return {"artifacts": await _readable_artifacts(request, key=key, hash=hash, namespace=namespace, name=name)}


@router.get("/api/v1/artifacts/{hash}", tags=["queries"])
@policy(READ)
async def artifact_by_hash(request: Request, hash: str = Path(pattern=HASH_PATTERN)) -> dict[str, Any]:
    """Every occurrence of the artifact with this content hash: the runs that produced and consumed it."""
    rows = await _readable_artifacts(request, hash=hash)
    if not rows:
        raise ApiError(404, "not_found", f"no artifact with hash {hash}")
    return {"hash": hash, "producers": [r for r in rows if r["direction"] == "OUTPUT"],
            "consumers": [r for r in rows if r["direction"] == "INPUT"]}


async def _readable_artifacts(request: Request, **where: str | None) -> list[dict[str, Any]]:
    """The artifact occurrences (one run each) of runs the token may read. Chosen in the store's query, before its
    bound on the answer: other pipelines' occurrences filtered out afterwards could leave none of the token's."""
    store = services(request).store
    allowed = current(request).pipelines
    if allowed is None:
        return await run_in_threadpool(lambda: store.find_artifacts(**where))
    return await run_in_threadpool(lambda: store.find_readable_artifacts(allowed, **where))


@router.get("/api/v1/stats", tags=["queries"])
@policy(READ)
async def stats(request: Request) -> dict[str, Any]:
    """Counts of events, runs, pipelines and artifacts (unrestricted tokens only: counts span every pipeline)."""
    if current(request).pipelines is not None:
        raise ApiError(403, "forbidden", "statistics span every pipeline; this token is restricted to some")
    svc = services(request)
    result: dict[str, Any] = await run_in_threadpool(svc.store.stats)
    result.pop("url", None)  # the database URL is the server's business
    return {**result, "site": svc.config.site}
