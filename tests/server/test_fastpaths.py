"""The ingest path's shortcuts give the answers of the long way: the structural check read off an event's JSON text,
events that carry their canonical bytes, a GIL-keeping sha256, multi-row inserts into SQLite."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from srvkit import bulk_events

from metatrail.openlineage.events import canonical_bytes, event_id
from metatrail.openlineage.validation import InvalidEvent, check_structure, plainly_sound, validate_event
from metatrail.store import open_store
from metatrail.store.base import CanonicalEvent, digest
from metatrail.store.ingest import SQLITE_ROWS_PER_INSERT


def _nested(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value  # type: ignore[no-any-return]


@pytest.mark.parametrize(("value", "max_depth"), [
    ({"a": "x"}, 64), ({"a": "x\x00"}, 64), ({"a\x00": 1}, 64), ({"a": ["\x00"]}, 64), ({"a": "\\u0000"}, 64),
    (_nested(64), 64), (_nested(65), 64), (_nested(3), 3), (_nested(4), 3), ({"a": "{[{[{["}, 2), ([[[]]], 2),
])
def test_plainly_sound_never_clears_what_the_walk_refuses(value: Any, max_depth: int) -> None:
    try:
        check_structure(value, max_depth=max_depth)
        sound = True
    except InvalidEvent:
        sound = False
    for text in (canonical_bytes(value) if isinstance(value, dict) else json.dumps(value).encode(),
                 json.dumps(value).encode(), json.dumps(value, indent=2).encode()):
        if plainly_sound(text, max_depth=max_depth):
            assert sound, text


def test_plainly_sound_clears_ordinary_events() -> None:
    for event in bulk_events(3):
        assert plainly_sound(canonical_bytes(event))


def test_validation_with_text_refuses_as_without() -> None:
    event = bulk_events(1)[0]
    assert validate_event(event, text=canonical_bytes(event)) == validate_event(event)
    for bad in ({**event, "producer": "p\x00"}, {**event, "extra": _nested(70)}, {**event, "k\x00": 1}):
        with pytest.raises(InvalidEvent) as without:
            validate_event(bad)
        with pytest.raises(InvalidEvent) as with_text:
            validate_event(bad, text=canonical_bytes(bad))
        assert (with_text.value.status, with_text.value.path) == (without.value.status, without.value.path)


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 2049, 4094, 4095, 4096, 100_000])
def test_digest_is_sha256(size: int) -> None:
    data = os.urandom(size)
    assert digest(data) == hashlib.sha256(data).hexdigest()


def test_canonical_event_is_stored_as_the_plain_one(tmp_path: Path) -> None:
    events = bulk_events(5)
    with open_store(f"sqlite:///{tmp_path / 'a.db'}") as plain, open_store(f"sqlite:///{tmp_path / 'b.db'}") as fast:
        plain.ingest(events)
        wrapped = [CanonicalEvent.of(e) for e in events]
        assert [w.id for w in wrapped] == [event_id(e) for e in events]
        assert fast.ingest(wrapped).inserted == len(events)
        assert fast.ingest(events).inserted == 0  # the same identities
        assert [(e.id, e.body) for e in plain.iter_events()] == [(e.id, e.body) for e in fast.iter_events()]
        assert plain.list_runs(limit=100) == fast.list_runs(limit=100)


def test_multirow_inserts_cover_batches_of_any_size(tmp_path: Path) -> None:
    runs = SQLITE_ROWS_PER_INSERT + 7  # START and COMPLETE each: every table gets a chunk and a remainder
    events = bulk_events(runs)
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        starts = [e for e in events if e["eventType"] == "START"]
        assert store.ingest(starts).inserted == runs
        assert store.ingest(events).inserted == runs  # the upsert of every run, in chunks
        stats = store.stats()
        assert (stats["events"], stats["runs"]) == (2 * runs, runs)
        assert stats["states"] == {"completed": runs}
        reference = open_store(f"sqlite:///{tmp_path / 'ref.db'}")
        try:
            for e in events:
                reference.ingest([e])
            assert reference.list_runs(limit=10_000) == store.list_runs(limit=10_000)
            key = store.list_runs(limit=1)[0]["run_id"]
            assert reference.get_run(key) == store.get_run(key)
        finally:
            reference.close()
