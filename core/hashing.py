"""DVC-compatible content hashes of files and directories, with a persistent, process-safe hash cache.

* A **file** hashes to the plain md5 of its bytes: DVC 3's ``md5`` (not DVC 2's ``md5-dos2unix``).
* A **directory** hashes to the md5 of its ``.dir`` manifest plus the suffix ``.dir``, exactly as
  ``dvc-data``'s ``build()`` makes it: a JSON list of ``{"md5": …, "relpath": …}`` sorted by relpath
  (``/``-separated), dumped with ``json.dumps(…, sort_keys=True)`` (default separators, ASCII escapes) and
  encoded as UTF-8.
* The walk follows DVC: symlinks to files are hashed as their target; symlinks to directories are skipped
  (DVC walks with ``os.walk(followlinks=False)``); empty directories leave no trace; ``.git`` (file or
  directory), ``.hg/`` and ``.dvc/`` directories and nested DVC repositories (sub-directories holding a
  ``.dvc``) are left out, as ``dvc add`` leaves them out through its default ignore rules. A ``.dvcignore``
  inside the directory is hashed as an ordinary file: DVC refuses such a directory outright, so there is no
  DVC hash to agree with, and we do not apply its patterns.
* Where DVC would fail (a dangling symlink, a FIFO or socket, an unreadable file or sub-directory) we give
  no hash and say why, rather than a hash of part of the tree.
* Remote URIs are never downloaded: they get OpenLineage names and ``hash_error="remote: not downloaded"``.

:class:`HashCache` remembers ``(absolute path, inode, size, mtime_ns) → md5`` in SQLite (WAL), like DVC's
own state database, so an unchanged file is never read twice. The trade-off is DVC's too: a file rewritten
in place with the same size and a restored mtime keeps its old hash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import stat as statmod
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from metatrail.errors import HashError
from metatrail.fstype import network_filesystem
from metatrail.model import ArtifactRef, HashInfo

__all__ = [
    "HASH_NAME",
    "HashCache",
    "dataset_name",
    "dir_manifest",
    "hash_path",
    "md5_file",
]

logger = logging.getLogger(__name__)

HASH_NAME = "md5"
"""The algorithm name carried by every hash this module makes (DVC 3's ``md5``)."""

# 1 MiB keeps the buffer in L2/L3 while each read is still large enough that hashlib drops the GIL and syscall
# overhead is negligible; 4 and 8 MiB measured the same on a 1 GB file.
_BUFFER_SIZE = 1 << 20
# Files above this go to hashing threads when a directory holds several of them; hashlib and read() release the
# GIL, so threads scale over cores. The same cut-off dvc-data uses.
_LARGE_FILE = 1 << 20
_MAX_HASH_THREADS = 8

# Names DVC's DvcIgnoreFilter leaves out by default (".git" any type; ".hg/" and ".dvc/" directories only).
_IGNORED_ANY = frozenset({".git"})
_IGNORED_DIRS = frozenset({".git", ".hg", ".dvc"})
_DVC_DIR = ".dvc"

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Object stores: OpenLineage names their datasets by object key, which has no leading slash.
_OBJECT_STORE_SCHEMES = frozenset(
    {"s3", "s3a", "s3n", "gs", "gcs", "az", "azure", "abfs", "abfss", "wasb", "wasbs", "oss", "r2"}
)
# Schemes whose user-info can only be credentials; it must never end up in a dataset name. (For abfss and
# wasbs the part before "@" is the container, which belongs in the namespace.)
_CREDENTIAL_USERINFO_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "sftp", "ssh", "webdav", "webdavs"})

REMOTE_NOT_DOWNLOADED = "remote: not downloaded"

_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------------------
# names


