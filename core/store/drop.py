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
  commit and the removal) is stored once, as any event is; each event keeps the exact bytes its writer made, so its
  identity is the one a direct write gives. A segment that is not ours (not UTF-8 JSON lines, larger than
  :data:`MAX_SEGMENT_BYTES`) is moved to ``rejected/`` whole; of a segment the store refuses, only the events it
  refuses go there, the others are stored. Reasons are logged. A store that is busy or failing, or a segment that
  cannot be read now (a stale NFS handle), leaves the segments in place for the next ingest.
* Who takes them in: a :class:`DropIngester` (the Parsl DFK's, every :data:`INGEST_INTERVAL_S`, and at its
  cleanup), which marks the directory (:func:`mark_ingester`), and the ``metatrail`` commands that read the store,
  unless a process on another host marked it recently (:func:`ingester_elsewhere`): one host writes the SQLite file.
* Nothing here raises into a host: the write side raises :class:`~metatrail.errors.StoreError` to the Recorder, which
  retries and counts as for any store; :func:`ingest_drops` logs and returns what it did.
"""

from __future__ import annotations

import contextlib
import itertools
import json
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

from metatrail.config import FILE_STORE_PREFIXES
from metatrail.errors import ConfigError, EventError, StoreError
from metatrail.logsafe import log_once
from metatrail.store.base import CanonicalEvent, IngestResult
from metatrail.store.ingest import is_transient

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
    for prefix in FILE_STORE_PREFIXES:
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
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
                fd = os.open(temp, flags, 0o644)
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
    batch: list[tuple[str, list[CanonicalEvent]]] = []
    batch_events = 0
    for i, name in enumerate(names):
        if deadline is not None and time.monotonic() >= deadline:
            done.left += len(names) - i
            break
        try:
            events, reason = _read_segment(directory / name)
        except OSError as exc:  # a read that may pass later (EIO, ESTALE, out of file descriptors): not the content
            done.left += 1
            done.error = f"cannot read {name}: {exc}"
            continue
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


def _read_segment(path: Path) -> tuple[list[CanonicalEvent] | None, str | None]:
    """(events, None); (None, reason) for a segment that is not ours to store; (None, None) when it is gone. Raises
    ``OSError`` when the file exists but cannot be read now.

    Each event keeps its line as its canonical bytes, so its identity and stored text are exactly what the writer
    made (and what a direct write would have stored). A line whose parsed value does not write back the same (an
    integer beyond 64 bits, which orjson reads as a float) is parsed again by the standard library, which keeps it."""
    import json

    import orjson

    from metatrail.openlineage.events import canonical_bytes

    try:
        size = path.stat().st_size
        if size > MAX_SEGMENT_BYTES:
            return None, f"{size} bytes, more than a segment holds ({MAX_SEGMENT_BYTES})"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    events: list[CanonicalEvent] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
            if isinstance(event, dict) and canonical_bytes(event) != line:
                event = json.loads(line)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return None, f"line {number} is not JSON ({exc})"
        if not isinstance(event, dict):
            return None, f"line {number} is not an event object"
        events.append(CanonicalEvent(event, line))
    if not events:
        return None, "no events"
    return events, None


def _store_batch(store: Any, directory: Path, batch: list[tuple[str, list[CanonicalEvent]]],
                 done: DropIngest) -> bool:
    """Ingest the segments of ``batch`` in one transaction, then remove them. A batch the store refuses is tried
    segment by segment, and a refused segment event by event, so that only the events that cannot be stored are set
    aside. False when the store itself failed (busy, unreachable: the rest is left for the next ingest)."""
    try:
        result = store.ingest([e for _, events in batch for e in events])
    except Exception as exc:
        if isinstance(exc, StoreError) or is_transient(exc):
            done.left += len(batch)
            done.error = f"{type(exc).__name__}: {exc}"
            log_once(f"drops-failing:{directory}", "metatrail: %d dropped segments in %s could not be stored now "
                     "(%s); they wait for the next ingest", len(batch), directory, done.error)
            return False
        if len(batch) > 1:
            for i, one in enumerate(batch):
                if not _store_batch(store, directory, [one], done):
                    done.left += len(batch) - i - 1
                    return False
            return True
        return _store_alone(store, directory, batch[0], done, exc)
    done.inserted += result.inserted
    _remove(directory, batch, done)
    return True


def _store_alone(store: Any, directory: Path, segment: tuple[str, list[CanonicalEvent]], done: DropIngest,
                 first: BaseException) -> bool:
    """One segment the store refused as a whole: store its events one at a time; those refused go to ``rejected/``
    (in a segment of their own, under the same name) with the reason."""
    name, events = segment
    refused: list[CanonicalEvent] = []
    reason = f"{type(first).__name__}: {first}"
    for event in events:
        try:
            done.inserted += store.ingest([event]).inserted
        except Exception as exc:
            if isinstance(exc, StoreError) or is_transient(exc):
                done.left += 1
                done.error = f"{type(exc).__name__}: {exc}"
                return False  # the segment stays whole; events stored meanwhile are stored once when it comes again
            refused.append(event)
            reason = f"{type(exc).__name__}: {exc}"
    if len(refused) == len(events):
        _reject(directory, name, reason, done)
        return True
    if refused:
        target = directory / REJECTED / name
        try:
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"".join(e.canonical + b"\n" for e in refused))
        except OSError as exc:
            log.error("metatrail: %d events of the dropped segment %s cannot be stored (%s) nor set aside (%s); the "
                      "segment stays", len(refused), directory / name, reason, exc)
            done.left += 1
            return True
        done.rejected.append(name)
        log.error("metatrail: %d of the %d events of the dropped segment %s cannot be stored (%s); they were moved "
                  "to %s, the others stored", len(refused), len(events), name, reason, target)
    _remove(directory, [segment], done, stored=len(events) - len(refused))
    return True


def _remove(directory: Path, batch: list[tuple[str, list[CanonicalEvent]]], done: DropIngest, *,
            stored: int | None = None) -> None:
    """Remove the segments of ``batch``, which the store has committed."""
    for name, events in batch:
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass  # another ingester stored and removed it too (the store keeps one copy)
        except OSError as exc:
            log_once(f"drops-unlink:{directory}", "metatrail: stored the dropped segment %s but cannot remove it "
                     "(%s); storing it again is harmless", directory / name, exc)
        done.segments += 1
        done.events += len(events) if stored is None else stored


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
        mark_ingester(self.path)
        self._thread = threading.Thread(target=self._run, name="metatrail-drops", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.path is not None:
            unmark_ingester(self.path)
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
                log_once(f"drops-look:{type(exc).__name__}", "metatrail: taking in dropped segments failed (%s: %s); "
                         "trying again every %.0f s", type(exc).__name__, exc, self.interval_s)
        self._close_writer()  # also when stop() gave up waiting for the last look

    def _look(self) -> None:
        assert self.path is not None
        mark_ingester(self.path)
        if not pending_segments(self.path):
            return
        if self._writer is None:
            from metatrail.forkwaits import IMPORTS

            with IMPORTS.held():  # the imports only: opening the store may wait on the filesystem
                from metatrail.store.sqlite_writer import open_writer
            self._writer = open_writer(self.url)
        # Bounded, so that a stop() that gave up waiting is not followed by a long backlog on this thread.
        done = ingest_drops(_ForkSafe(self._writer), self.path, deadline=time.monotonic() + self.interval_s)
        self.taken.segments += done.segments
        self.taken.events += done.events
        self.taken.inserted += done.inserted
        self.taken.rejected += done.rejected

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()


INGESTER_FILE = ".ingester"  # in the drop directory: which process takes the segments in, and when it last looked
INGESTER_FRESH_S = 3 * INGEST_INTERVAL_S


def mark_ingester(store_path: str | os.PathLike[str]) -> None:
    """Say, in the drop directory, that this process takes its segments in (a :class:`DropIngester` does at each
    look), so that a ``metatrail`` command on another host leaves them to it (:func:`ingester_elsewhere`)."""
    directory = drop_dir(store_path)
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
    temp = directory / f".{INGESTER_FILE}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        directory.mkdir(exist_ok=True)
        temp.write_text(record, encoding="utf-8")
        os.replace(temp, directory / INGESTER_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()


def unmark_ingester(store_path: str | os.PathLike[str]) -> None:
    """Remove this process's mark (:func:`mark_ingester`), if it is still this process's."""
    path = drop_dir(store_path) / INGESTER_FILE
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("host") == socket.gethostname() and record.get("pid") == os.getpid():
            path.unlink()


def ingester_elsewhere(store_path: str | os.PathLike[str]) -> str | None:
    """``"host (pid N)"`` when a process on another host takes the segments in and looked recently: a command here
    then leaves them to it, since two hosts writing one SQLite file on a cluster filesystem is what drop directories
    avoid. None otherwise (no mark, an old one, or one of this host: SQLite's locks work between its processes)."""
    try:
        record = json.loads((drop_dir(store_path) / INGESTER_FILE).read_text(encoding="utf-8"))
        host, pid, at = str(record["host"]), int(record["pid"]), float(record["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname() or abs(time.time() - at) > INGESTER_FRESH_S:
        return None
    return f"{host} (pid {pid})"


class _ForkSafe:
    """A store whose every transaction a fork waits for (see :mod:`metatrail.forkwaits`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def ingest(self, events: Sequence[Mapping[str, Any]]) -> IngestResult:
        from metatrail.forkwaits import STORE_WRITES

        with STORE_WRITES.held():
            result: IngestResult = self.store.ingest(events)
            return result
