"""Which task values name local files or directories: the inputs and outputs the Prefect plugin records.

Only explicit paths count: an absolute path string, a ``pathlib`` path (a relative one is taken from the working
directory) or a ``file://`` URI. A relative string such as ``split="train"`` is a word, not a path, even when a
directory of that name happens to exist where the flow runs. The file-system root, the home, temporary and working
directories are never taken: hashing one would read a machine's worth of files for an argument that merely named it.

Whether a path exists is asked of the file system off the task's thread, under a hard time cap
(:data:`STAT_TIMEOUT_S`): a hung network mount costs the task at most that, once, and the paths are then not
recorded (logged once) until the file system answers again.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from metatrail.boundedcall import BoundedCaller
from metatrail.plugins.prefect.values import is_builtin_collection, iterate_builtin

MAX_PATHS = 64
MAX_CANDIDATES = 4 * MAX_PATHS
MAX_PATH_LENGTH = 4096
STAT_TIMEOUT_S = 2.0

# The Airflow plugin's hard-time-cap runner (one daemon thread, fork-aware; while a call is stuck past its cap the
# next ones return at once, so a hung mount costs one cap, not one per task). Its module imports no Airflow.
_PROBER = BoundedCaller("metatrail-prefect-paths")


def local_paths(values: Iterable[Any], timeout: float = STAT_TIMEOUT_S) -> list[str]:
    """Absolute paths of the values (and of the items of list/tuple/set/dict values, one level down) that name
    existing local files or directories (module docstring); at most ``timeout`` seconds are spent waiting for the
    file system."""
    # Values of the types most tasks take and return never name a path: set aside before the generators that look
    # into each value are made (this runs twice per task run, on the task's thread).
    candidates = [value for value in values if type(value) not in _NEVER_PATHS]
    named = explicit_paths(candidates) if candidates else []
    return _existing(named, timeout) if named else []


_NEVER_PATHS = frozenset({int, float, bool, type(None), bytes})


def explicit_paths(values: Iterable[Any]) -> list[str]:
    """The absolute paths the values name explicitly (see :func:`local_paths`), without asking the file system."""
    named: list[str] = []
    broad: frozenset[str] | None = None
    for candidate in itertools.islice(_candidates(values), MAX_CANDIDATES):
        try:
            path = _explicit_path(candidate)
        except Exception:  # an odd path subclass, a deleted working directory: not a path we can name
            continue
        if path is None or path in named:
            continue
        if broad is None:
            broad = too_broad()
        if path not in broad:
            named.append(path)
            if len(named) >= MAX_PATHS:
                break
    return named


def too_broad() -> frozenset[str]:
    """Directories never taken as inputs or outputs (the same rule as the Airflow plugin's)."""
    broad = ["/", os.path.expanduser("~"), tempfile.gettempdir(), "/tmp", "/var/tmp"]
    with contextlib.suppress(OSError):  # a deleted working directory is simply not listed
        broad.append(os.getcwd())
    return frozenset(os.path.normpath(p) for p in broad)


def _candidates(values: Iterable[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, str | pathlib.PurePath):
            yield value
        elif isinstance(value, dict):
            yield from itertools.islice(dict.values(value), MAX_PATHS)
        elif is_builtin_collection(value):
            yield from itertools.islice(iterate_builtin(value), MAX_PATHS)


def _explicit_path(value: Any) -> str | None:
    """The absolute, normalised path ``value`` names explicitly, or None (relative strings, other URIs, text that
    cannot be a path)."""
    if isinstance(value, pathlib.PurePath):
        if not isinstance(value, pathlib.PurePosixPath if os.sep == "/" else pathlib.PureWindowsPath):
            return None
        text = os.fspath(value)  # a pathlib subclass's own conversion may raise: the caller skips it
        explicit = True
    elif isinstance(value, str):
        text = str.__str__(value)
        explicit = False
    else:
        return None
    if not text or len(text) > MAX_PATH_LENGTH or "\x00" in text or "\n" in text:
        return None
    if text.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            return None
        text = unquote(parts.path, errors="surrogateescape")
    elif "://" in text or not (explicit or os.path.isabs(text)):
        return None  # another scheme, or a relative string: a word, not a path
    return os.path.abspath(text)


def _existing(paths: list[str], timeout: float) -> list[str]:
    """The ``paths`` that exist, asked on the prober's thread; none when the file system does not answer in time."""
    found: list[str] = []

    def probe() -> None:
        found.extend(p for p in paths if _exists(p))

    if not _PROBER.call("checking the paths a Prefect task names", probe, timeout):
        return []  # not known in time: nothing is recorded rather than a guess
    return list(found)


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True

