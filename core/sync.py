"""Push and pull: exchange only the events the other side lacks, resumably.

Merge is set union of events (an event's identity is the hash of its canonical JSON), followed by the store's
projections, which depend only on the set. So merging is commutative, associative and idempotent, and two sites
converge whatever the order they sync in. Executions join by run id, artifacts by content hash.

One algorithm moves events from a *source* to a *destination* :class:`Endpoint` (a local SQL store or a metatrail
server over HTTP), page by page::

    page    = source.page(after=cursor, filter)      # (seq, id) of the next events in the source's log
    missing = destination.missing(ids of page)       # what the destination lacks
    events  = source.fetch(missing)                  # only those bodies travel
    destination.receive(events)                      # idempotent ingest, origin site kept
    cursor  = page.last                              # persisted after every page: resumable

The cursor (high-water mark) is the source's log position, kept per (peer, direction, filter) in the
``sync_cursors`` table of the store that runs the sync. ``push`` = local → server, ``pull`` = server → local.
Log positions follow commit order (SQLite's single writer; PostgreSQL's log lock), so a cursor never skips an event
committed later with a smaller position. A cursor also keeps an anchor, the newest event it passed that both sides
hold, at its source position; a transfer checks it first (:func:`anchor_holds`), and when a side was restored from a
backup (positions handed out again, or events the destination was given gone) it compares the logs from the start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine, and_, case, func, or_, select

from metatrail.errors import ConfigError, StoreError
from metatrail.store import dialect
from metatrail.store.base import EventStore
from metatrail.store.schema import events, runs, sync_cursors
from metatrail.store.sql import readable_run

PAGE = 2000
FETCH_CHUNK = 1000
PUSH_CHUNK = 2000  # events per push request: one server transaction each
_EVENT_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Filter:
    """Which events a sync covers. ``pipelines`` is the set a token may read (None = all); the others are the user's
    ``--pipeline/--run/--since`` selection."""

    pipeline: str | None = None
    run_id: str | None = None
    since: float | None = None
    pipelines: frozenset[str] | None = None
    since_text: str | None = field(default=None, compare=False)  # ``--since`` as given (an age moves: ``2h``)

    @property
    def scope(self) -> str:
        """The cursor key of this selection ("" when it selects everything).

        Everything that selects is in it: a cursor moves past events its selection left out, so a wider selection
        (a peer's share list grown by a pipeline) must start a cursor of its own, or it would never see them. An age
        (``--since 2h``) is keyed as given, so the next run with the same words resumes rather than starting anew.
        """
        since = self.since_text if self.since_text is not None else self.since
        parts = [f"{k}={v}" for k, v in (("pipeline", self.pipeline), ("run", self.run_id), ("since", since))
                 if v is not None]
        if self.pipelines is not None:
            parts.append("pipelines=" + ",".join(sorted(self.pipelines)))
        return "&".join(parts)


@dataclass(frozen=True)
class Shipped:
    """One event in transit: its identity, the site it came from (None = recorded here) and its canonical JSON."""

    id: str
    site: str | None
    text: str


@dataclass(frozen=True)
class CursorState:
    """A sync cursor: the source log ``position`` done so far, and its ``anchor``: ``(seq, id)`` of the newest event
    at or behind it known to be on both sides (None: none known yet, or a cursor from before anchors)."""

    position: int
    anchor: tuple[int, str] | None


@dataclass(frozen=True)
class Page:
    """A page of a log: ``(seq, id)`` pairs, the position to resume after, and whether more follow."""

    items: list[tuple[int, str]]
    last: int
    more: bool


@dataclass
class TransferResult:
    """What one push or pull did."""

    scanned: int = 0
    sent: int = 0
    inserted: int = 0
    position: int = 0
    pages: int = 0
    skipped: int = 0  # events the destination refused (see ``refused``); they stay where they were
    refused: list[tuple[str, str]] = field(default_factory=list)  # (event id, the destination's reason)
    rewound: bool = False  # the cursor no longer matched the two logs (a side restored): compared from the start

    def as_dict(self) -> dict[str, int]:
        return {"scanned": self.scanned, "sent": self.sent, "inserted": self.inserted, "position": self.position,
                "pages": self.pages, "skipped": self.skipped, "rewound": int(self.rewound)}


def parse_since(text: str | None) -> float | None:
    """``--since``: Unix seconds, an ISO 8601 date or date-time (UTC if no zone), or an age (``30m``, ``2h``)."""
    if text is None or text == "":
        return None
    text = text.strip()
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if age:
        return time.time() - float(age.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[age.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {text!r}: give Unix seconds, an ISO 8601 date/time, or an age like 2h") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def peer_key(url: str) -> str:
    """A server URL normalised for cursor keys (scheme, lower-case host, port, path without trailing slash)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


def refuses_events(exc: Any) -> bool:
    """Whether a server's refusal is of the events sent (invalid, too large, or outside what the token may write)
    rather than of the request or the credentials: a batch refused so is halved until the refused events stand
    alone."""
    status = getattr(exc, "status", None)
    if status in (400, 413, 422):
        return True
    error = exc.body.get("error") if isinstance(getattr(exc, "body", None), dict) else None
    return status == 403 and error in ("pipeline_forbidden", "site_forbidden")


def reader_key(key: str, token: str | None) -> str:
    """The cursor key of pulls from ``key`` with ``token``: what a server lists depends on what the token may read,
    so a pull cursor belongs to the token (its public id) too. A cursor moved by a token limited to some pipelines
    would otherwise make a later pull with a wider token skip everything the first could not see."""
    match = re.fullmatch(r"mt_([0-9a-f]{12})_\S+", token or "")
    return f"{key}#reader={match.group(1)}" if match else key


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SyncLog:
    """SQL access to one store's event log and sync cursors, for sync (the store API covers the rest).

    Opens its own engine on the store's URL; the store must exist and be migrated (open it with ``open_store``
    first).
    """

    def __init__(self, url: str) -> None:
        if not url.startswith(("sqlite:", "postgresql", "postgres:")):
            raise ConfigError(f"sync needs an SQL store here, not {url!r}")
        self.url = url
        self._engine: Engine = dialect.make_engine(url)

    def close(self) -> None:
        """Release connections."""
        self._engine.dispose()

    def _where(self, stmt: Any, filt: Filter) -> Any:
        if filt.pipelines is not None:
            # A run every event of which names one of the pipelines: a run's pipeline follows its latest event, so
            # a run under a selected pipeline may hold another pipeline's events (see SqlStore's readable_run).
            allowed = select(runs.c.run_id).where(readable_run(filt.pipelines))
            stmt = stmt.where(events.c.run_id.in_(allowed))
        if filt.pipeline is not None:
            stmt = stmt.where(events.c.run_id.in_(select(runs.c.run_id).where(runs.c.pipeline == filt.pipeline)))
        if filt.run_id is not None:
            family = select(runs.c.run_id).where(or_(runs.c.run_id == filt.run_id, runs.c.parent_run_id == filt.run_id))
            stmt = stmt.where(events.c.run_id.in_(family))
        if filt.since is not None:
            stmt = stmt.where(events.c.event_time >= filt.since)
        return stmt

    def last_seq(self) -> int:
        """The newest log position."""
        with dialect.reading(self._engine) as conn:
            return int(conn.execute(select(func.max(events.c.seq))).scalar() or 0)

    def page(self, after: int, filt: Filter = Filter(), limit: int = PAGE) -> Page:
        """The next ``limit`` events after ``after`` that match ``filt``.

        A selection by run (a pipeline, a run's family, a token's pipelines) follows the runs' projections, which a
        later event of a run can change (a run's pipeline follows its latest event): an earlier event of the run
        may have been passed over while its run was not yet selected. So a page of such a selection also lists the
        earlier events (at or behind ``after``) of the runs it holds; they cost a look at the other side, and travel
        only when missing there."""
        by_run = filt.pipelines is not None or filt.pipeline is not None or filt.run_id is not None
        with dialect.reading(self._engine) as conn:
            # Read the horizon first: every position up to it is committed (commit-ordered log), so when the page
            # is short the cursor may safely jump to it, past events the filter skipped.
            horizon = int(conn.execute(select(func.max(events.c.seq))).scalar() or 0)
            stmt = select(events.c.seq, events.c.id, events.c.run_id).where(
                and_(events.c.seq > after, events.c.seq <= horizon))
            rows = conn.execute(self._where(stmt, filt).order_by(events.c.seq).limit(limit)).all()
            earlier: list[tuple[int, str]] = []
            if by_run and after > 0 and rows:
                run_ids = sorted({r for _, _, r in rows if r})
                for part in _chunks(run_ids, FETCH_CHUNK):
                    back = select(events.c.seq, events.c.id).where(and_(events.c.run_id.in_(part),
                                                                        events.c.seq <= after))
                    earlier.extend((int(s), str(i)) for s, i in conn.execute(self._where(back, filt)))
        items = [(int(s), str(i)) for s, i, _ in rows]
        if len(items) < limit:
            return Page(items=sorted(earlier) + items, last=max(horizon, after), more=False)
        return Page(items=sorted(earlier) + items, last=items[-1][0], more=True)

    def count_after(self, after: int, filt: Filter = Filter()) -> int:
        """How many events after ``after`` match ``filt`` (for progress bars)."""
        stmt = self._where(select(func.count()).select_from(events).where(events.c.seq > after), filt)
        with dialect.reading(self._engine) as conn:
            return int(conn.execute(stmt).scalar() or 0)

    def events_after(self, after: int, filt: Filter = Filter(), limit: int = PAGE) -> list[tuple[int, Shipped]]:
        """``(seq, event)`` pairs after ``after`` matching ``filt``, bodies included."""
        stmt = self._where(select(events.c.seq, events.c.id, events.c.site, events.c.body)
                           .where(events.c.seq > after), filt).order_by(events.c.seq).limit(limit)
        with dialect.reading(self._engine) as conn:
            return [(int(s), Shipped(id=i, site=site, text=body)) for s, i, site, body in conn.execute(stmt)]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids of ``ids`` not in the log, in the order given."""
        have: set[str] = set()
        with dialect.reading(self._engine) as conn:
            for part in _chunks(list(dict.fromkeys(ids)), FETCH_CHUNK):
                have.update(conn.execute(select(events.c.id).where(events.c.id.in_(part))).scalars())
        return [i for i in dict.fromkeys(ids) if i not in have]

    def fetch(self, ids: Sequence[str], filt: Filter = Filter()) -> list[Shipped]:
        """The events with these ids (those ``filt`` allows), in log order."""
        found: list[tuple[int, Shipped]] = []
        with dialect.reading(self._engine) as conn:
            for part in _chunks(list(dict.fromkeys(ids)), FETCH_CHUNK):
                stmt = self._where(select(events.c.seq, events.c.id, events.c.site, events.c.body)
                                   .where(events.c.id.in_(part)), filt)
                found.extend((int(s), Shipped(id=i, site=site, text=b)) for s, i, site, b in conn.execute(stmt))
        return [s for _, s in sorted(found, key=lambda x: x[0])]

    def digest(self, filt: Filter = Filter()) -> dict[str, Any]:
        """A digest of the set of event ids (sha256 of the sorted ids): equal digests, equal sets."""
        h = hashlib.sha256()
        count = 0
        with dialect.reading(self._engine) as conn:
            for (eid,) in conn.execute(self._where(select(events.c.id), filt).order_by(events.c.id)):
                h.update(eid.encode())
                h.update(b"\n")
                count += 1
        return {"events": count, "digest": h.hexdigest()}

    # -- cursors --------------------------------------------------------------------------------------------------
    def get_cursor(self, peer: str, direction: str, scope: str = "") -> int:
        """The high-water mark of (peer, direction, scope); 0 when none."""
        return self.cursor_state(peer, direction, scope).position

    def cursor_state(self, peer: str, direction: str, scope: str = "") -> CursorState:
        """The high-water mark of (peer, direction, scope) and its anchor (see :class:`CursorState`)."""
        stmt = select(sync_cursors.c.position, sync_cursors.c.anchor_seq, sync_cursors.c.anchor_id).where(
            and_(sync_cursors.c.peer == peer, sync_cursors.c.direction == direction, sync_cursors.c.scope == scope))
        with dialect.reading(self._engine) as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return CursorState(0, None)
        position, anchor_seq, anchor_id = row
        anchor = (int(anchor_seq), str(anchor_id)) if anchor_seq is not None and anchor_id is not None else None
        return CursorState(int(position or 0), anchor)

    def set_cursor(self, peer: str, direction: str, scope: str, position: int, *, force: bool = False,
                   anchor: tuple[int, str] | None = None) -> None:
        """Advance the cursor to ``position`` (never backwards unless ``force``: two shippers may race). ``anchor``
        moves with the position (kept as it was when None, cleared when ``force``-ing)."""
        from sqlalchemy.dialects import postgresql as pg
        from sqlalchemy.dialects import sqlite

        ins = sqlite.insert(sync_cursors) if dialect.is_sqlite(self._engine) else pg.insert(sync_cursors)
        stmt = ins.values(peer=peer, direction=direction, scope=scope, position=position, updated_at=time.time(),
                          anchor_seq=anchor[0] if anchor else None, anchor_id=anchor[1] if anchor else None)
        ahead = stmt.excluded.position >= sync_cursors.c.position
        changes: dict[str, Any] = {"updated_at": stmt.excluded.updated_at}
        if force:
            changes.update(position=stmt.excluded.position, anchor_seq=stmt.excluded.anchor_seq,
                           anchor_id=stmt.excluded.anchor_id)
        else:
            changes["position"] = case((ahead, stmt.excluded.position), else_=sync_cursors.c.position)
            if anchor is not None:  # the anchor of whichever position is kept
                changes["anchor_seq"] = case((ahead, stmt.excluded.anchor_seq), else_=sync_cursors.c.anchor_seq)
                changes["anchor_id"] = case((ahead, stmt.excluded.anchor_id), else_=sync_cursors.c.anchor_id)
        stmt = stmt.on_conflict_do_update(index_elements=["peer", "direction", "scope"], set_=changes)

        def run() -> None:
            with self._engine.begin() as conn:
                conn.execute(stmt)

        dialect.retrying(run)

    def cursors(self) -> list[dict[str, Any]]:
        """Every cursor, for status displays."""
        with dialect.reading(self._engine) as conn:
            return [dict(r._mapping) for r in conn.execute(select(sync_cursors).order_by(
                sync_cursors.c.peer, sync_cursors.c.direction, sync_cursors.c.scope))]


class Endpoint(Protocol):
    """One side of a transfer: a local store or a remote server (see module docstring)."""

    key: str

    def page(self, after: int, filt: Filter, limit: int) -> Page:
        """The next ids of the log after ``after``."""
        ...

    def fetch(self, ids: Sequence[str], filt: Filter) -> list[Shipped]:
        """Bodies of these events."""
        ...

    def missing(self, ids: Sequence[str]) -> list[str]:
        """Which of these ids this side lacks."""
        ...

    def receive(self, shipped: Sequence[Shipped]) -> int:
        """Store these events (idempotently); return how many were new."""
        ...


def decode_shipped(shipped: Sequence[Shipped], default_site: str | None
                   ) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Decode and validate events that came from elsewhere; return them and, one per event, the site to record it
    under (its origin, else ``default_site``).

    Validation is the server's (a peer is not trusted more than any client); an invalid event raises
    :class:`~metatrail.openlineage.validation.InvalidEvent`.
    """
    from metatrail.openlineage.validation import validate_event

    events: list[dict[str, Any]] = []
    sites: list[str | None] = []
    for item in shipped:
        body = json.loads(item.text)
        validate_event(body)
        events.append(body)
        sites.append(item.site or default_site)
    return events, sites


class LocalEndpoint:
    """A local SQL store as a sync endpoint. ``site`` is recorded on events received without an origin."""

    def __init__(self, store: EventStore, log: SyncLog | None = None, *, site: str | None = None,
                 validate: bool = True) -> None:
        self.store = store
        self.log = log or SyncLog(store.url)
        self.key = store.url
        self.site = site
        self.validate = validate

    def page(self, after: int, filt: Filter, limit: int) -> Page:
        return self.log.page(after, filt, limit)

    def fetch(self, ids: Sequence[str], filt: Filter) -> list[Shipped]:
        return self.log.fetch(ids, filt)

    def missing(self, ids: Sequence[str]) -> list[str]:
        return self.log.missing(ids)

    def receive(self, shipped: Sequence[Shipped]) -> int:
        events, sites = decode_shipped(shipped, self.site) if self.validate else \
            ([json.loads(item.text) for item in shipped], [item.site or self.site for item in shipped])
        return self.store.ingest(events, sites=sites).inserted  # one transaction: a page is stored whole or not

    def close(self) -> None:
        self.log.close()


class HttpEndpoint:
    """A metatrail server as a sync endpoint (its ``/api/v1/sync/*`` routes)."""

    def __init__(self, client: Any) -> None:
        from metatrail.store.remote import ServerClient

        self.client: ServerClient = client
        self.key = peer_key(client.url)
        self.site: str | None = None
        # (event id, the server's reason) of each event the server refused as such (see refuses_events): isolated
        # by halving the batch, left out, and reported, so one bad event does not stall a push for good.
        self.refused: list[tuple[str, str]] = []
        # receive's own connections (clones, closed with client): receives run beside page/missing, and beside each
        # other, in a pipelined transfer
        self._senders: list[ServerClient] = []
        self._senders_lock = threading.Lock()

    @staticmethod
    def _params(filt: Filter) -> dict[str, Any]:
        return {"pipeline": filt.pipeline, "run_id": filt.run_id, "since": filt.since}

    def page(self, after: int, filt: Filter, limit: int) -> Page:
        reply = self.client.request("GET", "/api/v1/sync/ids", params={"after": after, "limit": limit,
                                                                       **self._params(filt)})
        self.site = reply.get("site", self.site)
        items = [(int(s), str(i)) for s, i in reply["items"]]
        if any(not _EVENT_ID.fullmatch(i) for _, i in items):
            # A peer is not trusted more than a client: ids travel back into our queries, so check their form.
            raise StoreError(f"{self.client.url} sent malformed event ids; refusing its page")
        return Page(items=items, last=int(reply["last"]), more=bool(reply["more"]))

    def fetch(self, ids: Sequence[str], filt: Filter) -> list[Shipped]:
        out: list[Shipped] = []
        for part in _chunks(list(ids), FETCH_CHUNK):
            asked = list(part)
            while asked:
                # A server answers at most so many bytes of events at a time: ``partial`` takes such an answer, and
                # ``rest`` names the ids it did not get to, asked for again.
                reply = self.client.request("POST", "/api/v1/sync/fetch", json_body={"ids": asked, "partial": True})
                for item in reply["events"]:
                    text = json.dumps(item["event"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                    out.append(Shipped(id=str(item["id"]), site=item.get("site") or self.site, text=text))
                rest = reply.get("rest") or []
                if rest and (not isinstance(rest, list) or len(rest) >= len(asked)
                             or not all(isinstance(i, str) for i in rest) or not set(rest) <= set(asked)):
                    # A peer is not trusted more than a client: an answer that does not shrink what is left would
                    # make this loop for ever.
                    raise StoreError(f"{self.client.url} answered a fetch without progress; refusing its answer")
                asked = list(rest)
        return out

    def missing(self, ids: Sequence[str]) -> list[str]:
        out: list[str] = []
        for part in _chunks(list(ids), 5000):
            out.extend(self.client.request("POST", "/api/v1/sync/missing", json_body={"ids": list(part)})["missing"])
        return out

    def receive(self, shipped: Sequence[Shipped]) -> int:
        with self._senders_lock:
            sender = self._senders.pop() if self._senders else self.client.clone()
        try:
            return sum(self._send(sender, part) for part in _chunks(list(shipped), PUSH_CHUNK))
        finally:
            with self._senders_lock:
                self._senders.append(sender)

    def _send(self, sender: Any, part: Sequence[Shipped]) -> int:
        from metatrail.store.remote import RemoteRejected

        # The bodies are canonical JSON already: splice them in rather than decode and encode them again.
        origins = json.dumps([s.site for s in part])
        body = ('{"origins":' + origins + ',"events":[' + ",".join(s.text for s in part) + "]}").encode("utf-8")
        try:
            reply = sender.request("POST", "/api/v1/sync/push", raw_body=body)
        except RemoteRejected as exc:
            if exc.status == 413 and len(part) > 1:
                half = len(part) // 2  # large events: the server caps a body's size, so send fewer at a time
                return self._send(sender, part[:half]) + self._send(sender, part[half:])
            if not refuses_events(exc):
                raise
            if len(part) == 1:
                with self._senders_lock:
                    self.refused.append((part[0].id, str(exc)))
                return 0
            half = len(part) // 2  # all or nothing per request: halve until the refused events stand alone
            return self._send(sender, part[:half]) + self._send(sender, part[half:])
        return int(reply["inserted"])


@dataclass
class Progress:
    """Reports transfer progress; the default draws a rich progress bar on a terminal for long transfers."""

    label: str
    total: int
    enabled: bool = True
    _bar: Any = field(default=None, repr=False)
    _task: Any = field(default=None, repr=False)

    def __enter__(self) -> Progress:
        import sys

        if self.enabled and self.total >= 1000 and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def transfer(source: Endpoint, destination: Endpoint, *, log: SyncLog | None, peer: str, direction: str,
             filt: Filter = Filter(), page_size: int = PAGE, progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None, pipelined: bool = True) -> TransferResult:
    """Move the events ``destination`` lacks from ``source`` (see module docstring); resumable through the cursor
    (``peer``, ``direction``, ``filt.scope``) kept in ``log`` (no cursor when ``log`` is None: a full comparison).
    ``pipelined=False`` finishes each page before reading the next (for sources that count what they skip)."""
    result = TransferResult()
    state = log.cursor_state(peer, direction, filt.scope) if log is not None else CursorState(0, None)
    cursor = state.position
    if log is not None and cursor > 0 and state.anchor is not None and not anchor_holds(source, destination,
                                                                                      state.anchor, filt):
        # One side was restored from a backup (or its log otherwise lost events): the source hands out positions the
        # cursor has passed, or the destination lacks what the cursor says it was given. Start over from the
        # beginning; only what the destination lacks travels.
        log.set_cursor(peer, direction, filt.scope, 0, force=True)
        cursor = 0
        result.rewound = True
    result.position = cursor
    # Pipelined: while the destination stores earlier pages' events (on worker threads: three pages in flight, so a
    # server parses one batch while its writer commits another and the third is on its way), this thread reads the
    # next page, asks what the destination lacks and fetches the bodies. Pages settle in order, and the cursor moves
    # past a page only once its events and those of every page before it are stored, so an interruption resumes
    # where it should.
    depth = 3 if pipelined else 1
    in_flight: deque[tuple[_Send, int, int, Callable[[], tuple[int, str] | None]]] = deque()
    reading = cursor  # where the next page starts: past the pages in flight

    def advance(position: int, anchor: tuple[int, str] | None) -> None:
        nonlocal cursor
        if position != cursor or anchor is not None:
            cursor = position
            if log is not None:
                log.set_cursor(peer, direction, filt.scope, cursor, anchor=anchor)
        result.position = cursor

    def settle(keep: int) -> None:
        while len(in_flight) > keep:
            send, sent, position, anchor = in_flight[0]
            inserted = send.result()
            in_flight.popleft()
            result.inserted += inserted
            result.sent += sent
            advance(position, anchor())

    try:
        while True:
            if should_stop is not None and should_stop():
                break
            page = source.page(reading, filt, page_size)
            reading = page.last
            result.pages += 1
            ids = [i for _, i in page.items]
            shipped: list[Shipped] = []
            missing: list[str] = []
            if ids:
                missing = destination.missing(ids)
                if missing:
                    shipped = source.fetch(missing, filt)
                result.scanned += len(ids)
            anchor = _anchor_of(page.items, destination, set(missing), {s.id for s in shipped})
            if shipped:
                settle(depth - 1)
                in_flight.append((_Send(destination.receive, shipped, background=pipelined), len(shipped),
                                  page.last, anchor))
                if not pipelined:
                    settle(0)
            else:
                settle(0)
                advance(page.last, anchor())
            if progress is not None and ids:
                progress.advance(len(ids))
            if not page.more:
                break
        settle(0)
    finally:
        # An error above: let the pages in flight finish, keeping the cursor of those that did.
        with contextlib.suppress(Exception):
            settle(0)
    return result


def anchor_holds(source: Endpoint, destination: Endpoint, anchor: tuple[int, str], filt: Filter) -> bool:
    """Whether the event ``anchor`` (``(seq, id)``) still sits at its position in the source's log and is still held
    by the destination: what a cursor's position means on both sides (two small requests)."""
    seq, event_id = anchor
    if (seq, event_id) not in source.page(seq - 1, filt, 1).items:
        return False
    return not destination.missing([event_id])


def _anchor_of(items: Sequence[tuple[int, str]], destination: Endpoint, missing: set[str],
               shipped: set[str]) -> Callable[[], tuple[int, str] | None]:
    """The anchor a settled page leaves: its newest event the destination holds (had before, or was sent and not
    refused); asked once the page's events are stored, when the destination's refusals are known."""

    def pick() -> tuple[int, str] | None:
        refused = {event_id for event_id, _reason in getattr(destination, "refused", ())}
        held = [(seq, i) for seq, i in items if i not in missing or (i in shipped and i not in refused)]
        return max(held) if held else None

    return pick


class _Send:
    """One page being stored by the destination: on a thread of its own when ``background``, else done at once.

    Plain threads, not a ``concurrent.futures`` pool: the shipper's exit drain runs after ``concurrent.futures`` has
    shut its pools down for the interpreter's exit, and must still ship (it sends one page at a time, in place)."""

    def __init__(self, receive: Callable[[list[Shipped]], int], shipped: list[Shipped], *, background: bool) -> None:
        self._value = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(receive, shipped), name="metatrail-sync",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(receive, shipped)

    def _run(self, receive: Callable[[list[Shipped]], int], shipped: list[Shipped]) -> None:
        try:
            self._value = receive(shipped)
        except BaseException as exc:  # re-raised in the transferring thread by result()
            self._error = exc

    def result(self) -> int:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _open_local(store_url: str) -> tuple[EventStore, SyncLog]:
    from metatrail.store import open_store

    store = open_store(store_url)
    if store.url.startswith(("http:", "https:")):
        store.close()
        raise ConfigError("push/pull run between a local SQL store and a server; --store must be sqlite:// or "
                          "postgresql://")
    return store, SyncLog(store.url)


def _client(url: str | None, token: str | None, timeout: float) -> Any:
    from metatrail.store.remote import ServerClient, client_settings

    server, resolved, ca_bundle = client_settings(url, token)
    if not server:
        raise ConfigError("no server given: pass --to/--from URL or set METATRAIL_SERVER")
    return ServerClient(server, resolved, timeout=timeout, ca_bundle=ca_bundle)


def push(store_url: str, server_url: str | None = None, *, token: str | None = None, filt: Filter = Filter(),
         show_progress: bool = True, timeout: float = 60.0, compare_all: bool = False) -> TransferResult:
    """Send the events of the local store at ``store_url`` that the server lacks (``metatrail push``): those after
    the cursor of the last push, or with ``compare_all`` every event (the cursor is then neither read nor moved)."""
    store, log = _open_local(store_url)
    client = _client(server_url, token, timeout)
    try:
        remote = HttpEndpoint(client)
        local = LocalEndpoint(store, log)
        start = 0 if compare_all else log.get_cursor(remote.key, "push", filt.scope)
        total = log.count_after(start, filt) if show_progress else 0
        with Progress(f"push to {client.url}", total, enabled=show_progress) as bar:
            result = transfer(local, remote, log=None if compare_all else log, peer=remote.key, direction="push",
                              filt=filt, progress=bar)
        result.refused, result.skipped = list(remote.refused), len(remote.refused)
        return result
    finally:
        client.close()
        log.close()
        store.close()


def pull(store_url: str, server_url: str | None = None, *, token: str | None = None, filt: Filter = Filter(),
         show_progress: bool = True, timeout: float = 60.0, compare_all: bool = False) -> TransferResult:
    """Fetch the events the local store at ``store_url`` lacks from the server (``metatrail pull``); each is recorded
    with the site it came from. Those after the cursor of the last pull, or with ``compare_all`` every event the
    token may read (the cursor is then neither read nor moved)."""
    store, log = _open_local(store_url)
    client = _client(server_url, token, timeout)
    try:
        remote = HttpEndpoint(client)
        local = LocalEndpoint(store, log)
        total = 0
        key = reader_key(remote.key, client.token)
        if show_progress:
            cursor = 0 if compare_all else log.get_cursor(key, "pull", filt.scope)
            info = client.request("GET", "/api/v1/sync/ids", params={"after": cursor, "limit": 0,
                                                                   **HttpEndpoint._params(filt)})
            total = int(info.get("remaining", 0))
        with Progress(f"pull from {client.url}", total, enabled=show_progress) as bar:
            return transfer(remote, local, log=None if compare_all else log, peer=key, direction="pull", filt=filt,
                            progress=bar)
    finally:
        client.close()
        log.close()
        store.close()


def merge(source: EventStore, destination: EventStore, *, filt: Filter = Filter()) -> TransferResult:
    """Merge every event of ``source`` into ``destination`` (set union; both SQL stores), without cursors."""
    src = LocalEndpoint(source, validate=False)
    dst = LocalEndpoint(destination, validate=False)
    try:
        return transfer(src, dst, log=None, peer=source.url, direction="merge", filt=filt)
    finally:
        src.close()
        dst.close()


__all__ = ["Endpoint", "Filter", "HttpEndpoint", "LocalEndpoint", "Page", "Progress", "Shipped", "SyncLog",
           "TransferResult", "merge", "parse_since", "peer_key", "pull", "push", "transfer"]
