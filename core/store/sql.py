"""The SQL store (SQLite embedded default, PostgreSQL for servers), written against SQLAlchemy Core.

See :mod:`metatrail.store.base` for the contract, :mod:`metatrail.store.ingest` for the ingest transaction (shared
with the Recorder's SQLite writer) and :mod:`metatrail.store.dialect` for what differs per database.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, Text, and_, exists, false, func, literal, not_, or_, select
from sqlalchemy.exc import DatabaseError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from metatrail.errors import CorruptStoreError, EventError, StoreError
from metatrail.store import dialect, ingest
from metatrail.store.base import EventStore, IngestResult, StoredEvent
from metatrail.store.ingest import chunks as _chunks
from metatrail.store.projection import ABANDONED_PREFIX, EventRecord, project_run
from metatrail.store.schema import CURRENT_VERSION, MIGRATIONS, edges, events, runs, schema_version


class _EventPipeline(FunctionElement[str]):
    """The pipeline one stored event names, by :func:`~metatrail.store.projection.event_pipeline`'s rule, computed
    from its body: our facet's pipeline (a non-empty string), else the parent job's name (likewise), else the job's
    name. Arguments: the event's ``body`` and ``job_name`` columns."""

    type = Text()
    name = "metatrail_event_pipeline"
    inherit_cache = True


_OURS = ("run", "facets", "metatrail_execution", "pipeline")
_PARENT = ("run", "facets", "parent", "job", "name")


@compiles(_EventPipeline, "sqlite")
def _event_pipeline_sqlite(element: _EventPipeline, compiler: SQLCompiler, **kw: Any) -> str:
    body, job = (compiler.process(c, **kw) for c in element.clauses)

    def text_at(path: tuple[str, ...]) -> tuple[str, str]:
        where = "'$." + ".".join(path) + "'"
        value = f"json_extract({body}, {where})"
        return f"json_type({body}, {where}) = 'text' AND {value} <> ''", value

    (ours_ok, ours), (parent_ok, parent) = text_at(_OURS), text_at(_PARENT)
    return f"(CASE WHEN {ours_ok} THEN {ours} WHEN {parent_ok} THEN {parent} ELSE {job} END)"


@compiles(_EventPipeline, "postgresql")
def _event_pipeline_postgresql(element: _EventPipeline, compiler: SQLCompiler, **kw: Any) -> str:
    body, job = (compiler.process(c, **kw) for c in element.clauses)

    def text_at(path: tuple[str, ...]) -> tuple[str, str]:
        where = "'{" + ",".join(path) + "}'"
        return f"jsonb_typeof(mt_j.j #> {where}) = 'string' AND mt_j.j #>> {where} <> ''", f"mt_j.j #>> {where}"

    (ours_ok, ours), (parent_ok, parent) = text_at(_OURS), text_at(_PARENT)
    # The body is text: parse it once per event (each CAST in the CASE would parse it again).
    return (f"(SELECT CASE WHEN {ours_ok} THEN {ours} WHEN {parent_ok} THEN {parent} ELSE {job} END "
            f"FROM (SELECT CAST({body} AS jsonb) AS j) AS mt_j)")


def readable_run(pipelines: frozenset[str]) -> ColumnElement[bool]:
    """Whether a reader limited to ``pipelines`` may read a run (a row of ``runs`` in the enclosing query): its
    pipeline is one of them and every stored event of the run names one of them. A run's pipeline follows its latest
    event, so a writer that plants a far-future event in a run it can predict keeps the run under its own pipeline;
    the owner's events of that run name the owner's pipeline and hide the run from it. Correlated ``NOT EXISTS`` over
    the events of the one run (the ``run_id`` index); an event without a derivable pipeline counts as foreign (deny
    by default)."""
    other = events.alias("readable_ev")
    named = _EventPipeline(other.c.body, other.c.job_name)
    # OFFSET 0 keeps PostgreSQL from turning the NOT EXISTS into an anti-join, which read and parsed every stored
    # event (all of them, before any LIMIT); as a correlated subplan it looks only at the runs the query reaches,
    # through the run_id index.
    # One evaluation of the name per event (NULL, no pipeline: not readable).
    readable_name = func.coalesce(named.in_(sorted(pipelines)), false())
    foreign = select(literal(1)).where(other.c.run_id == runs.c.run_id, not_(readable_name)).offset(0)
    # A run whose events all name its own pipeline (``runs.mixed`` 0, kept by ingest) needs no look at its events
    # once its pipeline is one of ``pipelines``. Only mixed runs pay for parsing event bodies.
    return and_(runs.c.pipeline.in_(sorted(pipelines)), or_(runs.c.mixed == 0, ~exists(foreign)))


