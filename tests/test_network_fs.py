"""Stores and hash caches on network filesystems (metatrail.fstype): SQLite's write-ahead log cannot work on NFS,
Lustre, GPFS and the like, so there they use a rollback journal, say so once, and still take concurrent writers.

No test machine mounts NFS, so the kernel's mount table is the one thing faked: a mountinfo file in the format of
``proc(5)`` that says the test's directory is an NFS mount (``fstype.MOUNTINFO`` points at it). Everything else is
real: SQLite files, the store, the Recorder's writer, forked writer processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from eventgen import pipeline_batch
from mounts import LOCAL_ROOT, fake_mountinfo

from metatrail import fstype
from metatrail.hashing import HashCache, hash_path
from metatrail.recorder import Recorder
from metatrail.store import open_store, sqlitefile


@pytest.fixture
def on_nfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory that the (faked) mount table says is on NFS 4."""
    shared = tmp_path / "shared project"  # a space: escaped as \040 in the table
    shared.mkdir()
    monkeypatch.setattr(fstype, "MOUNTINFO", str(fake_mountinfo(tmp_path, {str(shared.resolve()): "nfs4"})))
    # A reading command run in this process (metatrail.cli.main) lowers the notice's level: each test starts afresh.
    monkeypatch.setattr(sqlitefile, "NETWORK_NOTICE_LEVEL", logging.WARNING)
    return shared


def _journal(db: Path) -> str:
    """The journal mode a fresh connection finds: ``wal`` is kept in the file, rollback modes are per connection
    (a fresh one reports ``delete``)."""
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


# -- the mount table ------------------------------------------------------------------------------------------------


def test_the_mount_table_is_read_as_the_kernel_writes_it(tmp_path: Path) -> None:
    text = fake_mountinfo(tmp_path, {"/scratch": "lustre", "/home/a b": "nfs", "/home/a b/local": "ext4",
                                     "/mnt/sshfs": "fuse.sshfs", "/boot": "vfat"}).read_text()
    text += "garbage line without the separator\n"
    table = fstype.mount_table(text)
    assert ("/home/a b", "nfs") in table and len(table) == 6  # escapes undone, the bad line skipped
    assert fstype.filesystem_of("/scratch/run1/x.db", table) == "lustre"
    assert fstype.filesystem_of("/scratchpad/x.db", table) == "ext4"  # a longer name is not inside /scratch
    assert fstype.filesystem_of("/home/a b/local/x.db", table) == "ext4"  # the longest mount point wins
    assert fstype.filesystem_of("/home/a b", table) == "nfs"
    # A later mount on the same point hides the earlier one.
    assert fstype.filesystem_of("/scratch/x", fstype.mount_table(text + LOCAL_ROOT.replace(" / / ", " / /scratch ")
                                                                 .replace("22 1", "300 22"))) == "ext4"
    assert [t for t in ("nfs4", "lustre", "gpfs", "beegfs", "cifs", "ceph", "fuse.sshfs", "fuse.s3fs", "ext4", "xfs",
                        "tmpfs", "fuseblk", "fuse", "fuse.bindfs", "zfs") if fstype.is_network_type(t)] == \
        ["nfs4", "lustre", "gpfs", "beegfs", "cifs", "ceph", "fuse.sshfs", "fuse.s3fs"]


