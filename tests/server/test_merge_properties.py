"""Property tests (hypothesis) of merge = set union of events, then projections: commutative, associative,
idempotent, and sites converge whatever order they sync in, on SQLite stores and between a SQLite site and a
PostgreSQL one. Real stores; the real transfer code."""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eventgen import artifact, execution_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metatrail.openlineage.events import event_id
from metatrail.store import open_store
from metatrail.store.base import EventStore
from metatrail.sync import SyncLog, merge


def _universe() -> list[dict[str, Any]]:
    """Events of three pipelines whose artifacts join by hash (prep's output is train's input), with failed,
    unfinished and retried runs, so projections have something to disagree about."""
    events: list[dict[str, Any]] = []
    raw, clean, model = "1" * 32, "2" * 32, "3" * 32
    events += execution_events("prep", "clean", t0=1.8e9, inputs=[artifact("/d/raw", raw)],
                               outputs=[artifact("/d/clean", clean)])
    events += execution_events("prep", "clean", t0=1.8e9 + 5, inputs=[artifact("/d/raw", raw)],
                               outputs=[], status="FAIL")
    events += execution_events("train", "fit", t0=1.8e9 + 20, inputs=[artifact("/x/clean.csv", clean)],
                               outputs=[artifact("/x/model", model)], params={"lr": 0.1})
    events += execution_events("train", "eval", t0=1.8e9 + 40, inputs=[artifact("/x/model", model)],
                               outputs=[artifact("/x/score", "4" * 32)])[:1]  # started, never finished
    events += execution_events("refine", "tune", t0=1.8e9 + 60, inputs=[artifact("/y/model", model)],
                               outputs=[artifact("/y/model2", "5" * 32)])
    return events


UNIVERSE = _universe()
subsets = st.lists(st.integers(0, len(UNIVERSE) - 1), max_size=len(UNIVERSE))


@contextmanager
def _stores(n: int) -> Iterator[list[EventStore]]:
    # Memory-backed when available: these examples create hundreds of small databases.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="mt-merge-", dir=shm) as tmp:
        stores = [open_store(f"sqlite:///{Path(tmp) / f's{i}.db'}") for i in range(n)]
        try:
            yield stores
        finally:
            for s in stores:
                s.close()


def _fill(store: EventStore, picks: list[int], seed: int = 0) -> None:
    events = [UNIVERSE[i] for i in picks]
    random.Random(seed).shuffle(events)
    for i in range(0, len(events), 3):  # several ingests, in any order, duplicates included
        store.ingest(events[i : i + 3])


def snapshot(store: EventStore) -> tuple[Any, ...]:
    """What a store *is*: the set of events and every projection derived from it."""
    log = SyncLog(store.url)
    try:
        digest = log.digest()["digest"]
    finally:
        log.close()
    runs = sorted(json.dumps(r, sort_keys=True) for r in store.list_runs(limit=10_000))
    details = sorted(json.dumps(store.get_run(json.loads(r)["run_id"]), sort_keys=True) for r in runs)
    keys = sorted({e["artifact_key"] for r in details for e in json.loads(r)["inputs"] + json.loads(r)["outputs"]})
    graph = json.dumps(store.lineage(keys, direction="both"), sort_keys=True) if keys else ""
    return digest, tuple(runs), tuple(details), graph


def _union(picks: list[int]) -> set[str]:
    return {event_id(UNIVERSE[i]) for i in picks}


COMMON = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(a=subsets, b=subsets)
def test_merge_is_commutative(a: list[int], b: list[int]) -> None:
    with _stores(4) as (sa, sb, x, y):
        _fill(sa, a)
        _fill(sb, b, seed=1)
        merge(sa, x)
        merge(sb, x)
        merge(sb, y)
        merge(sa, y)
        assert snapshot(x) == snapshot(y)
        log = SyncLog(x.url)
        try:
            assert log.missing(sorted(_union(a + b))) == []
            assert log.digest()["events"] == len(_union(a + b))
        finally:
            log.close()


@COMMON
@given(a=subsets, b=subsets, c=subsets)
def test_merge_is_associative(a: list[int], b: list[int], c: list[int]) -> None:
    with _stores(7) as (sa, sb, sc, ab, ab_c, bc, a_bc):
        _fill(sa, a)
        _fill(sb, b, seed=1)
        _fill(sc, c, seed=2)
        merge(sa, ab)
        merge(sb, ab)
        merge(ab, ab_c)
        merge(sc, ab_c)
        merge(sb, bc)
        merge(sc, bc)
        merge(sa, a_bc)
        merge(bc, a_bc)
        assert snapshot(ab_c) == snapshot(a_bc)


@COMMON
@given(a=subsets, b=subsets)
def test_merge_is_idempotent(a: list[int], b: list[int]) -> None:
    with _stores(2) as (sa, x):
        _fill(sa, a)
        _fill(x, b, seed=3)
        merge(sa, x)
        once = snapshot(x)
        again = merge(sa, x)
        assert again.inserted == 0 and again.sent == 0
        merge(x, x)
        assert snapshot(x) == once


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(subsets, min_size=3, max_size=3),
       syncs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=8))
def test_sites_converge_whatever_the_order(parts: list[list[int]], syncs: list[tuple[int, int]]) -> None:
    with _stores(4) as stores:
        sites, reference = stores[:3], stores[3]
        for i, part in enumerate(parts):
            _fill(sites[i], part, seed=i)
            _fill(reference, part, seed=10 + i)
        for src, dst in syncs:  # partial, arbitrary syncing first
            merge(sites[src], sites[dst])
        for _ in range(2):  # then everyone syncs with everyone
            for src in range(3):
                for dst in range(3):
                    merge(sites[src], sites[dst])
        expected = snapshot(reference)
        assert all(snapshot(s) == expected for s in sites)


@contextmanager
def _postgresql_store(server: str) -> Iterator[EventStore]:
    import psycopg

    name = f"mt_merge_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    store = open_store(f"{server}/{name}")
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(a=subsets, b=subsets)
def test_a_sqlite_site_and_a_postgresql_site_converge(pg_server: str, a: list[int], b: list[int]) -> None:
    # Sites run either backend: after syncing both ways they hold the same events and project them alike.
    with _stores(1) as (lite,), _postgresql_store(pg_server) as pg:
        _fill(lite, a)
        _fill(pg, b, seed=1)
        merge(lite, pg)
        merge(pg, lite)
        assert snapshot(lite) == snapshot(pg)
        log = SyncLog(pg.url)
        try:
            assert log.digest()["events"] == len(_union(a + b))
        finally:
            log.close()
