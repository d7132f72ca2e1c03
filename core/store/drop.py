"""Drop directories: how processes on many hosts record into one embedded store on a shared filesystem.

Why: HPC users keep the default store, ``.metatrail/metatrail.db``, on NFS, Lustre or GPFS, and Parsl workers on
other nodes record into it. SQLite there relies on the filesystem's byte-range locks between hosts, which many
cluster mounts do not give (Lustre mounted with ``localflock``, NFS without its lock daemon) or give slowly; a worker
whose writes keep failing loses its events. A file that only one process ever writes needs no lock. So such a writer
drops its events as segment files into a directory beside the store, ``<store file>.drop/``, and the processes that
own the store (the workflow's controller, the ``metatrail`` commands) ingest them into it.

Contract:

* ``drop:///path/to/metatrail.db`` opens a :class:`DropStore`, the write side only (``ingest`` and ``close``). Each
  ``ingest`` call writes one segment, ``<ns>-<host>-<pid>-<seq>.jsonl``, one canonical event per line: written under
  a dot-name, flushed to disk and renamed into place, so a reader never sees a segment in part. A writer killed
  mid-write leaves a dot-file, which :func:`ingest_drops` removes once it is :data:`STALE_TEMP_S` old.
* :func:`ingest_drops` stores every segment there is (oldest first, several per transaction) and removes a segment
  once the store has committed it. Idempotent: a segment ingested twice (two ingesters at once, or a crash between the
  commit and the removal) is stored once, as any event is. A segment that cannot be stored (not UTF-8 JSON lines, an
  event the store refuses, larger than :data:`MAX_SEGMENT_BYTES`) is moved to ``rejected/`` with the reason logged and
  nothing of it stored; the other segments go on. A store that is busy or failing leaves every segment in place for
  the next ingest.
* Nothing here raises into a host: the write side raises :class:`~metatrail.errors.StoreError` to the Recorder, which
  retries and counts as for any store; :func:`ingest_drops` logs and returns what it did.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metatrail.errors import ConfigError, EventError, StoreError
from metatrail.store.base import IngestResult

log = logging.getLogger("metatrail")

SCHEME = "drop"
SUFFIX = ".drop"  # the directory beside the store file: metatrail.db -> metatrail.db.drop/
SEGMENT_SUFFIX = ".jsonl"
REJECTED = "rejected"
STALE_TEMP_S = 3600.0  # a dot-file this old is a writer killed mid-write (a live one renames within milliseconds)
MAX_SEGMENT_BYTES = 256 << 20  # a Recorder's batch is far smaller: larger is not one of ours
INGEST_BATCH_EVENTS = 2000  # events per transaction when many small segments wait

_HOST_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_seq = itertools.count(1)


def drop_dir(store_path: str | os.PathLike[str]) -> Path:
    """The drop directory of the SQLite store file ``store_path``."""
    return Path(os.fspath(store_path) + SUFFIX)


def store_path_of(url: str) -> Path | None:
    """The store file a ``sqlite:///`` or ``drop:///`` URL names, None for other URLs (and in-memory SQLite)."""
    for prefix in ("sqlite:///", f"{SCHEME}:///"):
        if url.startswith(prefix):
            path = url[len(prefix):]
            if path in ("", ":memory:") or "?" in path:
                return None
            return Path(path)
    return None


def url_for_workers(url: str) -> str:
    """The store URL for processes that may run on other hosts (a workflow's remote workers) to record into the
    store at ``url``: ``drop:///…`` for an embedded store on a network or cluster filesystem
    (:func:`metatrail.fstype.network_filesystem`), else ``url`` itself."""
    path = store_path_of(url)
    if path is None or not url.startswith("sqlite:///"):
        return url
    from metatrail.fstype import network_filesystem

    if network_filesystem(path) is None:
        return url
    return f"{SCHEME}:///{path}"