def dataset_name(uri: str | os.PathLike[str]) -> tuple[str, str]:
    """The OpenLineage ``(namespace, name)`` of a local path or a URI.

    ``/a/b`` or ``a/b`` → ``("file", "/abs/a/b")`` (absolute, normalised, symlinks not resolved);
    ``file:///p`` → ``("file", "/p")``; ``file://host/p`` → ``("file://host", "/p")``;
    ``s3://bucket/key`` → ``("s3://bucket", "key")`` (likewise ``gs``, ``abfss``, … object stores);
    ``https://host/p`` → ``("https://host", "/p")``; ``hdfs://host:port/p`` → ``("hdfs://host:port", "/p")``.
    Query strings, fragments and passwords are dropped so that no credential lands in lineage.
    """
    text = os.fspath(uri)
    match = _URI_RE.match(text)
    if match is None:
        return "file", os.path.abspath(text)
    parts = urlsplit(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        host = parts.netloc
        path = os.path.normpath(unquote(parts.path) or "/")
        if host in ("", "localhost"):
            return "file", path
        return f"file://{host}", path
    netloc = parts.netloc
    if "@" in netloc and (scheme in _CREDENTIAL_USERINFO_SCHEMES or ":" in netloc.rpartition("@")[0]):
        netloc = netloc.rpartition("@")[2]
    namespace = f"{scheme}://{netloc}"
    if scheme in _OBJECT_STORE_SCHEMES:
        return namespace, parts.path.lstrip("/") or "/"
    return namespace, parts.path or "/"


def _is_local(namespace: str) -> bool:
    return namespace == "file"


# ----------------------------------------------------------------------------------------------------
# file hashing


def md5_file(path: str | os.PathLike[str]) -> str:
    """The md5 hex digest of a file's bytes (DVC 3 ``md5``), streamed in 1 MiB reads.

    Raises ``OSError`` if the file cannot be opened or read.
    """
    with open(path, "rb", buffering=0) as fobj:
        fd = fobj.fileno()
        return _md5_fd(fd, os.fstat(fd).st_size)


_thread_local = threading.local()


def _md5_fd(fd: int, size_hint: int) -> str:
    hasher = hashlib.md5(usedforsecurity=False)
    if size_hint < _BUFFER_SIZE:
        # Small files (the common case in sharded datasets): read just what is there. Touching a 1 MiB buffer
        # per file would cost more than hashing the file.
        read = os.read
        # More than the file holds, so an unchanged file takes one read before EOF; at least 64 KiB, so a file
        # that grows after its stat is not read in tiny pieces.
        want = max(size_hint + 1, 1 << 16)
        while chunk := read(fd, want):
            hasher.update(chunk)
        return hasher.hexdigest()
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # advice only; some filesystems (e.g. FUSE) refuse it
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    buf: bytearray | None = getattr(_thread_local, "buf", None)
    if buf is None:
        buf = _thread_local.buf = bytearray(_BUFFER_SIZE)  # one reused buffer per hashing thread
    view = memoryview(buf)
    readv, bufs = os.readv, [buf]
    try:
        while n := readv(fd, bufs):
            hasher.update(view[:n])
    finally:
        view.release()
    return hasher.hexdigest()


def _same_version(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_ino == b.st_ino and a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


@dataclass(frozen=True)
class _Hashed:
    """The outcome of hashing one file: its md5 and the stat it belongs to (cacheable), or an error."""

    md5: str | None
    st: os.stat_result | None
    error: str | None = None


def _hash_regular_file(path: str) -> _Hashed:
    """Hash one file, checking with fstat before and after that it did not change while being read.

    The fstat of the open descriptor (not a separate stat of the path) is what the cache key uses, so a file
    replaced between a walk and the read is keyed by what was really read.
    """
    for _ in range(2):
        try:
            # O_NONBLOCK: if the path became a FIFO since it was stat'ed, open must not wait for a writer.
            # It has no effect on reads of regular files.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            return _Hashed(None, None, _reason(exc))
        try:
            before = os.fstat(fd)
            if not statmod.S_ISREG(before.st_mode):
                return _Hashed(None, before, "not a regular file")
            md5 = _md5_fd(fd, before.st_size)
            after = os.fstat(fd)
        except OSError as exc:
            return _Hashed(None, None, _reason(exc))
        finally:
            os.close(fd)
        if _same_version(before, after):
            return _Hashed(md5, after)
    return _Hashed(None, None, "changed while hashing")


def _reason(exc: OSError) -> str:
    """A short, stable reason for an OSError, as stored in ``ArtifactRef.hash_error``."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return "missing"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ELOOP:
        return "symlink loop"
    if code == errno.EIO:
        return "I/O error"
    if code in (errno.ENXIO, errno.ENODEV):
        return "not a regular file"
    return (exc.strerror or type(exc).__name__).lower()


# ----------------------------------------------------------------------------------------------------
# the cache

_SCHEMA = """
CREATE TABLE IF NOT EXISTS md5_cache (
    path     BLOB PRIMARY KEY,
    inode    INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    md5      TEXT NOT NULL
) WITHOUT ROWID
"""
# A cache write of a whole 10,000-file directory takes tens of milliseconds, so a writer that waits a second
# has met a stuck peer, not a busy one; three tries bound the worst case a task can lose to about 3 s.
_BUSY_TIMEOUT_S = 1.0
_ATTEMPTS = 3
_CacheRow = tuple[int, int, int, str]


class HashCache:
    """A persistent ``(absolute path, inode, size, mtime_ns) → md5`` cache in one SQLite file (WAL mode).

    Many processes on one node may share the file: writers wait up to a busy timeout, a locked database is
    retried with backoff, and any cache failure (locked too long, corrupt file, unwritable directory) degrades
    to "not cached" with a log line instead of an exception. Node-local storage suits it best: SQLite's WAL
    mode needs shared memory, which network filesystems (NFS, Lustre) do not give, so there the cache uses a
    rollback journal (:mod:`metatrail.fstype`), and readers and writers take turns. ``path=None`` keeps the
    cache in memory.

    Paths are stored as their file-system bytes, so names that are not valid UTF-8 are cached too. A
    connection is opened lazily and reopened in a forked child; one instance may be used from several threads.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, busy_timeout_s: float = _BUSY_TIMEOUT_S) -> None:
        """Remember where the cache lives; nothing is opened until first use.

        ``busy_timeout_s`` is how long one attempt waits for another process's write lock.
        """
        self.path: str | None = None if path is None else os.path.abspath(os.fspath(path))
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._broken = False
        # Connections inherited through fork are kept, never closed in the child: closing one could checkpoint
        # or unlink the parent's WAL files.
        self._orphans: list[sqlite3.Connection] = []

    # -- public API --------------------------------------------------------------------------------

    def get(self, path: str, st: os.stat_result) -> str | None:
        """The cached md5 of ``path`` if cached for exactly this inode, size and mtime; else ``None``."""
        key = os.fsencode(os.path.abspath(path))
        rows: list[tuple[int, int, int, str]] = self._run(
            lambda c: c.execute("SELECT inode, size, mtime_ns, md5 FROM md5_cache WHERE path = ?", (key,)).fetchall(),
            default=[],
        )
        if rows and _row_matches(rows[0], st):
            return str(rows[0][3])
        return None

    def put(self, path: str, st: os.stat_result, md5: str) -> None:
        """Remember ``md5`` for ``path`` at this inode, size and mtime (replacing any older entry)."""
        self.put_many([(path, st, md5)])

    def put_many(self, items: Iterable[tuple[str, os.stat_result, str]]) -> None:
        """Remember many hashes in one transaction (one round-trip and one fsync for a whole directory)."""
        rows = [(os.fsencode(os.path.abspath(p)), st.st_ino, st.st_size, st.st_mtime_ns, md5) for p, st, md5 in items]
        if not rows:
            return

        def write(conn: sqlite3.Connection) -> None:
            # IMMEDIATE takes the write lock up front, so waiting happens in the busy handler and never as a
            # failed lock upgrade half-way through the transaction.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO md5_cache VALUES (?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

        self._run(write, default=None)

    def get_dir_entries(self, dir_path: str) -> dict[str, _CacheRow]:
        """Everything cached below ``dir_path`` in one query: ``{abs path: (inode, size, mtime_ns, md5)}``."""
        prefix = os.fsencode(os.path.abspath(dir_path).rstrip("/") + "/")
        # "0" is the byte after "/", so [prefix, upper) is exactly the paths that start with prefix.
        upper = prefix[:-1] + b"0"
        rows: list[tuple[bytes, int, int, int, str]] = self._run(
            lambda c: c.execute(
                "SELECT path, inode, size, mtime_ns, md5 FROM md5_cache WHERE path >= ? AND path < ?",
                (prefix, upper),
            ).fetchall(),
            default=[],
        )
        fsdecode = os.fsdecode
        return {fsdecode(p): (ino, size, mtime, md5) for p, ino, size, mtime, md5 in rows}

    def close(self) -> None:
        """Close this process's connection (a later call reopens it)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
            self._conn = None
            self._pid = -1

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HashCache({self.path!r})"

    # -- internals ---------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:
            self._orphans.append(self._conn)
            self._conn = None
        target = ":memory:" if self.path is None else self.path
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = sqlite3.connect(target, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            if self.path is not None:
                # WAL lets readers proceed while one process writes; NORMAL sync is enough for a cache. On a network
                # filesystem WAL cannot work (metatrail.fstype): a rollback journal there, in which a switch from WAL
                # that finds another process holding the file simply fails (busy), and WAL stays until one can.
                if network_filesystem(self.path) is None:
                    conn.execute("PRAGMA journal_mode = WAL")
                else:
                    with contextlib.suppress(sqlite3.OperationalError):
                        conn.execute("PRAGMA journal_mode = TRUNCATE")
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _run(self, op: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        """Run ``op`` on the connection, retrying while the database is busy; on failure, ``default``."""
        if self._broken:
            return default
        delay = 0.01
        for attempt in range(_ATTEMPTS):
            try:
                with self._lock:
                    return op(self._connect())
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    self._disable(exc)
                    return default
                if attempt == _ATTEMPTS - 1:
                    # Busy is transient: skip this one lookup or write, keep the cache for the next call.
                    logger.debug("hash cache %s busy (%s); continuing uncached", self.path, exc)
                    return default
            except (sqlite3.Error, OSError) as exc:
                self._disable(exc)
                return default
            time.sleep(delay * (1 + random.random()))
            delay *= 2
        return default

    def _disable(self, exc: BaseException) -> None:
        # A corrupt, unreadable or unwritable cache will not heal within this process: stop trying, warn once.
        self._broken = True
        logger.warning(
            "hash cache %s disabled (%s); files will be re-read. Delete the file or point the cache "
            "at a writable node-local directory to fix this.",
            self.path,
            exc,
        )


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _row_matches(row: tuple[object, ...], st: os.stat_result) -> bool:
    return row[0] == st.st_ino and row[1] == st.st_size and row[2] == st.st_mtime_ns


# ----------------------------------------------------------------------------------------------------
# directories


@dataclass(frozen=True)
class _Entry:
    relpath: str
    path: str
    st: os.stat_result


def _walk(top: str) -> Iterator[_Entry]:
    """Yield every file DVC would collect below ``top``; raise HashError where DVC would fail.

    Mirrors ``os.walk(top, followlinks=False)`` filtered by DVC's default ignore rules, using ``os.scandir``
    so a directory costs one syscall batch and each file one stat.
    """
    stack: list[tuple[str, str]] = [(top, "")]
    while stack:
        dir_path, rel = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                entries = list(it)
        except OSError as exc:
            raise _error(exc, rel.rstrip("/") or ".") from exc
        if rel and any(e.name == _DVC_DIR and _is_real_dir(e) for e in entries):
            continue  # a nested DVC repository: DVC leaves sub-repos out of the parent's directories
        for entry in entries:
            name = entry.name
            if name in _IGNORED_ANY:
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if name in _IGNORED_DIRS or entry.is_symlink():
                    continue  # ignored by DVC, or a symlinked directory os.walk would not enter
                stack.append((entry.path, f"{rel}{name}/"))
                continue
            relpath = rel + name
            try:
                st = entry.stat()
            except OSError as exc:
                if exc.errno == errno.ENOENT and entry.is_symlink():
                    raise HashError(f"broken symlink: {relpath!r}", "broken symlink") from exc
                raise _error(exc, relpath) from exc
            if not statmod.S_ISREG(st.st_mode):
                raise HashError(f"not a regular file: {relpath!r}", "not a regular file")
            yield _Entry(relpath, entry.path, st)


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    """A directory, not a symlink to one: what DVC takes for a nested repository's ``.dvc`` (a ``.dvc`` *file* is
    an ordinary file to it)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _error(exc: OSError, relpath: str) -> HashError:
    reason = _reason(exc)
    return HashError(f"{reason}: {relpath!r}", reason)