def mark_unmixed_runs(conn: Connection) -> None:
    """Set ``runs.mixed`` to 0 for every run whose stored events all name its pipeline (the version-4 migration;
    the column's default, 1, makes a reader limited to some pipelines look at a run's events)."""
    other = events.alias("mixed_ev")
    named = _EventPipeline(other.c.body, other.c.job_name)
    foreign = select(literal(1)).where(other.c.run_id == runs.c.run_id,
                                       not_(func.coalesce(named == runs.c.pipeline, false()))).offset(0)
    conn.execute(runs.update().where(~exists(foreign)).values(mixed=0))


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
               sites: Sequence[str | None] | None = None,
               allowed_pipelines: frozenset[str] | None = None) -> IngestResult:
        """See :meth:`EventStore.ingest`. ``allowed_pipelines`` (a server's write for a token limited to some
        pipelines): nothing is stored, :class:`~metatrail.errors.ForeignRunError`, when a run of the events is
        stored under another pipeline; checked inside the write's transaction."""
        prepared = ingest.prepare_batch(events_in, site, sites)
        if not prepared:
            return IngestResult(received=len(events_in), inserted=0)
        name = self._engine.dialect.name

        def run() -> IngestResult:
            with dialect.raw_transaction(self._engine, journals_in_memory=True) as cur:
                return ingest.ingest_prepared(cur, name, prepared, len(events_in),
                                              allowed_pipelines=allowed_pipelines)

        try:
            return dialect.retrying(run)
        except Exception as exc:
            if dialect.is_operational(exc):
                raise StoreError(f"cannot write store {self.url}: {getattr(exc, 'orig', None) or exc}") from None
            if ingest.is_data_error(exc):
                raise EventError(f"the store cannot hold a value of these events: {str(exc)[:200]}") from None
            raise

    @staticmethod
    def _reproject(cur: Any, name: str, run_ids: Sequence[str]) -> None:
        """Recompute the projections of ``run_ids`` from all their stored events. ``cur`` is the transaction's DBAPI
        cursor, ``name`` the dialect's name."""
        if not run_ids:
            return
        ingest.lock_runs(cur, name, run_ids)
        by_run: dict[str, list[EventRecord]] = defaultdict(list)
        for part in _chunks(run_ids):
            clause, params = ingest.any_of(name, "run_id", part)
            cur.execute(f"SELECT run_id, id, event_time, body, site FROM events WHERE {clause}", params)
            for run_id, eid, etime, body, site in cur.fetchall():
                by_run[run_id].append(EventRecord(id=eid, time=etime, body=orjson.loads(body), site=site))
        ingest.store_projections(cur, name, run_ids, by_run)

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
        d.pop("mixed", None)  # the store's own bookkeeping (see readable_run)
        facets = orjson.loads(d.pop("facets"))
        ours = facets.get("metatrail_execution") or {}
        d["params"] = ours.get("params", {})
        d["metrics"] = ours.get("metrics", {})
        d["energy"] = facets.get("metatrail_energy")
        # The process that recorded the run (metatrail.abandoned tells from them whether it has ended).
        d["host"], d["pid"] = ours.get("host"), ours.get("pid")
        if d["state"] == "aborted" and str(d["error"] or "").startswith(ABANDONED_PREFIX):
            d["duration_s"] = None  # ended at an unknown moment after ended_at (metatrail.abandoned)
        else:
            d["duration_s"] = (d["ended_at"] - d["started_at"]) if d["ended_at"] and d["started_at"] else None
        return d

    def list_runs(self, *, pipeline: str | None = None, state: str | None = None, kind: str | None = None,
                  since: float | None = None, until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self._list_runs([], pipeline=pipeline, state=state, kind=kind, since=since, until=until, limit=limit)

    def list_readable_runs(self, pipelines: frozenset[str], *, pipeline: str | None = None, state: str | None = None,
                           kind: str | None = None, since: float | None = None, until: float | None = None,
                           limit: int = 100) -> list[dict[str, Any]]:
        conds = [readable_run(pipelines)]
        return self._list_runs(conds, pipeline=pipeline, state=state, kind=kind, since=since, until=until,
                               limit=limit)

    def readable_runs(self, run_ids: Collection[str], pipelines: frozenset[str]) -> set[str]:
        found: set[str] = set()
        with dialect.reading(self._engine) as conn:
            for part in _chunks(sorted(set(run_ids))):
                found.update(conn.execute(select(runs.c.run_id).where(
                    runs.c.run_id.in_(part), readable_run(pipelines))).scalars())
        return found

    def _list_runs(self, conds: list[Any], *, pipeline: str | None, state: str | None, kind: str | None,
                   since: float | None, until: float | None, limit: int) -> list[dict[str, Any]]:
        stmt = select(runs)
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

    def list_pipelines(self) -> list[dict[str, Any]]:
        return self._list_pipelines(None)

    def list_readable_pipelines(self, pipelines: frozenset[str]) -> list[dict[str, Any]]:
        return self._list_pipelines(readable_run(pipelines))

    def _list_pipelines(self, cond: ColumnElement[bool] | None) -> list[dict[str, Any]]:
        stmt = (select(runs.c.pipeline, runs.c.namespace, func.count().label("runs"),
                       func.max(runs.c.started_at).label("last_started_at"))
                .group_by(runs.c.pipeline, runs.c.namespace).order_by(runs.c.pipeline))
        stages = select(runs.c.pipeline, runs.c.stage).where(runs.c.stage.is_not(None)).distinct()
        if cond is not None:
            stmt, stages = stmt.where(cond), stages.where(cond)
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
        return self._find_artifacts(None, key=key, hash=hash, namespace=namespace, name=name)

    def find_readable_artifacts(self, pipelines: frozenset[str], *, key: str | None = None, hash: str | None = None,
                                namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        return self._find_artifacts(readable_run(pipelines), key=key, hash=hash, namespace=namespace, name=name)

    def _find_artifacts(self, cond: ColumnElement[bool] | None, *, key: str | None, hash: str | None,
                        namespace: str | None, name: str | None) -> list[dict[str, Any]]:
        stmt = select(edges, runs.c.pipeline, runs.c.stage, runs.c.started_at, runs.c.state).join(
            runs, runs.c.run_id == edges.c.run_id)
        if cond is not None:
            # In the query, before the limit: other pipelines' occurrences must not take the reader's places.
            stmt = stmt.where(cond)
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

    def lineage(self, artifact_keys: Sequence[str], *, direction: str = "upstream",
                depth: int = 10) -> dict[str, Any]:
        return self._lineage(artifact_keys, direction=direction, depth=depth, pipelines=None)

    def readable_lineage(self, artifact_keys: Sequence[str], pipelines: frozenset[str], *, direction: str = "upstream",
                         depth: int = 10) -> dict[str, Any]:
        return self._lineage(artifact_keys, direction=direction, depth=depth, pipelines=pipelines)

    def _lineage(self, artifact_keys: Sequence[str], *, direction: str, depth: int,
                 pipelines: frozenset[str] | None) -> dict[str, Any]:
        """The graph; with ``pipelines`` (a reader limited to them), each node says whether the reader may see it
        (``readable``). The walk does not go on through a run the reader may not read: what lies behind it would tell
        that the run links the two. An artifact is shown only when a readable run touches it, listed only under the
        names readable runs gave it (the paths other pipelines gave the same bytes are theirs), with what a readable
        run's edge says of it (hash, algorithm, size)."""
        if direction not in ("upstream", "downstream", "both"):
            raise ValueError("direction must be upstream, downstream or both")
        nodes: dict[str, dict[str, Any]] = {}
        graph_edges: set[tuple[str, str, str]] = set()
        named: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # node -> name -> run ids
        said: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # node -> run id -> what its edge says
        readable: set[str] = set()
        with dialect.reading(self._engine) as conn:
            for d in (("upstream", "downstream") if direction == "both" else (direction,)):
                self._walk(conn, list(artifact_keys), d, depth, nodes, graph_edges, named, said, pipelines, readable)
            if pipelines is not None:
                # A walk sees one direction's edges of a root: the run that gave a run_id query its keys, or any
                # readable run of the other direction, makes the root known to the reader all the same.
                for part in _chunks(sorted(set(artifact_keys))):
                    stmt = (select(edges.c.artifact_key, edges.c.run_id, edges.c.hash, edges.c.algorithm,
                                   edges.c.size).join(runs, runs.c.run_id == edges.c.run_id)
                            .where(edges.c.artifact_key.in_(part), readable_run(pipelines)))
                    for e in conn.execute(stmt):
                        said[f"artifact:{e.artifact_key}"].setdefault(
                            e.run_id, {"hash": e.hash, "algorithm": e.algorithm, "size": e.size})
                        readable.add(e.run_id)

        def shown(run_id: str) -> bool:
            return pipelines is None or run_id in readable

        if pipelines is not None:
            for node_id, n in nodes.items():
                if n["type"] == "run":
                    n["readable"] = n["run_id"] in readable
                    continue
                # Nothing a foreign run's edge says reaches the reader: not that the artifact is stored, nor its size.
                ours = [v for run_id, v in said[node_id].items() if shown(run_id)]
                n["readable"] = bool(ours)
                if ours:
                    n.update(ours[0])
        for node_id, names in named.items():
            nodes[node_id]["names"] = sorted(n for n, run_ids in names.items() if any(map(shown, run_ids)))
        return {
            "roots": list(artifact_keys),
            "nodes": sorted(nodes.values(), key=lambda n: (n["type"], n["id"])),
            "edges": [{"from": a, "to": b, "type": t} for a, b, t in sorted(graph_edges)],
        }

    def _walk(self, conn: Connection, frontier: list[str], direction: str, depth: int,
              nodes: dict[str, dict[str, Any]], graph_edges: set[tuple[str, str, str]],
              named: dict[str, dict[str, set[str]]], said: dict[str, dict[str, dict[str, Any]]],
              pipelines: frozenset[str] | None, readable: set[str]) -> None:
        # upstream: artifact <-OUTPUT- run <-INPUT- artifact ...; downstream the mirror image. With ``pipelines``,
        # ``readable`` collects the runs reached that a reader limited to them may read; the walk goes on only
        # through those.
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
                    self._add_artifact(nodes, e, named, said)
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
                if pipelines is not None:
                    readable.update(conn.execute(select(runs.c.run_id).where(
                        runs.c.run_id.in_(part), readable_run(pipelines))).scalars())
                for e in conn.execute(select(edges).where(edges.c.run_id.in_(part))):
                    self._add_artifact(nodes, e, named, said)
                    art, run = f"artifact:{e.artifact_key}", f"run:{e.run_id}"
                    graph_edges.add((art, run, "input") if e.direction == "INPUT" else (run, art, "output"))
                    if e.direction == second_dir and (pipelines is None or e.run_id in readable):
                        nxt.append(e.artifact_key)
            frontier = nxt

    @staticmethod
    def _add_artifact(nodes: dict[str, dict[str, Any]], e: Any, named: dict[str, dict[str, set[str]]],
                      said: dict[str, dict[str, dict[str, Any]]]) -> None:
        node_id = f"artifact:{e.artifact_key}"
        nodes.setdefault(node_id, {"type": "artifact", "id": node_id, "key": e.artifact_key,
                                   "hash": e.hash, "algorithm": e.algorithm, "size": e.size, "names": []})
        named[node_id][f"{e.namespace}:{e.name}" if e.namespace != "file" else e.name].add(e.run_id)
        said[node_id].setdefault(e.run_id, {"hash": e.hash, "algorithm": e.algorithm, "size": e.size})

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