class DropStore:
    """The append side of a drop directory (see the module docstring). Thread-safe; a forked child writes its own
    segments (the names carry its pid)."""

    def __init__(self, url: str) -> None:
        path = store_path_of(url)
        if path is None or not url.startswith(f"{SCHEME}:///"):
            raise ConfigError(f"a drop store URL names the store file it drops for: drop:///path/to/metatrail.db, "
                              f"not {url!r}")
        self.url = url
        self.store_path = path
        self.directory = drop_dir(path)
        self._host = _HOST_CHARS.sub("_", socket.gethostname())[:64] or "host"
        self._closed = False
        self._lock = threading.Lock()

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None,
               allowed_pipelines: frozenset[str] | None = None) -> IngestResult:
        """Write ``events`` as one segment (all or nothing). ``inserted`` counts them all: whether the store already
        holds one is known only when the owner ingests the segment. ``site``/``sites``/``allowed_pipelines`` belong
        to a server's ingest and are refused here."""
        if site is not None or sites is not None or allowed_pipelines is not None:
            raise ConfigError("a drop store takes a client's own events only (no site or pipeline scope)")
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        if not events:
            return IngestResult(received=0, inserted=0)
        from metatrail.openlineage.events import canonical_bytes

        try:
            lines = [canonical_bytes(e) for e in events]
        except (TypeError, ValueError) as exc:
            raise EventError(f"an event is not JSON data: {exc}") from None
        payload = b"\n".join(lines) + b"\n"
        name = f"{time.time_ns():020d}-{self._host}-{os.getpid()}-{next(_seq):08d}{SEGMENT_SUFFIX}"
        temp = self.directory / f".{name}.tmp"
        try:
            with self._lock:
                # Only the drop directory is made, never the store's: on a node that mounts the shared filesystem
                # elsewhere (or not at all), making the path would put the segments on its local disk, where the
                # store's owner never looks.
                self.directory.mkdir(exist_ok=True)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, self.directory / name)
                _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if not self.directory.parent.is_dir():
                raise StoreError(f"the store's directory {self.directory.parent} does not exist on this host: is the "
                                 "shared filesystem mounted at the same path here? (METATRAIL_STORE names it for "
                                 "this host)") from None
            raise StoreError(f"cannot write a segment into {self.directory}: {exc}") from None
        return IngestResult(received=len(events), inserted=len(events))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True


def _fsync_dir(directory: Path) -> None:
    # The rename is durable once the directory is: without this a crash of the host could lose a segment that the
    # Recorder counted as stored.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename stands
    finally:
        os.close(fd)


@dataclass
class DropIngest:
    """What one :func:`ingest_drops` call did."""

    segments: int = 0  # segments stored and removed
    events: int = 0  # events in them
    inserted: int = 0  # of those, new to the store
    rejected: list[str] = field(default_factory=list)  # segment names moved to rejected/
    left: int = 0  # segments left in place (the store busy or failing, or out of time)
    error: str | None = None  # why segments were left


def pending_segments(store_path: str | os.PathLike[str]) -> list[str]:
    """Names of the segments waiting in the drop directory of ``store_path``, oldest first ([] when there is none)."""
    try:
        with os.scandir(drop_dir(store_path)) as entries:
            return sorted(e.name for e in entries if e.name.endswith(SEGMENT_SUFFIX) and not e.name.startswith(".")
                          and e.is_file())
    except OSError:
        return []


def ingest_drops(store: Any, store_path: str | os.PathLike[str], *, deadline: float | None = None) -> DropIngest:
    """Store the segments waiting beside ``store_path`` into ``store`` (an :class:`~metatrail.store.base.EventStore`
    or the Recorder's writer: only ``ingest`` is used) and remove them; see the module docstring. ``deadline``
    (``time.monotonic``): segments not reached by then are left for the next call. Never raises."""
    done = DropIngest()
    directory = drop_dir(store_path)
    names = pending_segments(store_path)
    _remove_stale_temps(directory)
    batch: list[tuple[str, list[dict[str, Any]]]] = []
    batch_events = 0
    for i, name in enumerate(names):
        if deadline is not None and time.monotonic() >= deadline:
            done.left += len(names) - i
            break
        events, reason = _read_segment(directory / name)
        if events is None:
            if reason is not None:
                _reject(directory, name, reason, done)
            continue  # gone meanwhile: another ingester took it
        batch.append((name, events))
        batch_events += len(events)
        if batch_events >= INGEST_BATCH_EVENTS:
            if not _store_batch(store, directory, batch, done):
                done.left += len(names) - i - 1
                return done
            batch, batch_events = [], 0
    if batch:
        _store_batch(store, directory, batch, done)
    return done