def _collect(top: str, cache: HashCache | None) -> tuple[list[dict[str, str]], int]:
    """Walk ``top`` and hash what the cache does not already know; return manifest entries and total size."""
    known = cache.get_dir_entries(top) if cache is not None else {}
    entries: list[dict[str, str]] = []
    todo: list[_Entry] = []
    size = 0
    for item in _walk(top):
        row = known.get(item.path)
        if row is not None and _row_matches(row, item.st):
            entries.append({"md5": row[3], "relpath": item.relpath})
            size += item.st.st_size
        else:
            todo.append(item)

    fresh: list[tuple[str, os.stat_result, str]] = []
    # closing(): on an error, stop the hashing threads now rather than whenever the generator is collected.
    with contextlib.closing(_hash_all(todo)) as results:
        for item, done in zip(todo, results, strict=True):
            if done.md5 is None or done.st is None:
                reason = done.error or "unreadable"
                raise HashError(f"{reason}: {item.relpath!r}", reason)
            entries.append({"md5": done.md5, "relpath": item.relpath})
            size += done.st.st_size
            fresh.append((item.path, done.st, done.md5))
    if cache is not None and fresh:
        cache.put_many(fresh)
    return entries, size


def _hash_all(items: list[_Entry]) -> Generator[_Hashed, None, None]:
    """Hash files in order; big ones on several threads when there are several, like dvc-data."""
    large = sum(1 for i in items if i.st.st_size > _LARGE_FILE)
    workers = min(_MAX_HASH_THREADS, os.cpu_count() or 1)
    if large < 2 or workers < 2:
        yield from (_hash_regular_file(i.path) for i in items)
        return
    yield from _hash_on_threads([i.path for i in items], workers)


