"""Schema versions 2 (tokens, peers, sync cursors), 3 (cursor anchors) and 4 (runs.mixed) are applied by the store's
migrations: on a fresh database, on a version-1, -2 or -3 database holding data, and once only when several servers
start together."""

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
    store = open_store(store_url)  # migrates to the current version
    try:
        assert store.stats()["events"] == 10 and len(store.list_runs()) == 5
    finally:
        store.close()
    with engine.connect() as conn:
        versions = list(conn.execute(select(schema_version.c.version).order_by(schema_version.c.version)).scalars())
        assert versions == [1, 2, 3, 4] == list(range(1, CURRENT_VERSION + 1))
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
    assert sorted(rows) == [(v, 1) for v in range(1, CURRENT_VERSION + 1)]


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
        conn.execute(delete(schema_version).where(schema_version.c.version >= 3))
    engine.dispose()
    open_store(store_url).close()  # migrates to the current version
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


def test_upgrade_from_version_3_marks_each_run_by_the_pipelines_its_events_name(store_url: str) -> None:
    """Version 4 adds ``runs.mixed``: 0 for a run whose every event names its pipeline (a reader limited to that
    pipeline needs no look at its events), 1 otherwise. A version-3 store's runs are marked from their stored
    events, as ingest marks new ones; a mixed run stays hidden from a reader of either pipeline."""
    from metatrail.store.schema import runs

    plain = bulk_events(2, pipeline="public", tag="plain")
    mixed = bulk_events(1, pipeline="owner", tag="mixed")
    planted = bulk_events(1, pipeline="public", t0=2.1e9, tag="planted")[0]
    planted["run"]["runId"] = mixed[0]["run"]["runId"]  # a later event of the owner's run naming another pipeline
    store = open_store(store_url)
    store.ingest(plain + mixed + [planted])
    store.close()
    engine = dialect.make_engine(store_url)

    def marks() -> dict[str, int]:
        with engine.connect() as conn:
            return dict(conn.execute(select(runs.c.run_id, runs.c.mixed)).all())  # type: ignore[arg-type]

    expected = {e["run"]["runId"]: 0 for e in plain} | {mixed[0]["run"]["runId"]: 1}
    assert marks() == expected  # as ingest marks them
    with engine.begin() as conn:  # turn it back into a version-3 store
        conn.execute(text("ALTER TABLE runs DROP COLUMN mixed"))
        conn.execute(delete(schema_version).where(schema_version.c.version == 4))
    store = open_store(store_url)  # migrates to version 4
    try:
        assert marks() == expected
        public = frozenset({"public"})
        assert store.readable_runs(set(expected), public) == {e["run"]["runId"] for e in plain}
        assert store.readable_runs(set(expected), frozenset({"owner"})) == set()
        assert {r["run_id"] for r in store.list_readable_runs(public)} == {e["run"]["runId"] for e in plain}
        assert "mixed" not in store.list_runs()[0]  # the store's bookkeeping, not part of a run's description
    finally:
        store.close()
        engine.dispose()
