"""Schema version 2 (tokens, peers, sync cursors) is applied by the store's migrations: on a fresh database, on a
version-1 database holding data, and once only when several servers start together."""

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
        conn.execute(delete(schema_version).where(schema_version.c.version == 2))
    store = open_store(store_url)  # migrates to version 2
    try:
        assert store.stats()["events"] == 10 and len(store.list_runs()) == 5
    finally:
        store.close()
    with engine.connect() as conn:
        versions = list(conn.execute(select(schema_version.c.version).order_by(schema_version.c.version)).scalars())
        assert versions == [1, 2] == list(range(1, CURRENT_VERSION + 1))
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
    assert sorted(rows) == [(1, 1), (2, 1)]