def _hash_on_threads(paths: list[str], workers: int) -> Generator[_Hashed, None, None]:
    """Hash ``paths`` on ``workers`` daemon threads; the results in the order of ``paths``.

    Threads of our own rather than a ``concurrent.futures`` pool: at interpreter exit ``concurrent.futures`` joins
    its worker threads, which first hash every file already queued, so a process that ended while a large directory
    was being hashed (by a Recorder's writer, given up after the flush timeout) waited for the whole directory.
    Daemon threads hold no exit. When the caller stops early (an error, ``close()``), files not started are skipped.
    """
    results: dict[int, _Hashed] = {}
    ready = threading.Condition()
    stop = threading.Event()
    todo = iter(range(len(paths)))

    def work() -> None:
        while not stop.is_set():
            with ready:
                index = next(todo, None)
            if index is None:
                return
            outcome = _hash_or_reason(paths[index])
            with ready:
                results[index] = outcome
                ready.notify_all()

    for _ in range(min(workers, len(paths))):
        threading.Thread(target=work, name="metatrail-hash", daemon=True).start()
    try:
        for index in range(len(paths)):
            with ready:
                while index not in results:
                    ready.wait()
                outcome = results.pop(index)
            yield outcome
    finally:
        stop.set()


def _hash_or_reason(path: str) -> _Hashed:
    """:func:`_hash_regular_file`, with an unexpected error as the reason: a worker thread that died would leave
    its file's result missing and the caller waiting for it."""
    try:
        return _hash_regular_file(path)
    except Exception as exc:
        return _Hashed(None, None, f"unreadable ({type(exc).__name__}: {exc})")


