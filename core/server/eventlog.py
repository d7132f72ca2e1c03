"""The server's reads of its event log for the sync routes: :class:`~metatrail.sync.SyncLog`, plus what a server
must add when it answers clients it does not trust.

* **Within what a token may read.** ``/sync/missing`` answered from the whole log would tell a token limited to some
  pipelines whether an event of another pipeline is stored (event ids are content hashes: whoever can guess an
  event can ask for its id). :meth:`ServerLog.missing_for` counts an event as held only when the token may read it.
* **Bounded in bytes.** ``/sync/fetch`` takes up to 10,000 ids and ``/api/v1/events`` up to 5,000 events, each event
  up to several MiB: a page of large events would be one answer of gigabytes, built in the server's memory.
  :meth:`ServerLog.fetch_bounded` and :meth:`ServerLog.events_after_bounded` stop at ``max_bytes`` of event bodies
  (always at least one event, so every answer makes progress) and say where to go on. Bodies are read a few rows at
  a time (``yield_per``), so neither the database driver nor the server holds much more than the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from metatrail.store import dialect
from metatrail.store.schema import events
from metatrail.sync import Filter, Shipped, SyncLog

LOOK = 500  # ids per query (a bound on IN (...) lists)
ROWS_AT_ONCE = 16  # bodies the driver hands over at a time


class ServerLog(SyncLog):
    """A :class:`~metatrail.sync.SyncLog` with the reads a server answers untrusted clients with (module docstring)."""

    def missing_for(self, ids: Sequence[str], filt: Filter) -> list[str]:
        """The ids of ``ids`` that are not in the log *as ``filt`` sees it* (an event it does not select counts as
        missing), in the order given."""
        if filt.pipelines is None and filt.pipeline is None and filt.run_id is None and filt.since is None:
            return self.missing(ids)
        wanted = list(dict.fromkeys(ids))
        have: set[str] = set()
        with dialect.reading(self._engine) as conn:
            for start in range(0, len(wanted), LOOK):
                stmt = select(events.c.id).where(events.c.id.in_(wanted[start : start + LOOK]))
                have.update(conn.execute(self._where(stmt, filt)).scalars())
        return [i for i in wanted if i not in have]

    def fetch_bounded(self, ids: Sequence[str], filt: Filter, max_bytes: int) -> tuple[list[Shipped], list[str]]:
        """The events with these ids that ``filt`` allows, up to ``max_bytes`` of bodies (UTF-8) but at least one,
        and the ids not yet answered (empty when all were). Events come in log order within each look at
        :data:`LOOK` ids."""
        wanted = list(dict.fromkeys(ids))
        found: list[Shipped] = []
        size = 0
        with dialect.reading(self._engine) as conn:
            streaming = conn.execution_options(yield_per=ROWS_AT_ONCE)
            for start in range(0, len(wanted), LOOK):
                part = wanted[start : start + LOOK]
                stmt = self._where(select(events.c.seq, events.c.id, events.c.site, events.c.body)
                                   .where(events.c.id.in_(part)), filt).order_by(events.c.seq)
                answered: set[str] = set()
                result = streaming.execute(stmt)
                try:
                    for _seq, eid, site, body in result:
                        length = len(body.encode("utf-8"))
                        if found and size + length > max_bytes:
                            rest = [i for i in part if i not in answered] + wanted[start + LOOK :]
                            return found, rest
                        found.append(Shipped(id=eid, site=site, text=body))
                        answered.add(eid)
                        size += length
                finally:
                    result.close()
        return found, []

    def events_after_bounded(self, after: int, filt: Filter, limit: int,
                             max_bytes: int) -> tuple[list[tuple[int, Shipped]], bool]:
        """``(seq, event)`` pairs after ``after`` matching ``filt``, at most ``limit`` of them and ``max_bytes`` of
        bodies (but at least one); and whether the byte bound cut the list short."""
        stmt = self._where(select(events.c.seq, events.c.id, events.c.site, events.c.body)
                           .where(events.c.seq > after), filt).order_by(events.c.seq).limit(limit)
        rows: list[tuple[int, Shipped]] = []
        size = 0
        with dialect.reading(self._engine) as conn:
            result = conn.execution_options(yield_per=ROWS_AT_ONCE).execute(stmt)
            try:
                for seq, eid, site, body in result:
                    length = len(body.encode("utf-8"))
                    if rows and size + length > max_bytes:
                        return rows, True
                    rows.append((int(seq), Shipped(id=eid, site=site, text=body)))
                    size += length
            finally:
                result.close()
        return rows, False