def _read_segment(path: Path) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(events, None); (None, reason) for a segment that is not ours to store; (None, None) when it is gone."""
    import orjson

    try:
        size = path.stat().st_size
        if size > MAX_SEGMENT_BYTES:
            return None, f"{size} bytes, more than a segment holds ({MAX_SEGMENT_BYTES})"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"unreadable: {exc}"
    events: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return None, f"line {number} is not JSON ({exc})"
        if not isinstance(event, dict):
            return None, f"line {number} is not an event object"
        events.append(event)
    if not events:
        return None, "no events"
    return events, None


def _store_batch(store: Any, directory: Path, batch: list[tuple[str, list[dict[str, Any]]]],
                 done: DropIngest) -> bool:
    """Ingest the segments of ``batch`` in one transaction, then remove them; a batch the store refuses is retried
    segment by segment so that only the bad segment is rejected. False when the store failed (the rest is left)."""
    try:
        result = store.ingest([e for _, events in batch for e in events])
    except EventError as exc:
        if len(batch) == 1:
            _reject(directory, batch[0][0], str(exc), done)
            return True
        for i, one in enumerate(batch):
            if not _store_batch(store, directory, [one], done):
                done.left += len(batch) - i - 1
                return False
        return True
    except Exception as exc:
        done.left += len(batch)
        done.error = f"{type(exc).__name__}: {exc}"
        log.warning("metatrail: %d dropped segments in %s could not be stored now (%s); they wait for the next "
                    "ingest", len(batch), directory, done.error)
        return False
    done.inserted += result.inserted
    for name, events in batch:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass  # another ingester stored and removed it too (the store keeps one copy)
        except OSError as exc:
            log.warning("metatrail: stored the dropped segment %s but cannot remove it (%s); storing it again is "
                        "harmless", directory / name, exc)
        done.segments += 1
        done.events += len(events)
    return True


def _reject(directory: Path, name: str, reason: str, done: DropIngest) -> None:
    target = directory / REJECTED
    try:
        target.mkdir(exist_ok=True)
        os.rename(directory / name, target / name)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.error("metatrail: the dropped segment %s cannot be stored (%s) nor moved aside (%s)", directory / name,
                  reason, exc)
        return
    done.rejected.append(name)
    log.error("metatrail: the dropped segment %s cannot be stored (%s); nothing of it was stored, it was moved to %s",
              name, reason, target)


def _remove_stale_temps(directory: Path) -> None:
    now = time.time()
    try:
        with os.scandir(directory) as entries:
            for e in entries:
                if e.name.startswith(".") and e.name.endswith(".tmp"):
                    try:
                        if now - e.stat().st_mtime > STALE_TEMP_S:
                            os.unlink(e.path)
                    except OSError:
                        pass
    except OSError:
        pass


INGEST_INTERVAL_S = 10.0  # how often a DropIngester looks: a long workflow's directory stays small


class DropIngester:
    """Takes in the drops of the embedded store at ``url`` every ``interval_s`` on a daemon thread, for a process
    that owns the store while writers on other hosts drop beside it (a Parsl DFK with remote workers), so that a long
    workflow neither leaves its records out of the store nor piles up files on a cluster filesystem's metadata server.

    The store's writer (the Recorder's, no SQLAlchemy) is opened on the thread at the first segment found; each
    transaction holds :data:`metatrail.forkwaits.STORE_WRITES`, as the Recorder's do. :meth:`stop` ends the thread
    (waiting at most ``timeout`` for a look in progress) and closes the writer. Never raises."""

    def __init__(self, url: str, *, interval_s: float = INGEST_INTERVAL_S) -> None:
        self.url = url
        self.path = store_path_of(url)
        self.interval_s = interval_s
        self.taken = DropIngest()  # totals over the ingester's life
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: Any = None

    def start(self) -> None:
        if self.path is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="metatrail-drops", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(max(timeout, 0.0))
            if thread.is_alive():
                return  # a look still running: the thread closes the writer when it ends
        self._close_writer()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._look()
            except Exception as exc:  # a thread of the host must not die noisily; the next look tries again
                log.warning("metatrail: taking in dropped segments failed (%s: %s)", type(exc).__name__, exc)
        self._close_writer()  # also when stop() gave up waiting for the last look

    def _look(self) -> None:
        assert self.path is not None
        if not pending_segments(self.path):
            return
        if self._writer is None:
            from metatrail.forkwaits import IMPORTS
            from metatrail.store.sqlite_writer import open_writer

            with IMPORTS.held():
                self._writer = open_writer(self.url)
        done = ingest_drops(_ForkSafe(self._writer), self.path)
        self.taken.segments += done.segments
        self.taken.events += done.events
        self.taken.inserted += done.inserted
        self.taken.rejected += done.rejected

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()


class _ForkSafe:
    """A store whose every transaction a fork waits for (see :mod:`metatrail.forkwaits`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def ingest(self, events: Sequence[Mapping[str, Any]]) -> IngestResult:
        from metatrail.forkwaits import STORE_WRITES

        with STORE_WRITES.held():
            result: IngestResult = self.store.ingest(events)
            return result