def _manifest_md5(entries: list[dict[str, str]]) -> str:
    # The exact bytes dvc-data's Tree.as_bytes() hashes: sorted by relpath, json.dumps(sort_keys=True).
    data = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest() + ".dir"


def dir_manifest(path: str | os.PathLike[str], cache: HashCache | None = None) -> tuple[list[dict[str, str]], str]:
    """The DVC ``.dir`` manifest of a local directory and its hash.

    Returns ``(entries, "<md5>.dir")`` where ``entries`` is ``[{"md5": …, "relpath": …}, …]`` sorted by
    relpath, the list ``dvc-data`` stores in its ``.dir`` object. Unchanged files are taken from ``cache``
    without being read. Raises :class:`~metatrail.errors.HashError` (with a short ``reason``) when the tree
    cannot be hashed whole.
    """
    top = os.path.abspath(os.fspath(path))
    entries, _ = _collect(top, cache)
    entries.sort(key=_relpath_key)
    return entries, _manifest_md5(entries)


def _relpath_key(entry: dict[str, str]) -> str:
    return entry["relpath"]


# ----------------------------------------------------------------------------------------------------
# the entry point


def hash_path(path: str | os.PathLike[str], cache: HashCache | None = None) -> ArtifactRef:
    """Describe and hash an artifact: a local file, a local directory or a remote URI.

    A file gets the md5 of its bytes; a directory its ``.dir`` manifest hash, ``size`` (total bytes) and
    ``nfiles``; a remote URI is not downloaded (``kind="remote"``, ``hash_error="remote: not downloaded"``).
    A missing, unreadable or otherwise unhashable path gets ``hash=None`` and a short ``hash_error``
    (``"missing"``, ``"permission denied"``, ``"broken symlink: 'sub/x'"``, …); such cases never raise.
    """
    uri = os.fspath(path)
    namespace, name = dataset_name(uri)
    if not _is_local(namespace):
        return ArtifactRef(uri, namespace, name, kind="remote", hash_error=REMOTE_NOT_DOWNLOADED)
    ref = ArtifactRef(uri, namespace, name, kind="file")
    try:
        st = os.stat(name)
    except OSError as exc:
        reason = _reason(exc)
        if reason == "missing":
            ref.kind = "missing"
            if os.path.islink(name):
                reason = "broken symlink"
        ref.hash_error = reason
        return ref

    if statmod.S_ISDIR(st.st_mode):
        ref.kind = "directory"
        try:
            entries, size = _collect(name, cache)
        except HashError as exc:
            ref.hash_error = _short(exc)
            return ref
        except OSError as exc:  # not expected (the walk turns OSErrors into HashError), but never raise
            ref.hash_error = _reason(exc)
            return ref
        entries.sort(key=_relpath_key)
        ref.hash = HashInfo(HASH_NAME, _manifest_md5(entries))
        ref.size, ref.nfiles = size, len(entries)
        return ref

    if not statmod.S_ISREG(st.st_mode):
        ref.hash_error = "not a regular file"  # FIFOs, sockets, devices: reading could block or never end
        return ref
    ref.size = st.st_size
    if cache is not None and (md5 := cache.get(name, st)) is not None:
        ref.hash = HashInfo(HASH_NAME, md5)
        return ref
    done = _hash_regular_file(name)
    if done.md5 is None or done.st is None:
        ref.hash_error = done.error or "unreadable"
        return ref
    ref.hash, ref.size = HashInfo(HASH_NAME, done.md5), done.st.st_size
    if cache is not None:
        cache.put(name, done.st, done.md5)
    return ref


def _short(exc: HashError) -> str:
    """``"<reason>: <detail>"``, short enough for an event facet."""
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."
