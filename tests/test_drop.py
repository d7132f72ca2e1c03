"""Drop directories (metatrail.store.drop): writers on other hosts drop segment files beside an embedded store on a
shared filesystem, and the store's owner takes them in. Real files, real stores, real writer processes; only the
kernel's mount table is faked (tests/mounts.py), since no test machine mounts NFS.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from eventgen import pipeline_batch
from mounts import fake_mountinfo

from metatrail import fstype
from metatrail.cli import main
from metatrail.errors import ConfigError, StoreError
from metatrail.model import Status
from metatrail.recorder import Recorder
from metatrail.store import drop as drop_mod
from metatrail.store import open_store
from metatrail.store.drop import DropIngester, DropStore, drop_dir, ingest_drops, pending_segments, url_for_workers
from metatrail.store.sqlite_writer import SqliteWriter


def _count(db: Path) -> int:
    with open_store(f"sqlite:///{db}") as store:
        return int(store.stats()["events"])


def test_a_recorder_on_a_drop_url_writes_whole_segments_that_a_reading_command_takes_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "shared" / ".metatrail" / "metatrail.db"
    db.parent.mkdir(parents=True)  # the store's owner made it (the Parsl DFK opens the store first)
    rec = Recorder(store=None, settings=_settings(f"drop:///{db}"))
    run = rec.pipeline_run_started("sim", namespace="cluster")
    ex = rec.execution_started("sim", "step", pipeline_run=run, params={"n": 3})
    rec.execution_finished(ex)
    rec.pipeline_run_finished(run, status=Status.COMPLETED)
    assert rec.flush(10)
    rec.close()
    assert rec.written == 4 and rec.failed_writes == 0
    assert not db.exists()  # nothing touched the SQLite file: the writer only dropped segments
    names = pending_segments(db)
    assert names and all(n.endswith(".jsonl") for n in names)
    assert [p.name for p in drop_dir(db).iterdir() if p.name.startswith(".")] == []  # no half-written files left
    assert f"-{os.getpid()}-" in names[0]

    assert main(["runs", "--store", f"sqlite:///{db}", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["run_id"] for r in listed} == {run.id, ex.id}
    assert pending_segments(db) == []  # taken in and removed
    assert _count(db) == 4


def test_ingest_is_idempotent_and_a_segment_taken_in_twice_is_stored_once(tmp_path: Path) -> None:
    db = tmp_path / "metatrail.db"
    DropStore(f"drop:///{db}").ingest(pipeline_batch(5, seed=1))
    DropStore(f"drop:///{db}").ingest(pipeline_batch(3, seed=2))
    first = pending_segments(db)
    kept = tmp_path / "copy.jsonl"
    shutil.copy(drop_dir(db) / first[0], kept)
    with open_store(f"sqlite:///{db}") as store:
        done = ingest_drops(store, db)
        assert (done.segments, done.events, done.inserted, done.rejected) == (2, 16, 16, [])
        # A crash between the commit and the removal, or a second ingester: the same segment again.
        shutil.copy(kept, drop_dir(db) / first[0])
        again = ingest_drops(store, db)
        assert (again.segments, again.events, again.inserted) == (1, 10, 0)
    assert _count(db) == 16 and pending_segments(db) == []


def test_a_segment_that_cannot_be_stored_is_moved_aside_and_the_others_are_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "metatrail.db"
    good = DropStore(f"drop:///{db}")
    good.ingest(pipeline_batch(2, seed=1))
    directory = drop_dir(db)
    (directory / "00000000000000000001-h-1-00000001.jsonl").write_bytes(b'{"eventType": "START"\n')  # cut short
    (directory / "00000000000000000002-h-1-00000002.jsonl").write_bytes(b'{"eventType": "START"}\n')  # not an event
    good.ingest(pipeline_batch(2, seed=2))
    with open_store(f"sqlite:///{db}") as store:
        done = ingest_drops(store, db)
    assert sorted(done.rejected) == ["00000000000000000001-h-1-00000001.jsonl",
                                     "00000000000000000002-h-1-00000002.jsonl"]
    assert done.segments == 2 and _count(db) == 8
    assert sorted(p.name for p in (directory / "rejected").iterdir()) == sorted(done.rejected)
    assert pending_segments(db) == []
    assert main(["status", "--store", f"sqlite:///{db}", "--json"]) == 0
    drops = json.loads(capsys.readouterr().out)["drops"]
    assert (drops["waiting"], drops["rejected"]) == (0, 2)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "line 1 is not JSON" in messages and "nothing of it was stored" in messages


def test_an_event_the_store_refuses_is_set_aside_alone_and_its_neighbours_are_stored(tmp_path: Path) -> None:
    db = tmp_path / "metatrail.db"
    events = pipeline_batch(3, seed=1)
    events[2] = {**events[2], "eventTime": "not a time"}  # one event of the batch that no store takes
    DropStore(f"drop:///{db}").ingest(events)
    DropStore(f"drop:///{db}").ingest(pipeline_batch(1, seed=2))  # and a good segment in the same transaction
    name = pending_segments(db)[0]
    with open_store(f"sqlite:///{db}") as store:
        done = ingest_drops(store, db)
    assert done.rejected == [name] and done.segments == 2 and done.events == 7
    assert _count(db) == 7 and pending_segments(db) == []
    kept = (drop_dir(db) / "rejected" / name).read_bytes().splitlines()
    assert [json.loads(line)["eventTime"] for line in kept] == ["not a time"]  # only the refused event, as written


def test_an_integer_beyond_64_bits_is_stored_exactly_as_a_direct_write_stores_it(tmp_path: Path) -> None:
    event = pipeline_batch(1, seed=1)[0]
    event["run"]["facets"]["metatrail_execution"]["params"] = {"seed": 2**70}
    direct, dropped = tmp_path / "direct.db", tmp_path / "dropped.db"
    with open_store(f"sqlite:///{direct}") as store:
        store.ingest([event])
        want = [(e.id, e.body) for e in store.iter_events()]
    DropStore(f"drop:///{dropped}").ingest([event])
    with open_store(f"sqlite:///{dropped}") as store:
        ingest_drops(store, dropped)
        got = [(e.id, e.body) for e in store.iter_events()]
    assert got == want
    assert got[0][1]["run"]["facets"]["metatrail_execution"]["params"]["seed"] == 2**70


def test_a_segment_that_cannot_be_read_now_is_left_for_later_not_rejected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "metatrail.db"
    DropStore(f"drop:///{db}").ingest(pipeline_batch(2, seed=1))
    real = Path.read_bytes

    def stale_handle(self: Path) -> bytes:  # what NFS says when the server lost track of an open file
        if self.suffix == ".jsonl":
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", stale_handle)
    with open_store(f"sqlite:///{db}") as store:
        done = ingest_drops(store, db)
        assert (done.segments, done.left, done.rejected) == (0, 1, [])
        monkeypatch.setattr(Path, "read_bytes", real)
        assert ingest_drops(store, db).segments == 1
    assert _count(db) == 4 and not (drop_dir(db) / "rejected").exists()


def test_a_command_leaves_the_segments_to_a_workflow_on_another_host_that_takes_them_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "metatrail.db"
    DropStore(f"drop:///{db}").ingest(pipeline_batch(2, seed=1))
    mark = drop_dir(db) / drop_mod.INGESTER_FILE
    mark.write_text(json.dumps({"host": "node0042", "pid": 4242, "at": time.time()}))
    assert main(["status", "--store", f"sqlite:///{db}", "--json"]) == 0
    drops = json.loads(capsys.readouterr().out)["drops"]
    assert drops["waiting"] == 1 and drops["taken_in_by"] == "node0042 (pid 4242)"
    assert main(["status", "--store", f"sqlite:///{db}"]) == 0
    assert "taken in by the workflow on node0042 (pid 4242)" in capsys.readouterr().out
    # That workflow stopped looking long ago (killed): the command takes them in.
    mark.write_text(json.dumps({"host": "node0042", "pid": 4242, "at": time.time() - drop_mod.INGESTER_FRESH_S - 5}))
    assert main(["status", "--store", f"sqlite:///{db}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["drops"]["waiting"] == 0 and _count(db) == 4
    # A mark of this host leaves the command free to take in: SQLite's locks work between its processes.
    drop_mod.mark_ingester(db)
    assert drop_mod.ingester_elsewhere(db) is None
    drop_mod.unmark_ingester(db)
    assert not mark.exists()


def test_a_parsl_worker_drops_only_for_the_store_file_it_was_given(tmp_path: Path) -> None:
    from metatrail.plugins.parsl.worker import _use_dfk_store

    db = tmp_path / "project" / ".metatrail" / "metatrail.db"
    db.parent.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "project")
    given = f"drop:///{db}"
    assert _use_dfk_store(None, given)  # no store of its own: the DFK's
    assert _use_dfk_store(f"sqlite:///{db}", given)  # its environment names the same file: it drops
    assert _use_dfk_store(f"sqlite:///{link / '.metatrail' / 'metatrail.db'}", given)  # also through a symlink
    assert not _use_dfk_store(f"sqlite:///{tmp_path / 'other.db'}", given)  # another store: it writes there
    assert not _use_dfk_store("https://metadata.example.org", given)
    assert not _use_dfk_store(f"sqlite:///{tmp_path / 'other.db'}", f"sqlite:///{db}")


def test_segments_wait_while_the_store_fails_and_are_taken_in_later(tmp_path: Path) -> None:
    db = tmp_path / "metatrail.db"
    DropStore(f"drop:///{db}").ingest(pipeline_batch(3, seed=1))
    DropStore(f"drop:///{db}").ingest(pipeline_batch(2, seed=2))
    failing = SqliteWriter.open(f"sqlite:///{db}")  # the Recorder's own writer, closed: every ingest fails
    assert failing is not None
    failing.close()
    done = ingest_drops(failing, db)
    assert (done.segments, done.left) == (0, 2) and "closed" in str(done.error)
    assert len(pending_segments(db)) == 2 and _count(db) == 0
    writer = SqliteWriter.open(f"sqlite:///{db}")
    assert writer is not None
    try:
        done = ingest_drops(writer, db)
    finally:
        writer.close()
    assert (done.segments, done.events) == (2, 10) and _count(db) == 10 and pending_segments(db) == []


def _drop_from_process(url: str, seed: int, batches: int) -> None:
    store = DropStore(url)
    for b in range(batches):
        store.ingest(pipeline_batch(10, seed=seed * 1000 + b))


def test_writers_in_many_processes_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "metatrail.db"
    url = f"drop:///{db}"
    ctx = multiprocessing.get_context("forkserver")
    procs = [ctx.Process(target=_drop_from_process, args=(url, seed, 10)) for seed in range(1, 5)]
    for p in procs:
        p.start()
    with open_store(f"sqlite:///{db}") as store:
        while any(p.is_alive() for p in procs):
            ingest_drops(store, db)  # taking in while the writers still write
            time.sleep(0.05)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        ingest_drops(store, db)
    assert _count(db) == 4 * 10 * 20 and pending_segments(db) == []


def test_stale_temporary_files_are_removed_and_fresh_ones_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "metatrail.db"
    directory = drop_dir(db)
    directory.mkdir()
    stale, fresh = directory / ".a.jsonl.tmp", directory / ".b.jsonl.tmp"
    for p in (stale, fresh):
        p.write_bytes(b'{"eventType": "ST')
    old = time.time() - drop_mod.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    with open_store(f"sqlite:///{db}") as store:
        done = ingest_drops(store, db)
    assert done.segments == 0 and done.rejected == []
    assert not stale.exists() and fresh.exists()


def test_an_ingester_takes_in_segments_as_they_come_while_the_workflow_runs(tmp_path: Path) -> None:
    db = tmp_path / "metatrail.db"
    ingester = DropIngester(f"sqlite:///{db}", interval_s=0.05)
    ingester.start()
    try:
        writer = DropStore(f"drop:///{db}")
        for seed in range(1, 6):
            writer.ingest(pipeline_batch(2, seed=seed))
            deadline = time.monotonic() + 30
            while pending_segments(db) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pending_segments(db) == []
        assert (ingester.taken.segments, ingester.taken.events, ingester.taken.inserted) == (5, 20, 20)
    finally:
        ingester.stop()
    assert not any(t.name == "metatrail-drops" and t.is_alive() for t in threading.enumerate())
    assert _count(db) == 20


def test_workers_get_a_drop_url_only_for_a_store_on_a_network_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared, local = tmp_path / "lustre", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    monkeypatch.setattr(fstype, "MOUNTINFO", str(fake_mountinfo(tmp_path, {str(shared.resolve()): "lustre"})))
    on_shared = f"sqlite:///{shared / '.metatrail' / 'metatrail.db'}"
    assert url_for_workers(on_shared) == f"drop:///{shared / '.metatrail' / 'metatrail.db'}"
    assert url_for_workers(f"sqlite:///{local / 'metatrail.db'}") == f"sqlite:///{local / 'metatrail.db'}"
    assert url_for_workers("http://127.0.0.1:8642") == "http://127.0.0.1:8642"
    assert url_for_workers("sqlite:///:memory:") == "sqlite:///:memory:"


def test_a_drop_store_is_write_only_and_says_what_to_read_instead(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "metatrail.db"
    assert main(["runs", "--store", f"drop:///{db}"]) != 0
    err = capsys.readouterr().err
    assert f"sqlite:///{db}" in err
    with pytest.raises(ConfigError):
        DropStore("drop:///")
    with pytest.raises(ConfigError):
        DropStore(f"drop:///{db}").ingest(pipeline_batch(1, seed=1), site="elsewhere")
    assert not drop_dir(db).exists()


def test_an_unwritable_drop_directory_is_a_store_error_the_recorder_counts(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes through permissions: a file where the directory should be stops it as well
        blocked = tmp_path / "metatrail.db.drop"
        blocked.write_text("not a directory")
    else:
        tmp_path.chmod(0o500)
    try:
        rec = _record_a_run(f"drop:///{tmp_path / 'metatrail.db'}")
        assert rec.written == 0 and rec.failed_writes == 2
    finally:
        tmp_path.chmod(0o700)


def test_a_store_directory_missing_on_this_host_is_an_error_not_a_local_copy(tmp_path: Path) -> None:
    """A node that mounts the shared filesystem elsewhere: the path does not exist there, and making it would put the
    segments on the node's own disk, where the store's owner never looks."""
    missing = tmp_path / "mnt" / "project" / ".metatrail" / "metatrail.db"
    rec = _record_a_run(f"drop:///{missing}")
    assert rec.written == 0 and rec.failed_writes == 2
    with pytest.raises(StoreError, match="is the shared filesystem mounted at the same path here"):
        DropStore(f"drop:///{missing}").ingest(pipeline_batch(1, seed=1))
    assert not (tmp_path / "mnt").exists()


def _record_a_run(store: str) -> Recorder:
    """A pipeline run's START and COMPLETE recorded into ``store``, flushed; the closed Recorder, for its counts."""
    rec = Recorder(settings=_settings(store))
    rec.pipeline_run_finished(rec.pipeline_run_started("p"))
    rec.flush(10)
    rec.close()
    return rec


def _settings(store: str) -> Any:
    from metatrail.config import load_settings

    return load_settings(store=store, energy=False)


def test_a_relative_drop_url_in_the_config_file_is_taken_from_the_project_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metatrail.config import load_settings

    project = tmp_path / "project"
    (project / ".metatrail").mkdir(parents=True)
    (project / ".metatrail" / "config.toml").write_text('[metatrail]\nstore = "drop:///shared/metatrail.db"\n')
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    for var in ("METATRAIL_STORE", "METATRAIL_CONFIG", "METATRAIL_HASH_CACHE"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings()
    assert settings.store == f"drop:///{project / 'shared' / 'metatrail.db'}"
    assert settings.hash_cache == str(project / "shared" / "hashcache.db")  # beside the store it drops for
