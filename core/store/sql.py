"""The SQL store (SQLite embedded default, PostgreSQL for servers), written against SQLAlchemy Core.

See :mod:`metatrail.store.base` for the contract and :mod:`metatrail.store.dialect` for what differs per database.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, and_, func, or_, select
from sqlalchemy.exc import DatabaseError

from metatrail.errors import CorruptStoreError, EventError, StoreError
from metatrail.openlineage.events import canonical_bytes
from metatrail.store import dialect
from metatrail.store.base import CanonicalEvent, EventStore, IngestResult, StoredEvent, digest
from metatrail.store.projection import EventRecord, parse_event_time, project_run
from metatrail.store.schema import CURRENT_VERSION, MIGRATIONS, edges, events, runs, schema_version

CHUNK = 500  # bound on IN (...) lists
MAX_ID = 64  # the width of run id columns (runs.run_id, events.run_id)
MAX_EVENT_TYPE = 16  # the width of events.event_type


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def prepare_event(event: Mapping[str, Any], site: str | None = None) -> tuple[str, str, EventRecord, dict[str, Any]]:
    """Check that an event can be stored and projected; return (id, canonical text, record, row values) for storing
    it as received from ``site``. A :class:`~metatrail.store.base.CanonicalEvent` brings its canonical bytes along;
    any other mapping is serialised."""
    if isinstance(event, CanonicalEvent):
        raw, eid = event.canonical, event.id
    elif not isinstance(event, Mapping):
        raise EventError(f"an event must be a JSON object, got {type(event).__name__}")
    else:
        try:
            raw = canonical_bytes(event)
        except (TypeError, ValueError) as exc:
            raise EventError(f"event is not JSON-serialisable: {exc}") from None
        eid = digest(raw)
    text_ = raw.decode("utf-8")
    etime = parse_event_time(event.get("eventTime"))
    run = event.get("run")
    run_id = run.get("runId") if isinstance(run, Mapping) else None
    job = event.get("job")
    if run is not None and not (isinstance(run_id, str) and 0 < len(run_id) <= MAX_ID):
        raise EventError(f"run.runId is required on a run event, a string of at most {MAX_ID} characters")
    event_type = event.get("eventType")
    if event_type is not None and not (isinstance(event_type, str) and len(event_type) <= MAX_EVENT_TYPE):
        raise EventError(f"eventType must be a string of at most {MAX_EVENT_TYPE} characters")
    # The projection reads the caller's own mapping: parsing the canonical text back would cost as much again.
    record = EventRecord(id=eid, time=etime, body=event, site=site)
    row = {
        "id": eid,
        "site": site,
        "run_id": run_id,
        "event_type": event_type or None,
        "event_time": etime,
        "job_namespace": job.get("namespace") if isinstance(job, Mapping) else None,
        "job_name": job.get("name") if isinstance(job, Mapping) else None,
    }
    return eid, text_, record, row


class SqlStore(EventStore):
    """An :class:`EventStore` over SQLAlchemy (``sqlite:///…`` or ``postgresql://…``)."""

    def __init__(self, url: str, *, wal_autocheckpoint: int = dialect.WAL_AUTOCHECKPOINT) -> None:
        self.url = url
        self._engine = dialect.make_engine(url, wal_autocheckpoint=wal_autocheckpoint)
        try:
            self._migrate()
        except DatabaseError as exc:
            self._engine.dispose()
            if "file is not a database" in str(exc) or "malformed" in str(exc):
                raise CorruptStoreError(f"store {url} is damaged ({exc.orig}); nothing was changed") from None
            raise StoreError(f"cannot open store {url}: {exc.orig}") from None

    # -- schema -------------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        def run() -> None:
            with self._engine.begin() as conn:
                dialect.lock_schema(conn)
                names = set(self._engine.dialect.get_table_names(conn))
                if "metatrail_schema" in names:
                    current = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
                elif names & {"events", "runs", "io_edges"} or (names and self._engine.dialect.name == "sqlite"):
                    raise CorruptStoreError(
                        f"{self.url} holds tables ({', '.join(sorted(names)[:5])}) but is not a metatrail store; "
                        "nothing was changed")
                else:
                    schema_version.create(conn)
                    current = 0
                if current > CURRENT_VERSION:
                    raise StoreError(f"store {self.url} has schema version {current}, newer than this metatrail "
                                     f"({CURRENT_VERSION}); upgrade metatrail")
                for version, step in MIGRATIONS:
                    if version > current:
                        step(conn)
                        conn.execute(schema_version.insert().values(version=version, applied_at=time.time()))

        dialect.retrying(run)

    # -- writing ------------------------------------------------------------------------------------------------
    def ingest(self, events_in: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None) -> IngestResult:
        if sites is not None and len(sites) != len(events_in):
            raise ValueError(f"{len(sites)} sites for {len(events_in)} events")
        prepared: dict[str, tuple[str, EventRecord, dict[str, Any]]] = {}
        for i, ev in enumerate(events_in):
            eid, text_, record, row = prepare_event(ev, site if sites is None else sites[i])
            prepared.setdefault(eid, (text_, record, row))
        if not prepared:
            return IngestResult(received=len(events_in), inserted=0)

        name = self._engine.dialect.name

        def run() -> IngestResult:
            with dialect.raw_transaction(self._engine) as cur:
                dialect.lock_log(cur, name)
                ids = list(prepared)
                # One look serves three needs: an event's run is part of its content, so an event already stored is
                # among the events listed for its run; those listed are what the projections are rebuilt from; and
                # their bodies come along (a second statement cost a one-event ingest more than reading them here).
                run_ids = sorted({row["run_id"] for _, _, row in prepared.values() if row["run_id"]})
                dialect.lock_runs(cur, name, run_ids)
                listed: dict[str, list[tuple[str, float, str, str | None]]] = defaultdict(list)
                for part in _chunks(run_ids):
                    clause, params = dialect.any_of(name, "run_id", part)
                    cur.execute(f"SELECT run_id, id, event_time, body, site FROM events WHERE {clause}", params)
                    for run_id, eid, etime, body, stored_site in cur.fetchall():
                        listed[run_id].append((eid, etime, body, stored_site))
                existing = {stored[0] for events_of in listed.values() for stored in events_of if stored[0] in prepared}
                runless = [i for i in ids if not prepared[i][2]["run_id"]]
                for part in _chunks(runless):
                    clause, params = dialect.any_of(name, "id", part)
                    cur.execute(f"SELECT id FROM events WHERE {clause}", params)
                    existing.update(r[0] for r in cur.fetchall())
                new_ids = [i for i in ids if i not in existing]
                if not new_ids:
                    return IngestResult(received=len(events_in), inserted=0)
                now = time.time()
                rows = [{**prepared[i][2], "ingested_at": now, "body": prepared[i][0]} for i in new_ids]
                dialect.bulk_insert(cur, name, events, rows)  # new: the log lock is held and we looked
                touched = sorted({prepared[i][2]["run_id"] for i in new_ids if prepared[i][2]["run_id"]})
                by_run: dict[str, list[EventRecord]] = defaultdict(list)
                for i in new_ids:
                    if prepared[i][2]["run_id"]:
                        by_run[prepared[i][2]["run_id"]].append(prepared[i][1])
                for run_id in touched:
                    for eid, etime, body, stored_site in listed.get(run_id, ()):
                        # Sent again: its body is at hand, but it stays the event it was, from where it first came.
                        again = prepared.get(eid)
                        by_run[run_id].append(EventRecord(id=eid, time=etime, site=stored_site,
                                                          body=again[1].body if again else orjson.loads(body)))
                self._store_projections(cur, name, touched, by_run)
            return IngestResult(received=len(events_in), inserted=len(new_ids), inserted_ids=tuple(new_ids))

        try:
            return dialect.retrying(run)
        except Exception as exc:
            if dialect.is_operational(exc):
                raise StoreError(f"cannot write store {self.url}: {getattr(exc, 'orig', None) or exc}") from None
            if dialect.is_data_error(exc):
                raise EventError(f"the store cannot hold a value of these events: {str(exc)[:200]}") from None
            raise

    @staticmethod
    def _reproject(cur: Any, name: str, run_ids: Sequence[str]) -> None:
        """Recompute the projections of ``run_ids`` from all their stored events. ``cur`` is the transaction's DBAPI
        cursor, ``name`` the dialect's name."""
        if not run_ids:
            return
        dialect.lock_runs(cur, name, run_ids)
        by_run: dict[str, list[EventRecord]] = defaultdict(list)
        for part in _chunks(run_ids):
            clause, params = dialect.any_of(name, "run_id", part)
            cur.execute(f"SELECT run_id, id, event_time, body, site FROM events WHERE {clause}", params)
            for run_id, eid, etime, body, site in cur.fetchall():
                by_run[run_id].append(EventRecord(id=eid, time=etime, body=orjson.loads(body), site=site))
        SqlStore._store_projections(cur, name, run_ids, by_run)

    @staticmethod
    def _store_projections(cur: Any, name: str, run_ids: Sequence[str],
                           by_run: Mapping[str, Sequence[EventRecord]]) -> None:
        """Write the projected rows of ``run_ids``, projected from ``by_run`` (every event of each). Edges are only
        added or updated: callers either add events to runs or have emptied ``io_edges`` first."""
        run_rows, edge_rows = [], []
        for run_id in run_ids:
            proj = project_run(run_id, by_run[run_id])
            # Only our own facet is kept on the row (lists need the parameters); get_run re-projects the rest.
            own = {k: v for k, v in proj.run["facets"].items() if k in ("metatrail_execution", "metatrail_energy")}
            run_rows.append({**proj.run, "facets": canonical_bytes(own).decode()})  # big integers too
            edge_rows.extend(proj.edges)
        dialect.bulk_insert(cur, name, runs, run_rows, mode="update", key=["run_id"])
        # A run's edges are the union of its events' inputs and outputs, so more events never remove one: upsert them
        # (an unchanged edge is not rewritten) rather than delete and insert them all again.
        dialect.bulk_insert(cur, name, edges, edge_rows, mode="refresh",
                            key=["run_id", "direction", "namespace", "name"])

    def checkpoint(self) -> tuple[int, int] | None:
        """A passive WAL checkpoint (SQLite; None elsewhere): see :func:`metatrail.store.dialect.checkpoint`."""
        return dialect.checkpoint(self._engine)

    def rebuild_projections(self) -> None:
        name = self._engine.dialect.name

        def run() -> None:
            with dialect.raw_transaction(self._engine) as cur:
                cur.execute("DELETE FROM io_edges")
                cur.execute("DELETE FROM runs")
                cur.execute("SELECT DISTINCT run_id FROM events WHERE run_id IS NOT NULL")
                run_ids = [r[0] for r in cur.fetchall()]
                for part in _chunks(run_ids):
                    self._reproject(cur, name, list(part))

        dialect.retrying(run)

    # -- reading ------------------------------------------------------------------------------------------------
    def iter_events(self, *, after_seq: int = 0, pipeline: str | None = None, run_id: str | None = None,
                    since: float | None = None, limit: int | None = None) -> Iterator[StoredEvent]:
        stmt = select(events.c.seq, events.c.id, events.c.body, events.c.site).where(events.c.seq > after_seq)
        if pipeline is not None:
            stmt = stmt.where(events.c.run_id.in_(select(runs.c.run_id).where(runs.c.pipeline == pipeline)))
        if run_id is not None:
            family = select(runs.c.run_id).where(or_(runs.c.run_id == run_id, runs.c.parent_run_id == run_id))
            stmt = stmt.where(events.c.run_id.in_(family))
        if since is not None:
            stmt = stmt.where(events.c.event_time >= since)
        stmt = stmt.order_by(events.c.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        # Page through the log so a long export holds no transaction open and little memory.
        page = 2000 if limit is None else min(limit, 2000)
        last, remaining = after_seq, limit
        while True:
            with dialect.reading(self._engine) as conn:
                q = stmt.where(events.c.seq > last).limit(page if remaining is None else min(page, remaining))
                rows = conn.execute(q).all()
            for seq, eid, body, site in rows:
                yield StoredEvent(seq=seq, id=eid, body=orjson.loads(body), site=site)
            if not rows or len(rows) < page:
                return
            last = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)
                if remaining <= 0:
                    return

    @staticmethod
    def _run_dict(row: Any) -> dict[str, Any]:
        d = dict(row._mapping)
        facets = orjson.loads(d.pop("facets"))
        ours = facets.get("metatrail_execution") or {}
        d["params"] = ours.get("params", {})
        d["metrics"] = ours.get("metrics", {})
        d["energy"] = facets.get("metatrail_energy")
        d["duration_s"] = (d["ended_at"] - d["started_at"]) if d["ended_at"] and d["started_at"] else None
        return d

    def list_runs(self, *, pipeline: str | None = None, state: str | None = None, kind: str | None = None,
                  since: float | None = None, until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(runs)
        conds = []
        if pipeline is not None:
            conds.append(runs.c.pipeline == pipeline)
        if state is not None:
            conds.append(runs.c.state == state)
        if kind is not None:
            conds.append(runs.c.kind == kind)
        if since is not None:
            conds.append(runs.c.started_at >= since)
        if until is not None:
            conds.append(runs.c.started_at < until)
        if conds:
            stmt = stmt.where(and_(*conds))
        stmt = stmt.order_by(runs.c.started_at.desc(), runs.c.run_id).limit(limit)
        with dialect.reading(self._engine) as conn:
            return [self._run_dict(r) for r in conn.execute(stmt)]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with dialect.reading(self._engine) as conn:
            row = conn.execute(select(runs).where(runs.c.run_id == run_id)).first()
            if row is None:
                return None
            run = self._run_dict(row)
            columns = select(events.c.id, events.c.event_time, events.c.body)
            records = [EventRecord(id=eid, time=etime, body=orjson.loads(body))
                       for eid, etime, body in conn.execute(columns.where(events.c.run_id == run_id))]
            run["facets"] = project_run(run_id, records).run["facets"]
            io = conn.execute(select(edges).where(edges.c.run_id == run_id)
                              .order_by(edges.c.direction, edges.c.namespace, edges.c.name)).all()
            children = conn.execute(select(runs.c.run_id, runs.c.pipeline, runs.c.stage, runs.c.state,
                                           runs.c.started_at)
                                    .where(runs.c.parent_run_id == run_id).order_by(runs.c.started_at)).all()
        run["inputs"] = [dict(e._mapping) for e in io if e.direction == "INPUT"]
        run["outputs"] = [dict(e._mapping) for e in io if e.direction == "OUTPUT"]
        run["children"] = [dict(c._mapping) for c in children]
        return run

    def run_pipelines(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The pipeline of each of ``run_ids`` that is stored (the server's write checks for restricted tokens)."""
        found: dict[str, str] = {}
        with dialect.reading(self._engine) as conn:
            for part in _chunks(sorted(set(run_ids))):
                rows = conn.execute(select(runs.c.run_id, runs.c.pipeline).where(runs.c.run_id.in_(part)))
                found.update((r.run_id, r.pipeline) for r in rows)
        return found

    def list_pipelines(self) -> list[dict[str, Any]]:
        stmt = (select(runs.c.pipeline, runs.c.namespace, func.count().label("runs"),
                       func.max(runs.c.started_at).label("last_started_at"))
                .group_by(runs.c.pipeline, runs.c.namespace).order_by(runs.c.pipeline))
        stages = select(runs.c.pipeline, runs.c.stage).where(runs.c.stage.is_not(None)).distinct()
        with dialect.reading(self._engine) as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
            by_pipeline: dict[str, list[str]] = defaultdict(list)
            for p, s in conn.execute(stages):
                by_pipeline[p].append(s)
        for r in rows:
            r["stages"] = sorted(by_pipeline.get(r["pipeline"], []))
        return rows

    def find_artifacts(self, *, key: str | None = None, hash: str | None = None,
                       namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        stmt = select(edges, runs.c.pipeline, runs.c.stage, runs.c.started_at, runs.c.state).join(
            runs, runs.c.run_id == edges.c.run_id)
        if key is not None:
            stmt = stmt.where(edges.c.artifact_key == key)
        if hash is not None:
            stmt = stmt.where(or_(edges.c.hash == hash, edges.c.version == hash))
        if namespace is not None:
            stmt = stmt.where(edges.c.namespace == namespace)
        if name is not None:
            stmt = stmt.where(edges.c.name == name)
        with dialect.reading(self._engine) as conn:
            return [dict(r._mapping) for r in conn.execute(stmt.order_by(runs.c.started_at.desc()).limit(1000))]

    def lineage(self, artifact_keys: Sequence[str], *, direction: str = "upstream", depth: int = 10,
                may_read: Callable[[str | None], bool] | None = None) -> dict[str, Any]:
        if direction not in ("upstream", "downstream", "both"):
            raise ValueError("direction must be upstream, downstream or both")
        nodes: dict[str, dict[str, Any]] = {}
        graph_edges: set[tuple[str, str, str]] = set()
        named: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # node -> name -> run ids
        with dialect.reading(self._engine) as conn:
            for d in (("upstream", "downstream") if direction == "both" else (direction,)):
                self._walk(conn, list(artifact_keys), d, depth, nodes, graph_edges, named)

        def shown(run_id: str) -> bool:
            run = nodes.get(f"run:{run_id}")
            return may_read is None or (run is not None and may_read(run.get("pipeline")))

        for node_id, names in named.items():
            nodes[node_id]["names"] = sorted(n for n, run_ids in names.items() if any(map(shown, run_ids)))
        return {
            "roots": list(artifact_keys),
            "nodes": sorted(nodes.values(), key=lambda n: (n["type"], n["id"])),
            "edges": [{"from": a, "to": b, "type": t} for a, b, t in sorted(graph_edges)],
        }

    def _walk(self, conn: Connection, frontier: list[str], direction: str, depth: int,
              nodes: dict[str, dict[str, Any]], graph_edges: set[tuple[str, str, str]],
              named: dict[str, dict[str, set[str]]]) -> None:
        # upstream: artifact <-OUTPUT- run <-INPUT- artifact ...; downstream the mirror image.
        seen_art: set[str] = set()
        seen_runs: set[str] = set()
        first_dir, second_dir = ("OUTPUT", "INPUT") if direction == "upstream" else ("INPUT", "OUTPUT")
        for _ in range(max(depth, 0)):
            frontier = [k for k in frontier if k not in seen_art]
            if not frontier:
                break
            seen_art.update(frontier)
            run_ids: set[str] = set()
            for part in _chunks(frontier):
                for e in conn.execute(select(edges).where(and_(edges.c.artifact_key.in_(part),
                                                               edges.c.direction == first_dir))):
                    self._add_artifact(nodes, e, named)
                    run_ids.add(e.run_id)
            run_ids -= seen_runs
            if not run_ids:
                break
            seen_runs.update(run_ids)
            nxt: list[str] = []
            for part in _chunks(sorted(run_ids)):
                for r in conn.execute(select(runs).where(runs.c.run_id.in_(part))):
                    nodes[f"run:{r.run_id}"] = {"type": "run", "id": f"run:{r.run_id}", "run_id": r.run_id,
                                                "pipeline": r.pipeline, "stage": r.stage, "state": r.state,
                                                "started_at": r.started_at, "site": r.site}
                for e in conn.execute(select(edges).where(edges.c.run_id.in_(part))):
                    self._add_artifact(nodes, e, named)
                    art, run = f"artifact:{e.artifact_key}", f"run:{e.run_id}"
                    graph_edges.add((art, run, "input") if e.direction == "INPUT" else (run, art, "output"))
                    if e.direction == second_dir:
                        nxt.append(e.artifact_key)
            frontier = nxt

    @staticmethod
    def _add_artifact(nodes: dict[str, dict[str, Any]], e: Any, named: dict[str, dict[str, set[str]]]) -> None:
        node_id = f"artifact:{e.artifact_key}"
        nodes.setdefault(node_id, {"type": "artifact", "id": node_id, "key": e.artifact_key,
                                   "hash": e.hash, "algorithm": e.algorithm, "size": e.size, "names": []})
        named[node_id][f"{e.namespace}:{e.name}" if e.namespace != "file" else e.name].add(e.run_id)

    def stats(self) -> dict[str, Any]:
        with dialect.reading(self._engine) as conn:
            return {
                "url": self.url,
                "events": conn.execute(select(func.count()).select_from(events)).scalar(),
                "last_seq": conn.execute(select(func.max(events.c.seq))).scalar() or 0,
                "runs": conn.execute(select(func.count()).select_from(runs)).scalar(),
                "executions": conn.execute(select(func.count()).select_from(runs).where(runs.c.kind == "execution"))
                .scalar(),
                "pipelines": conn.execute(select(func.count(runs.c.pipeline.distinct()))).scalar(),
                "artifacts": conn.execute(select(func.count(edges.c.artifact_key.distinct()))).scalar(),
                "states": dict(conn.execute(select(runs.c.state, func.count()).group_by(runs.c.state)).all()),
            }

    def close(self) -> None:
        self._engine.dispose()
