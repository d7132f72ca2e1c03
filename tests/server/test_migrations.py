"""Schema versions 2 (tokens, peers, sync cursors) and 3 (cursor anchors) are applied by the store's migrations: on
a fresh database, on a version-1 or version-2 database holding data, and once only when several servers start
together."""

from __future__ import annotations

import threading

from sqlalchemy import delete, func, select, text
from srvkit import bulk_events

from metatrail.store import dialect, open_store
from metatrail.store.schema import CURRENT_VERSION, peers, schema_version, sync_cursors, tokens


def test_upgrade_from_version_1_keeps_data(store_url: str) -> None:
    store = open_store(store_url)
    store.ingest(bulk_events(5))
    store.close()
    engine = dialect.make_engine(store_url)
    with engine.begin() as conn:  # turn it back into a version-1 store
        for table in (tokens, peers, sync_cursors):
            table.drop(conn)
        conn.execute(delete(schema_version).where(schema_version.c.version >= 2))
    store = open_store(store_url)  # migrates to version 3
    try:
        assert store.stats()["events"] == 10 and len(store.list_runs()) == 5
    finally:
        store.close()
    with engine.connect() as conn:
        versions = list(conn.execute(select(schema_version.c.version).order_by(schema_version.c.version)).scalars())
        assert versions == [1, 2, 3] == list(range(1, CURRENT_VERSION + 1))
        assert conn.execute(select(func.count()).select_from(tokens)).scalar() == 0
    engine.dispose()


def test_concurrent_first_start_creates_one_schema(store_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_store(store_url).close()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    engine = dialect.make_engine(store_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT version, COUNT(*) FROM metatrail_schema GROUP BY version")).all()
    engine.dispose()
    assert sorted(rows) == [(1, 1), (2, 1), (3, 1)]


def test_upgrade_from_version_2_adds_the_cursor_anchor_and_keeps_cursors(store_url: str) -> None:
    """A version-2 store's cursors stay where they were; they gain an empty anchor (no check until the next sync
    sets one)."""
    from metatrail.sync import SyncLog

    open_store(store_url).close()
    engine = dialect.make_engine(store_url)
    with engine.begin() as conn:  # turn it back into a version-2 store, holding one cursor
        sync_cursors.drop(conn)
        conn.execute(text("CREATE TABLE sync_cursors (peer TEXT NOT NULL, direction VARCHAR(8) NOT NULL, "
                          "scope TEXT NOT NULL, position BIGINT NOT NULL, updated_at FLOAT NOT NULL, "
                          "PRIMARY KEY (peer, direction, scope))"))
        conn.execute(text("INSERT INTO sync_cursors VALUES ('https://hub:443', 'push', '', 41, 0)"))
        conn.execute(delete(schema_version).where(schema_version.c.version == 3))
    engine.dispose()
    open_store(store_url).close()  # migrates to version 3
    log = SyncLog(store_url)
    try:
        state = log.cursor_state("https://hub:443", "push")
        assert (state.position, state.anchor) == (41, None)
        log.set_cursor("https://hub:443", "push", "", 42, anchor=(42, "a" * 64))
        assert log.cursor_state("https://hub:443", "push").anchor == (42, "a" * 64)
        log.set_cursor("https://hub:443", "push", "", 40, anchor=(40, "b" * 64))  # never backwards, anchor with it
        assert (log.get_cursor("https://hub:443", "push"), log.cursor_state("https://hub:443", "push").anchor) == \
            (42, (42, "a" * 64))
    finally:
        log.close()
