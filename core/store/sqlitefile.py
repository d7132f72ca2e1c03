"""The embedded store's SQLite file: the checks before it is opened and the settings of every connection to it.

Shared by the SQLAlchemy engines of :mod:`metatrail.store.dialect` and the Recorder's
:mod:`metatrail.store.sqlite_writer`, so both open the file the same way; nothing here imports SQLAlchemy.

* WAL journal, ``synchronous=NORMAL`` (durable across process crashes; an OS crash may lose the last commits, never
  corrupt), a long ``busy_timeout`` so that concurrent writers queue instead of failing.
* On a network or cluster filesystem (NFS, Lustre, GPFS …; :mod:`metatrail.fstype`) a rollback journal instead
  (``TRUNCATE``): WAL's shared-memory index cannot be shared there, between hosts or at all. Readers and the writer
  then take turns, and writers on several hosts rely on the filesystem's own locks: the warning logged once says that
  a metatrail server is the safe store for them.
* A file is looked at only through SQLite (see :func:`check_file`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from metatrail.errors import CorruptStoreError, StoreError
from metatrail.fstype import network_filesystem
from metatrail.logsafe import log_once
from metatrail.store.ingest import is_transient

BUSY_TIMEOUT_MS = 60_000
# How long a connection to a store in WAL mode on a network filesystem tries to switch it to a rollback journal; the
# switch needs the file to itself, and another process holding it is no reason to wait (the next connection tries).
SWITCH_TIMEOUT_MS = 200
# The level of the notice that a store on a network filesystem uses a rollback journal: a warning where events are
# recorded; the commands that only read a store lower it (metatrail.cli).
NETWORK_NOTICE_LEVEL = logging.WARNING

# Checkpoint the WAL every ~40 MB rather than every 4 MB: a burst of large events then pays for fewer checkpoints
# (each an fsync of the database file).
WAL_AUTOCHECKPOINT = 10_000


def configure(dbapi_conn: Any, wal_autocheckpoint: int = WAL_AUTOCHECKPOINT, *,
              path: str | os.PathLike[str] | None = None) -> None:
    """Settings of every connection to a store file (at ``path``: its filesystem chooses the journal, see the module
    docstring); the connection is left in autocommit mode (its users issue ``BEGIN`` themselves)."""
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        network = network_filesystem(path) if path is not None else None
        if path is None or network is None:
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode=WAL")
        else:
            _use_rollback_journal(cur, Path(path), network)
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


# A multi-row INSERT (ingest's, see metatrail.store.ingest.bulk_insert) keeps a statement journal of the pages its
# transaction had already changed, so that it can be undone alone; in a temporary file, that journal was a third of all
# bytes an ingest wrote (100,000 events: 680 MB of 2.1 GB). In memory it costs no write, and an ingest's is bounded by
# its batch. Only ingests keep temporary files in memory: a query's sort or temporary table over a large store must
# still spill to disk.
JOURNALS_IN_MEMORY = "PRAGMA temp_store=MEMORY"
TEMPORARY_FILES_ON_DISK = "PRAGMA temp_store=DEFAULT"


def _use_rollback_journal(cur: Any, path: Path, network: str) -> None:
    """A rollback journal for this connection (a per-connection setting, unlike WAL, which the file keeps): leaves a
    file in WAL mode, with a warning, when another process holds it."""
    log_once(f"store-network-fs:{path}", "metatrail: store %s is on a %s filesystem, where SQLite's write-ahead "
             "log cannot work; it uses a rollback journal (slower, and safe for writers on several hosts only as far "
             "as the filesystem's locks are). Parsl workers drop their events beside it instead; other writers on "
             "other hosts can too (METATRAIL_STORE=drop:///%s), or record to a metatrail server", path, network, path,
             level=NETWORK_NOTICE_LEVEL)
    cur.execute(f"PRAGMA busy_timeout={SWITCH_TIMEOUT_MS}")
    try:
        mode = cur.execute("PRAGMA journal_mode=TRUNCATE").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if not is_transient(exc):
            raise
        mode = "wal"
    if str(mode).lower() == "wal":
        log_once(f"store-network-fs-wal:{path}", "metatrail: store %s is in WAL mode on a %s filesystem and another "
                 "process holds it, so it stays in WAL mode for now; it switches to a rollback journal when a process "
                 "opens it alone", path, network)


def make_parent(path: Path) -> None:
    """Create the store file's directory; a path that cannot be one (a regular file on the way, no permission) is a
    :class:`StoreError` that names it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((d for d in (path.parent, *path.parent.parents) if d.exists() and not d.is_dir()), None)
        why = f"{blocker} is not a directory" if blocker is not None else exc.strerror or str(exc)
        raise StoreError(f"cannot create the directory of store file {path}: {why} "
                         f"(point METATRAIL_STORE elsewhere)") from None


def check_file(path: Path) -> None:
    """Refuse, without touching it, a file that is not an SQLite database or holds another application's tables.

    The file is looked at only through SQLite, never opened by this process in any other way: POSIX locks belong to
    the process, and closing *any* descriptor of the file drops every lock the process holds on it. A server opens
    an engine per part (store, tokens, peers, sync log) while earlier ones hold connections; a plain ``open()`` and
    ``close()`` here dropped their locks, and the next process to close its connection took itself for the last
    user and deleted the WAL under them (acknowledged events were lost). SQLite keeps such descriptors open until
    its last connection to the file ends.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    # Look before the first write: switching to WAL would already change a foreign database's header.
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if "file is not a database" in str(exc):
            raise CorruptStoreError(f"store file {path} is not an SQLite database (corrupt or another file); "
                                    "nothing was changed. Move it away or point METATRAIL_STORE elsewhere.") from None
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
            raise StoreError(f"cannot read store file {path}: {exc}") from None
        raise CorruptStoreError(f"store file {path} is damaged ({exc}); nothing was changed") from None
    if names and "metatrail_schema" not in names:
        raise CorruptStoreError(f"{path} holds tables ({', '.join(sorted(names)[:5])}) but is not a metatrail "
                                "store; nothing was changed")