def test_a_path_is_judged_by_the_nearest_directory_that_exists(on_nfs: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert fstype.network_filesystem(on_nfs / ".metatrail" / "metatrail.db") == "nfs4"  # neither exists yet
    assert fstype.network_filesystem(on_nfs) == "nfs4"
    assert fstype.network_filesystem(tmp_path / "elsewhere.db") is None
    link = tmp_path / "link"
    link.symlink_to(on_nfs)
    assert fstype.network_filesystem(link / "store.db") == "nfs4"  # through a symbolic link, where it really is
    monkeypatch.setattr(fstype, "MOUNTINFO", str(tmp_path / "no such file"))
    assert fstype.network_filesystem(on_nfs) is None  # cannot tell: as before, WAL


# -- the store ------------------------------------------------------------------------------------------------------


def test_a_store_on_a_network_filesystem_uses_a_rollback_journal_and_says_why_once(
        on_nfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = on_nfs / ".metatrail" / "metatrail.db"
    caplog.set_level(logging.WARNING, logger="metatrail")
    with open_store(f"sqlite:///{db}") as store:
        store.ingest(pipeline_batch(20, 1))
        store.ingest(pipeline_batch(20, 2))
        assert len(store.list_runs(limit=100)) == 40
    assert _journal(db) == "delete"  # never switched to WAL
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    said = [r.getMessage() for r in caplog.records if "write-ahead log" in r.getMessage()]
    assert len(said) == 1 and "nfs4 filesystem" in said[0] and "metatrail server" in said[0]


def test_the_recorders_writer_records_into_a_store_on_a_network_filesystem(on_nfs: Path) -> None:
    db = on_nfs / "metatrail.db"
    (on_nfs / "in.txt").write_text("data\n")
    rec = Recorder(_settings(db, on_nfs))
    run = rec.pipeline_run_started("nfs-pipeline")
    ex = rec.execution_started("nfs-pipeline", "step", pipeline_run=run, inputs=[on_nfs / "in.txt"])
    rec.execution_finished(ex)
    rec.pipeline_run_finished(run)
    assert rec.flush(30)
    rec.close()
    assert rec.written == 4 and rec.failed_writes == 0
    assert _journal(db) == "delete" and not Path(f"{db}-wal").exists()
    with open_store(f"sqlite:///{db}") as store:
        shown = store.get_run(ex.id)
        assert shown is not None and shown["state"] == "completed"
    assert _journal(on_nfs / "hashcache.db") == "delete"  # the hash cache beside it too


def test_a_server_writes_no_event_inline_into_a_store_with_a_rollback_journal(on_nfs: Path, tmp_path: Path) -> None:
    """A server writes a lone event on its event loop only when the store can refuse to wait for its write lock,
    which takes a write-ahead log (there only BEGIN IMMEDIATE can find the lock held; with a rollback journal the
    commit waits for readers too, after all the work)."""
    from metatrail.server.writer import IngestWriter
    from metatrail.store.sqlite_writer import SqliteWriter

    local = SqliteWriter.open(f"sqlite:///{tmp_path / 'local.db'}")
    on_network = SqliteWriter.open(f"sqlite:///{on_nfs / 'server.db'}")
    assert local is not None and on_network is not None
    try:
        assert local.can_refuse_to_wait and not on_network.can_refuse_to_wait
        writer = IngestWriter(on_network, inline_max=1)  # type: ignore[arg-type]
        try:
            assert writer.submit(pipeline_batch(1, 1)[:1], "hub").result(30).inserted == 1
            assert writer._thread is not None  # written by the writer thread, not on the caller's
        finally:
            writer.close()
    finally:
        local.close()
        on_network.close()


def _settings(db: Path, where: Path) -> Any:
    from metatrail.config import load_settings

    return load_settings(store=f"sqlite:///{db}", hash_cache=str(where / "hashcache.db"), energy=False,
                         writer="thread")


def test_a_wal_store_moved_onto_a_network_filesystem_is_switched_when_no_one_else_holds_it(
        on_nfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    db = on_nfs / "metatrail.db"
    table = fstype.MOUNTINFO
    monkeypatch.setattr(fstype, "MOUNTINFO", str(tmp_path / "not read"))  # as on a machine where it looked local
    with open_store(f"sqlite:///{db}") as store:
        store.ingest(pipeline_batch(5, 1))
    assert _journal(db) == "wal"

    monkeypatch.setattr(fstype, "MOUNTINFO", table)
    caplog.set_level(logging.WARNING, logger="metatrail")
    holder = sqlite3.connect(db)  # another process's connection, reading: the switch needs the file to itself
    holder.execute("BEGIN")
    holder.execute("SELECT count(*) FROM events").fetchone()
    try:
        began = time.monotonic()
        with open_store(f"sqlite:///{db}") as store:
            store.ingest(pipeline_batch(5, 2))  # still works, in WAL mode
            assert len(store.list_runs(limit=100)) == 10
        assert time.monotonic() - began < 20  # a short try, not the store's minute-long busy wait
        assert _journal(db) == "wal"
        assert any("stays in WAL mode" in r.getMessage() for r in caplog.records)
    finally:
        holder.close()
    with open_store(f"sqlite:///{db}") as store:  # alone now
        assert len(store.list_runs(limit=100)) == 10
    assert _journal(db) == "delete"


def _write_batches(url: str, seed: int) -> None:
    with open_store(url) as store:
        for part in range(5):
            store.ingest(pipeline_batch(20, seed * 10 + part))


def test_writer_processes_share_a_store_on_a_network_filesystem(on_nfs: Path) -> None:
    url = f"sqlite:///{on_nfs / 'metatrail.db'}"
    with open_store(url):
        pass  # created before the writers race for it
    ctx = multiprocessing.get_context("fork")  # the children see the same (faked) mount table
    procs = [ctx.Process(target=_write_batches, args=(url, seed)) for seed in range(1, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with open_store(url) as store:
        assert store.stats()["events"] == 4 * 5 * 40
    assert _journal(on_nfs / "metatrail.db") == "delete"


def test_a_hash_cache_on_a_network_filesystem_uses_a_rollback_journal(on_nfs: Path) -> None:
    data = on_nfs / "data.bin"
    data.write_bytes(b"x" * 4096)
    cache = HashCache(on_nfs / "cache" / "hashcache.db")
    first = hash_path(data, cache)
    again = hash_path(data, cache)
    assert first.hash == again.hash and first.hash is not None
    assert _journal(on_nfs / "cache" / "hashcache.db") == "delete"
    assert not (on_nfs / "cache" / "hashcache.db-wal").exists()


def test_status_says_a_store_on_a_network_filesystem_uses_a_rollback_journal(
        on_nfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from metatrail.cli import main

    caplog.set_level(logging.INFO, logger="metatrail")
    on_share = f"sqlite:///{on_nfs / 'metatrail.db'}"
    assert main(["status", "--store", on_share]) == 0
    said = " ".join(capsys.readouterr().out.split())  # as the console wrapped it
    assert "journal rollback (the store is on nfs4, where SQLite's write-ahead log cannot work)" in said
    # A command that only reads says it in its output; the notice is not repeated as a warning at every query.
    notices = [r for r in caplog.records if "write-ahead log cannot work" in r.getMessage()]
    assert [r.levelno for r in notices] == [logging.INFO]
    assert main(["status", "--store", f"sqlite:///{tmp_path / 'local.db'}"]) == 0
    assert "journal" not in capsys.readouterr().out
